"""Where definitions come from and how long a copy is trusted; the seed's camelCase config as ours."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from flowstore import FlowStore, InvalidArgumentError

Source = Literal["database", "file", "remote", "hybrid"]


@dataclass(frozen=True)
class Authentication:
    """How a remote source proves who is asking: the seed's `{type, credentials}`."""

    type: Literal["bearer", "basic", "apikey"]
    credentials: str
    """The token (bearer), "user:password" (basic), or the key (apikey)."""
    header: str = "X-API-Key"
    """The header an API key is sent in."""

    def __repr__(self) -> str:  # credentials stay out of logs and tracebacks
        return f"Authentication(type={self.type!r}, credentials='***', header={self.header!r})"


@dataclass(frozen=True)
class FlowProviderConfig:
    """Where definitions come from and how long a copy is trusted: the seed's config, snake_case."""

    source: Source
    store: FlowStore | None = None
    """`database`: the store to read (else one is opened from `connection_string`)."""
    connection_string: str | None = None
    """`database`: a flowstore URL, when no `store` is given."""
    file_path: str | Path | None = None
    """`file`: a YAML/JSON file or a folder of them."""
    remote_url: str | None = None
    """`remote`: the URL to GET; `{flow_id}` in it is replaced by the (quoted) flow id."""
    cache_timeout: float = 300.0
    """Seconds a fetched definition is served without asking the source again (0: always ask)."""
    authentication: Authentication | None = None
    """`remote`: credentials to send."""
    sources: Sequence[FlowProviderConfig] = ()
    """`hybrid`: the sources to ask, in order."""
    timeout: float = 10.0
    """`remote`: seconds to wait for the server."""
    clock: Callable[[], float] = time.monotonic
    """Seconds, for cache expiry (tests pass a clock they move)."""


_SEED_KEYS = {
    "source": "source",
    "connectionString": "connection_string",
    "filePath": "file_path",
    "remoteUrl": "remote_url",
    "cacheTimeout": "cache_timeout",
    "authentication": "authentication",
    "sources": "sources",
    "timeout": "timeout",
    "store": "store",
    "clock": "clock",  # ours, not the seed's: tests move time by hand
}


def config_from_seed(config: Mapping[str, Any]) -> FlowProviderConfig:
    """The seed's `FlowProviderConfig` object (camelCase, `cacheTimeout` in milliseconds) as ours.

    `authentication` is `{"type", "credentials"}` (and optionally `"header"`); a hybrid's
    `sources` are seed objects too. Unknown keys are refused: they are typos, not options.
    """
    if not isinstance(config, Mapping):
        raise InvalidArgumentError("config", type(config).__name__, "must be a mapping")
    unknown = sorted(set(config) - set(_SEED_KEYS))
    if unknown:
        raise InvalidArgumentError(
            "config", unknown, f"unknown provider option(s); known: {sorted(_SEED_KEYS)}"
        )
    fields = {_SEED_KEYS[key]: value for key, value in config.items()}
    if "cache_timeout" in fields:
        millis = fields["cache_timeout"]
        if isinstance(millis, bool) or not isinstance(millis, int | float):
            raise InvalidArgumentError("cacheTimeout", millis, "must be a number of milliseconds")
        fields["cache_timeout"] = millis / 1000  # the seed counts milliseconds, we seconds
    auth = fields.get("authentication")
    if isinstance(auth, Mapping):
        try:
            fields["authentication"] = Authentication(**auth)
        except TypeError as exc:
            raise InvalidArgumentError("authentication", sorted(auth), str(exc)) from None
    fields["sources"] = tuple(
        s if isinstance(s, FlowProviderConfig) else config_from_seed(s)
        for s in fields.get("sources", ())
    )
    if "source" not in fields:
        raise InvalidArgumentError("source", None, "must be database, file, remote or hybrid")
    return FlowProviderConfig(**fields)
