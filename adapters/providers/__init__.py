"""Flow-definition providers: where a service reads its flow definitions from, through a cache.

    provider = make_flow_provider(FlowProviderConfig(source="file", file_path="flows/"))
    provider.get_flow("user-onboarding")  # a FlowDefinition, cached for cache_timeout seconds

Sources, as in the seed's `FlowProviderConfig`:

- `database`: the store's own definitions (a `FlowStore` passed as `store`, or one opened from
  `connection_string`). Changes made through that store object empty the cache at once; changes
  made by other processes are seen when the cached copy expires.
- `file`: a YAML or JSON file, or a folder of them (not recursive). A document is one definition in
  the seed's JSON shape, a list of them, or `{"flows": [...]}`.
- `remote`: an HTTP(S) URL answering with such a JSON (or YAML) document; a URL containing
  `{flow_id}` is asked once per flow, and its 404 means "no such flow". `authentication` is
  `bearer` (Authorization: Bearer), `basic` (credentials "user:password") or `apikey` (an
  `X-API-Key` header, or the header named in `Authentication.header`).
- `hybrid`: an ordered list of source configs; the first that has a flow wins.

A source that fails (a server down or answering garbage, a broken file) keeps serving the last good
copy it had, with a warning in the log, and tries again after another `cache_timeout`; a flow it
never delivered raises `FlowNotFoundError` naming the source and the failure.

Modules: `config` (the settings, the seed's camelCase), `base` (`FlowProvider`, the source port),
`cache` (`CachedFlowProvider`), `hybrid`, one per source (`database`, `files`: also reading YAML/JSON
documents, `remote`), `loading` (`load_flows`); this one picks the provider for a config.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

try:
    import httpx  # noqa: F401  (checked here, used by .remote)
    import yaml  # noqa: F401  (checked here, used by .files)
except ImportError as missing:  # PyYAML and httpx come with the providers extra
    raise ImportError(
        f"flowstore.adapters.providers needs the providers extra ({missing.name} is missing): "
        "pip install 'flowstore-es[providers]'",
        name=missing.name,
    ) from None

from flowstore import FlowStore, InvalidArgumentError
from flowstore.adapters.providers.base import Fetcher, FlowProvider
from flowstore.adapters.providers.cache import CachedFlowProvider
from flowstore.adapters.providers.config import Authentication, FlowProviderConfig, config_from_seed
from flowstore.adapters.providers.database import DatabaseFetcher
from flowstore.adapters.providers.files import DEFINITION_SUFFIXES, FileFetcher, read_definitions
from flowstore.adapters.providers.hybrid import HybridFlowProvider
from flowstore.adapters.providers.loading import LoadedFlow, load_flows
from flowstore.adapters.providers.remote import RemoteFetcher

__all__ = [
    "DEFINITION_SUFFIXES",
    "Authentication",
    "CachedFlowProvider",
    "FlowProvider",
    "FlowProviderConfig",
    "HybridFlowProvider",
    "LoadedFlow",
    "config_from_seed",
    "load_flows",
    "make_flow_provider",
    "read_definitions",
]


def make_flow_provider(config: FlowProviderConfig | Mapping[str, Any]) -> FlowProvider:
    """A provider for the configured source (see the module's docstring).

    Takes our `FlowProviderConfig` or the seed's camelCase object (`cacheTimeout` in ms).
    """
    if not isinstance(config, FlowProviderConfig):
        config = config_from_seed(config)
    if config.cache_timeout < 0:
        raise InvalidArgumentError("cache_timeout", config.cache_timeout, "must not be negative")
    fetcher: Fetcher
    match config.source:
        case "hybrid":
            return HybridFlowProvider([make_flow_provider(c) for c in config.sources])
        case "database":
            if config.store is None and config.connection_string is None:
                raise InvalidArgumentError(
                    "store", None, "a database source needs a store or a connection_string"
                )
            owned = config.store is None
            store = config.store or FlowStore(config.connection_string)
            database = DatabaseFetcher(store, owned=owned)
            provider = CachedFlowProvider(
                database, cache_timeout=config.cache_timeout, clock=config.clock
            )
            # Changes through this store object reach the cache at once.
            database.unsubscribe = store.on_definition_change(provider.invalidate)
            return provider
        case "file":
            if config.file_path is None:
                raise InvalidArgumentError("file_path", None, "a file source needs a file_path")
            fetcher = FileFetcher(Path(config.file_path))
        case "remote":
            if config.remote_url is None:
                raise InvalidArgumentError("remote_url", None, "a remote source needs a remote_url")
            fetcher = RemoteFetcher(
                config.remote_url, auth=config.authentication, timeout=config.timeout
            )
        case _:
            raise InvalidArgumentError(
                "source", config.source, "must be database, file, remote or hybrid"
            )
    return CachedFlowProvider(fetcher, cache_timeout=config.cache_timeout, clock=config.clock)
