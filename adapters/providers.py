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
"""

from __future__ import annotations

import logging
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Protocol, Self
from urllib.parse import quote, urlsplit, urlunsplit

import orjson

try:
    import httpx
    import yaml
except ImportError as missing:  # PyYAML and httpx come with the providers extra
    raise ImportError(
        f"flowstore.adapters.providers needs the providers extra ({missing.name} is missing): "
        "pip install 'flowstore-es[providers]'",
        name=missing.name,
    ) from None
from eventsourcing.persistence import PersistenceError

from flowstore import (
    DefinitionError,
    FlowDefinition,
    FlowNotFoundError,
    FlowStore,
    InvalidArgumentError,
    StorageUnavailableError,
)
from flowstore.definitions import DOT_IDS, parse_definition

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

_log = logging.getLogger(__name__)

DEFINITION_SUFFIXES = (".json", ".yaml", ".yml")
"""The files a folder source reads (others are ignored)."""

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


class FlowProvider(ABC):
    """Reads flow definitions from one source (or several, for `hybrid`); a context manager."""

    name: str
    """The source, for messages: `file:flows/`, `remote:https://...`, `database:...`."""

    @abstractmethod
    def get_flow(self, flow_id: str) -> FlowDefinition:
        """The flow's definition; `FlowNotFoundError` (naming the source) if the source lacks it."""

    @abstractmethod
    def list_flows(self) -> list[FlowDefinition]:
        """Every definition the source has (for a per-flow URL: those fetched so far)."""

    @abstractmethod
    def invalidate(self, flow_id: str | None = None) -> None:
        """Forget the cached copy of one flow (all flows when None)."""

    @abstractmethod
    def close(self) -> None:
        """Release connections (and a store this provider opened)."""

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class _SourceUnavailableError(Exception):
    """The source could not answer (down, garbage, unreadable); the message says why."""


class _Fetcher(Protocol):
    name: str
    whole: bool
    """True when every fetch returns all the source's flows (a file, a whole remote document)."""
    can_list: bool

    def fetch(self, flow_id: str | None) -> dict[str, FlowDefinition]: ...

    def close(self) -> None: ...


@dataclass
class _Entry:
    definition: FlowDefinition
    at: float


class CachedFlowProvider(FlowProvider):
    """A single source behind a cache with expiry and a last-good-copy fallback."""

    def __init__(self, fetcher: _Fetcher, *, cache_timeout: float, clock: Callable[[], float]):
        self.name = fetcher.name
        self.cache_timeout = cache_timeout
        self._fetcher = fetcher
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: dict[str, _Entry] = {}
        self._listed_at: float | None = None
        # Bumped by invalidate(): a fetch that began before an invalidation may have read the old
        # definition, so what it brings back is returned but not cached.
        self._generation = 0

    def _fresh(self, at: float | None, now: float) -> bool:
        return at is not None and now - at < self.cache_timeout

    def get_flow(self, flow_id: str) -> FlowDefinition:
        """The flow's definition, from the cache while it is fresh, else from the source."""
        now = self._clock()
        with self._lock:
            entry = self._entries.get(flow_id)
            generation = self._generation
        if entry is not None and self._fresh(entry.at, now):
            return entry.definition
        try:
            found = self._fetcher.fetch(flow_id)
        except _SourceUnavailableError as exc:
            if entry is None:
                raise FlowNotFoundError(
                    flow_id,
                    f"Flow {flow_id!r} not found: {self.name} is unavailable ({exc})",
                    source=self.name,
                    reason=str(exc),
                ) from None
            _log.warning(
                "%s is unavailable (%s); serving the cached copy of flow %r",
                self.name,
                exc,
                flow_id,
            )
            with self._lock:  # ask again only after another cache_timeout, not on every call
                if generation == self._generation:
                    self._entries[flow_id] = _Entry(entry.definition, now)
            return entry.definition
        self._remember(found, now, generation)
        if flow_id not in found:
            with self._lock:
                self._entries.pop(flow_id, None)
            raise FlowNotFoundError(
                flow_id, f"Flow {flow_id!r} not found in {self.name}", source=self.name
            )
        return found[flow_id]

    def list_flows(self) -> list[FlowDefinition]:
        """Every definition the source has (for a per-flow URL: those fetched so far)."""
        now = self._clock()
        with self._lock:
            cached = [entry.definition for entry in self._entries.values()]
            fresh = self._fresh(self._listed_at, now)
            generation = self._generation
        if fresh or not self._fetcher.can_list:
            return cached
        try:
            found = self._fetcher.fetch(None)
        except _SourceUnavailableError as exc:
            if self._listed_at is None and not cached:
                raise FlowNotFoundError(
                    "*", f"{self.name} is unavailable ({exc})", source=self.name, reason=str(exc)
                ) from None
            _log.warning("%s is unavailable (%s); listing the cached flows", self.name, exc)
            with self._lock:
                if generation == self._generation:
                    self._listed_at = now
            return cached
        self._remember(found, now, generation, complete=True)
        return list(found.values())

    def _remember(
        self,
        found: Mapping[str, FlowDefinition],
        now: float,
        generation: int,
        *,
        complete: bool = False,
    ) -> None:
        with self._lock:
            if generation != self._generation:
                return
            if complete or self._fetcher.whole:
                # The source's whole content: flows it no longer has must not linger.
                self._entries = {}
                self._listed_at = now
            for flow_id, definition in found.items():
                self._entries[flow_id] = _Entry(definition, now)

    def invalidate(self, flow_id: str | None = None) -> None:
        """Forget the cached copy of one flow (all flows when None)."""
        with self._lock:
            self._generation += 1
            self._listed_at = None
            if flow_id is None:
                self._entries.clear()
            else:
                self._entries.pop(flow_id, None)

    def close(self) -> None:
        """Release the source's connections."""
        self._fetcher.close()


class HybridFlowProvider(FlowProvider):
    """Several providers asked in order: the first that has a flow wins."""

    def __init__(self, providers: Sequence[FlowProvider]) -> None:
        if not providers:
            raise InvalidArgumentError("sources", [], "a hybrid provider needs at least one source")
        self.providers = list(providers)
        self.name = "hybrid(" + ", ".join(p.name for p in self.providers) + ")"

    def get_flow(self, flow_id: str) -> FlowDefinition:
        """The definition from the first provider that has the flow."""
        reasons = []
        for provider in self.providers:
            try:
                return provider.get_flow(flow_id)
            except FlowNotFoundError as exc:
                reasons.append(exc.message)
        raise FlowNotFoundError(
            flow_id,
            f"Flow {flow_id!r} not found in any source of {self.name}: " + "; ".join(reasons),
            source=self.name,
            reasons=reasons,
        )

    def list_flows(self) -> list[FlowDefinition]:
        """Every flow of every source; for a flow in several, the first source's definition."""
        flows: dict[str, FlowDefinition] = {}
        for provider in self.providers:
            try:
                listed = provider.list_flows()
            except FlowNotFoundError as exc:
                _log.warning("%s", exc.message)
                continue
            for definition in listed:
                flows.setdefault(definition.flow, definition)
        return list(flows.values())

    def invalidate(self, flow_id: str | None = None) -> None:
        """Forget cached copies in every source."""
        for provider in self.providers:
            provider.invalidate(flow_id)

    def close(self) -> None:
        """Close every source."""
        for provider in self.providers:
            provider.close()


# Sources


class _DatabaseFetcher:
    whole = False
    can_list = True

    def __init__(self, store: FlowStore, *, owned: bool) -> None:
        self.store = store
        self._owned = owned
        self.name = f"database:{store.config.display or store.config.backend}"
        self.unsubscribe: Callable[[], None] = lambda: None

    def fetch(self, flow_id: str | None) -> dict[str, FlowDefinition]:
        try:
            if flow_id is None:
                return {d.flow: d for d in self.store.list_flows()}
            try:
                return {flow_id: self.store.get_flow(flow_id)}
            except FlowNotFoundError:
                return {}
        except (PersistenceError, StorageUnavailableError) as exc:  # serve what we had
            raise _SourceUnavailableError(f"{type(exc).__name__}: {exc}") from None

    def close(self) -> None:
        self.unsubscribe()
        if self._owned:
            self.store.close()


class _FileFetcher:
    whole = True
    can_list = True

    def __init__(self, path: Path) -> None:
        self.path = path
        self.name = f"file:{path}"

    def fetch(self, flow_id: str | None) -> dict[str, FlowDefinition]:
        try:
            return {d.flow: d for d in read_definitions(self.path)}
        except OSError as exc:
            raise _SourceUnavailableError(exc.strerror or str(exc)) from None
        except DefinitionError as exc:
            raise _SourceUnavailableError("; ".join(exc.problems)) from None

    def close(self) -> None:
        pass


class _RemoteFetcher:
    can_list = True

    def __init__(self, url: str, *, auth: Authentication | None, timeout: float) -> None:
        if urlsplit(url).scheme not in ("http", "https"):
            raise InvalidArgumentError("remote_url", _redact(url), "must be an http(s) URL")
        self.url = url
        self.per_flow = "{flow_id}" in url
        self.whole = not self.per_flow
        self.can_list = not self.per_flow
        self.name = f"remote:{_redact(url)}"
        headers = {"Accept": "application/json, application/yaml;q=0.9"}
        basic: httpx.BasicAuth | None = None
        if auth is not None:
            if auth.type == "bearer":
                headers["Authorization"] = f"Bearer {auth.credentials}"
            elif auth.type == "apikey":
                headers[auth.header] = auth.credentials
            elif auth.type == "basic":
                user, colon, password = auth.credentials.partition(":")
                if not colon:
                    raise InvalidArgumentError(
                        "authentication", auth, 'basic credentials must be "user:password"'
                    )
                basic = httpx.BasicAuth(user, password)
            else:
                raise InvalidArgumentError(
                    "authentication", auth, "type must be bearer, basic or apikey"
                )
        # Redirects are followed by hand, within the origin only: httpx drops Authorization on a
        # cross-origin redirect but forwards a custom API-key header to wherever it is sent.
        self._client = httpx.Client(
            headers=headers, auth=basic, timeout=timeout, follow_redirects=False
        )

    def fetch(self, flow_id: str | None) -> dict[str, FlowDefinition]:
        url = self.url
        if self.per_flow:
            assert flow_id is not None
            if flow_id in DOT_IDS:  # a path segment of its own: "/flows/.." is "/"
                raise InvalidArgumentError("flow_id", flow_id, "must not be '.' or '..'")
            url = url.replace("{flow_id}", quote(flow_id, safe=""))
        try:
            response = self._get_same_origin(url)
        except httpx.HTTPError as exc:
            raise _SourceUnavailableError(f"{type(exc).__name__}: {exc}") from None
        if self.per_flow and response.status_code == 404:
            return {}  # the server says there is no such flow: an answer, not a failure
        if not response.is_success:
            raise _SourceUnavailableError(f"HTTP {response.status_code} {response.reason_phrase}")
        kind = response.headers.get("content-type", "")
        try:
            data = (
                _load_yaml(response.text) if "yaml" in kind else orjson.loads(response.content)
            )
        except (orjson.JSONDecodeError, yaml.YAMLError) as exc:
            raise _SourceUnavailableError(
                f"the answer is not {'YAML' if 'yaml' in kind else 'JSON'}: {exc}"
            ) from None
        definitions, problems = _definitions_in(data, self.name)
        if problems:  # a half-valid answer is garbage too: keep the last good copy whole
            raise _SourceUnavailableError("; ".join(problems))
        found = {d.flow: d for d in definitions}
        if self.per_flow and flow_id not in found:
            raise _SourceUnavailableError(
                f"the answer for {flow_id!r} holds {sorted(found) or 'no flow'}"
            )
        return found

    def _get_same_origin(self, url: str) -> httpx.Response:
        origin = _origin(httpx.URL(url))
        response = self._client.get(url)
        for _ in range(MAX_REDIRECTS):
            if not response.has_redirect_location or response.next_request is None:
                return response
            target = response.next_request.url
            if _origin(target) != origin:
                raise _SourceUnavailableError(
                    f"redirected to another origin ({_redact(str(target))}); credentials are "
                    "only sent to the configured origin"
                )
            response = self._client.send(response.next_request)
        raise _SourceUnavailableError(f"more than {MAX_REDIRECTS} redirects")

    def close(self) -> None:
        self._client.close()


MAX_REDIRECTS = 5
"""Most same-origin redirects a remote source may answer with."""


def _origin(url: httpx.URL) -> tuple[str, str, int | None]:
    default = {"http": 80, "https": 443}.get(url.scheme)
    return url.scheme, url.host, url.port or default


def _redact(url: str) -> str:
    """The URL without user info and query (either may hold a secret)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


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


def make_flow_provider(config: FlowProviderConfig | Mapping[str, Any]) -> FlowProvider:
    """A provider for the configured source (see the module's docstring).

    Takes our `FlowProviderConfig` or the seed's camelCase object (`cacheTimeout` in ms).
    """
    if not isinstance(config, FlowProviderConfig):
        config = config_from_seed(config)
    if config.cache_timeout < 0:
        raise InvalidArgumentError("cache_timeout", config.cache_timeout, "must not be negative")
    fetcher: _Fetcher
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
            database = _DatabaseFetcher(store, owned=owned)
            provider = CachedFlowProvider(
                database, cache_timeout=config.cache_timeout, clock=config.clock
            )
            # Changes through this store object reach the cache at once.
            database.unsubscribe = store.on_definition_change(provider.invalidate)
            return provider
        case "file":
            if config.file_path is None:
                raise InvalidArgumentError("file_path", None, "a file source needs a file_path")
            fetcher = _FileFetcher(Path(config.file_path))
        case "remote":
            if config.remote_url is None:
                raise InvalidArgumentError("remote_url", None, "a remote source needs a remote_url")
            fetcher = _RemoteFetcher(
                config.remote_url, auth=config.authentication, timeout=config.timeout
            )
        case _:
            raise InvalidArgumentError(
                "source", config.source, "must be database, file, remote or hybrid"
            )
    return CachedFlowProvider(fetcher, cache_timeout=config.cache_timeout, clock=config.clock)


# Reading definition files


def _definitions_in(data: Any, origin: str) -> tuple[list[FlowDefinition], list[str]]:
    """The valid definitions in one parsed document, and the problems of the others.

    A document is one definition, a list of them, or {"flows": [...] or {id: definition}}.
    """
    if isinstance(data, Mapping) and "flows" in data and "flow" not in data:
        data = data["flows"]
        if isinstance(data, Mapping):
            data = list(data.values())
    items = data if isinstance(data, list) else [data]
    definitions: list[FlowDefinition] = []
    problems: list[str] = []
    for i, item in enumerate(items):
        try:
            definitions.append(parse_definition(item))
        except DefinitionError as exc:
            where = f"{origin}" + (f" item {i}" if isinstance(data, list) else "")
            name = f" flow {exc.flow_id!r}" if exc.flow_id else ""
            problems.extend(f"{where}{name}: {p}" for p in exc.problems)
    return definitions, problems


class _NoAliasLoader(yaml.SafeLoader):
    """SafeLoader that refuses aliases: a few hundred bytes of nested aliases expand to gigabytes."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()  # type: ignore[no-untyped-call]
            raise yaml.composer.ComposerError(
                None, None, "aliases (*name) are not allowed in flow definitions", event.start_mark
            )
        return super().compose_node(parent, index)


def _load_yaml(text: str) -> Any:
    """YAML without aliases (see `_NoAliasLoader`)."""
    return yaml.load(text, Loader=_NoAliasLoader)  # a SafeLoader subclass


def _read_file(path: Path) -> tuple[list[FlowDefinition], list[str]]:
    text = path.read_text(encoding="utf-8")
    try:
        data = _load_yaml(text) if path.suffix in (".yaml", ".yml") else orjson.loads(text)
    except (orjson.JSONDecodeError, yaml.YAMLError) as exc:
        kind = "JSON" if path.suffix == ".json" else "YAML"
        return [], [f"{path}: not valid {kind}: {' '.join(str(exc).split())}"]
    return _definitions_in(data, str(path))


def read_definitions(path: str | Path) -> list[FlowDefinition]:
    """Every definition in a YAML/JSON file, or in the folder's .json/.yaml/.yml files (by name).

    Raises `DefinitionError` listing every problem in every file (a flow defined twice is one),
    and `OSError` when the path cannot be read.
    """
    path = Path(path)
    files = (
        sorted(p for p in path.iterdir() if p.suffix in DEFINITION_SUFFIXES and p.is_file())
        if path.is_dir()
        else [path]
    )
    definitions: list[FlowDefinition] = []
    seen: dict[str, Path] = {}
    problems: list[str] = []
    for file in files:
        found, file_problems = _read_file(file)
        problems.extend(file_problems)
        for definition in found:
            if definition.flow in seen:
                problems.append(
                    f"flow {definition.flow!r} is defined in both {seen[definition.flow]} and {file}"
                )
                continue
            seen[definition.flow] = file
            definitions.append(definition)
    if problems:
        raise DefinitionError(None, problems)
    return definitions


@dataclass(frozen=True)
class LoadedFlow:
    """What `load_flows` did with one definition."""

    flow: str
    action: Literal["created", "updated", "unchanged"]
    version: int


def _same(a: FlowDefinition, b: FlowDefinition) -> bool:
    return a.model_copy(update={"version": None}) == b.model_copy(update={"version": None})


_FIELDS = {name: info.alias or name for name, info in FlowDefinition.model_fields.items()}


def load_flows(store: FlowStore, definitions: Iterable[FlowDefinition]) -> list[LoadedFlow]:
    """Create each flow the store lacks, version each that differs, leave identical ones alone.

    Each definition replaces its flow's whole definition (a key the new one lacks, like `ttl`,
    is removed). The flows are applied one after the other, not as one transaction.
    """
    loaded = []
    for definition in definitions:
        try:
            current = store.get_flow(definition.flow)
        except FlowNotFoundError:  # new, or deleted: create_flow revives it as a new version
            store.create_flow(definition)
            loaded.append(LoadedFlow(definition.flow, "created", _version(store, definition.flow)))
            continue
        if _same(current, definition):
            assert current.version is not None
            loaded.append(LoadedFlow(definition.flow, "unchanged", current.version))
            continue
        changes = {alias: None for name, alias in _FIELDS.items() if name != "version"}
        changes.update(definition.to_seed())
        changes.pop("version", None)
        updated = store.update_flow(definition.flow, changes)
        assert updated.version is not None
        loaded.append(LoadedFlow(definition.flow, "updated", updated.version))
    return loaded


def _version(store: FlowStore, flow_id: str) -> int:
    version = store.get_flow(flow_id).version
    assert version is not None
    return version
