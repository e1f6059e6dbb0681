"""`FlowStore`: the service facade. Commands append events; queries read aggregates and the tables.

Each public method is a few lines over the modules that do the work: `flowstore.commands` (the
write path: read, decide, append, retry), `flowstore.batch` (transitions and overrides, one at a
time or a batch per transaction), `flowstore.erasure`, `flowstore.migration`,
`flowstore.importing`, the event log (`flowstore.eventlog`) and the read-model tables
(`flowstore.projections`). The decisions themselves are pure functions in `flowstore.domain`.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import threading
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol, Self, cast
from uuid import UUID

from flowstore.batch import Transitions
from flowstore.commands import Commands, definition_of, is_expired
from flowstore.definitions import (
    DEFAULT_MAX_PAYLOAD_BYTES,
    FlowDefinition,
    FlowTransition,
    check_entity,
    check_message,
    check_payload,
    parse_definition,
    require_id,
    update_definition,
)
from flowstore.diagrams import DIAGRAM_FORMATS, DiagramStats, text_diagram
from flowstore.domain import (
    CATALOG_ID,
    Decision,
    DomainEvent,
    FlowCatalog,
    FlowInstance,
    FlowVersions,
    define_flow,
    definition_id,
    delete_flow,
    end_flow,
    go_back,
    hand_over,
    instance_id,
    list_flow,
    start_flow,
)
from flowstore.erasure import Erasure
from flowstore.errors import (
    FlowError,
    FlowExistsError,
    FlowNotFoundError,
    FlowStateCorruptionError,
    FlowStateNotFoundError,
    InvalidArgumentError,
    InvalidTransitionError,
    StateTokenFlowError,
    StoreClosedError,
)
from flowstore.eventlog import CIPHER_KEY_ENV, EventLog, cipher_settings
from flowstore.importing import import_events
from flowstore.migration import check_step_map, migrate
from flowstore.models import (
    FlowState,
    FlowStateHistory,
    FlowStatistics,
    FlowStatus,
    FunnelStep,
    HistoryKind,
    InstancePage,
    MigrationReport,
)
from flowstore.notify import LogNotifier
from flowstore.paging import (
    MAX_PAGE,
    check_aware,
    check_kinds,
    check_limit,
    check_listed_status,
    decode_instance_cursor,
    encode_instance_cursor,
    history_bound,
    idle_seconds,
)
from flowstore.reactions import Handler
from flowstore.storage import StorageConfig, make_engine, parse_url, resolve_url
from flowstore.tokens import decode_state_token, encode_state_token, token_flow_id

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from flowstore.follow import Follower, FollowHandler
    from flowstore.projections.live import LiveProjector
    from flowstore.projections.sql import Difference, SqlProjections

__all__ = ["FlowStore", "Publisher", "PublisherFactory"]

logger = logging.getLogger(__name__)

_fork_generation = 0
"""How many times this process has been forked from its ancestors (see `_forked`)."""
_reopen_lock = threading.Lock()


def _forked() -> None:
    # In the child, at once: count the fork, and a fresh lock (the parent's may have been held by
    # a thread that does not exist here). Stores reopen lazily, on their next call.
    global _fork_generation, _reopen_lock
    _fork_generation += 1
    _reopen_lock = threading.Lock()


os.register_at_fork(after_in_child=_forked)


def _reopen(url: str, options: dict[str, Any]) -> FlowStore:
    return FlowStore(url, **options)


def _url_of(url: object) -> str | None:
    """A URL from a string, or from a path (`FlowStore(Path("x.db"))`: that SQLite file)."""
    if url is None or isinstance(url, str):
        return url
    if isinstance(url, os.PathLike):
        path = Path(os.fspath(url)).expanduser()
        return f"sqlite:///{path.resolve()}"
    raise InvalidArgumentError("url", url, "must be a URL (str) or a path to a SQLite file")


def _check_clock(clock: object) -> None:
    """The clock must tell UTC-aware time: naive times would be stored as if they were UTC."""
    if not callable(clock):
        raise InvalidArgumentError("clock", clock, "must be a callable returning a datetime")
    now = clock()
    if not isinstance(now, datetime) or now.utcoffset() is None:
        raise InvalidArgumentError(
            "clock", now, "must return timezone-aware datetimes (e.g. datetime.now(UTC))"
        )


def _utc_now() -> datetime:
    return datetime.now(UTC)


KAFKA_BOOTSTRAP_ENV = "FLOWSTORE_KAFKA_BOOTSTRAP"
"""Kafka bootstrap servers: when set, every FlowStore (unless kafka=False) publishes its log."""

PUBLISHER_ENTRY_POINTS = "flowstore.publishers"
"""Entry-point group naming publisher factories by kind (`kafka`): how `kafka=` finds its adapter
without the service importing the adapters layer."""


class Publisher(Protocol):
    """A running embedded publisher (the port the service knows an adapter by)."""

    def stop(self) -> None:
        """Drain what can be drained and stop; called by `FlowStore.close()` before anything else."""


PublisherFactory = Callable[["FlowStore"], Publisher]
"""Starts a publisher for a store: `FlowStore(publisher=factory)` calls it once, while opening."""


def _plugin_publisher(kind: str, options: Mapping[str, Any]) -> PublisherFactory:
    """The factory an installed adapter registers for `kind`, bound to `options`."""
    from importlib.metadata import entry_points

    found = entry_points(group=PUBLISHER_ENTRY_POINTS, name=kind)
    try:
        make = next(iter(found)).load()
    except (StopIteration, ImportError) as exc:
        raise FlowError(
            f"{kind} publishing needs the {kind} extra (pip install 'flowstore-es[{kind}]'): "
            f"{exc or 'no adapter registered'}"
        ) from None
    return cast(PublisherFactory, make(**options))


class FlowStore:
    """Flow definitions and every user's state in them, kept as an event log with projections.

    `FlowStore()` opens the embedded SQLite file `./flowstore.db` (or `$FLOWSTORE_URL`); pass a URL for
    another database: `sqlite:///path.db`, `postgresql://user:pw@host:port/db` or `memory://`.

    `kafka` starts an embedded publisher that sends every event to Kafka in a background thread:
    bootstrap servers (a string) or `KafkaPublisher` options (a mapping with `bootstrap`, `topic`, ...);
    None (the default) uses `$FLOWSTORE_KAFKA_BOOTSTRAP` when it is set, False never publishes.
    `publisher` is the general port: a factory called with this store that returns a running
    `Publisher` (what `flowstore.adapters.kafka.kafka_publisher(...)` gives); the store stops it
    first on `close()`.

    `pool_size` sizes the SQLAlchemy engine's pool (default: the URL's `pool_size`, else
    `$FLOWSTORE_POOL_SIZE`, else 5; as many again are opened on demand); size it to the threads
    that call the store at once.

    With `live_projections` (the default) a background thread keeps the read-model tables up to date
    with this process's writes, and table queries wait for it, so they read your writes; without
    it, a separate worker (`flowstore projections run`) does that.
    """

    def __init__(
        self,
        url: str | os.PathLike[str] | None = None,
        *,
        max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
        cipher_key: str | None = None,
        kafka: str | Mapping[str, Any] | bool | None = None,
        publisher: PublisherFactory | None = None,
        max_retries: int = 10,
        cache_size: int = 10_000,
        pool_size: int | None = None,
        statistics_window: float = 60.0,
        live_projections: bool = True,
        definition_refresh: float = 1.0,
        clock: Callable[[], datetime] = _utc_now,
    ) -> None:
        self._closed = True  # until opened: close() and the guards see a consistent store
        self._url = _url_of(url)
        self.config: StorageConfig = parse_url(resolve_url(self._url))
        _check_clock(clock)
        self.statistics_window = statistics_window
        self._clock = clock
        self.live_projections = live_projections
        # What a process that receives this store (pickled, or forked) needs to open it again.
        self._options: dict[str, Any] = {
            "max_payload_bytes": max_payload_bytes,
            "cipher_key": cipher_key,
            "max_retries": max_retries,
            "cache_size": cache_size,
            "pool_size": pool_size,
            "statistics_window": statistics_window,
            "live_projections": live_projections,
            "definition_refresh": definition_refresh,
            "clock": clock,
        }
        self._inherited: list[object] = []  # a forked child's copies of the parent's connections
        self._publisher: Publisher | None = None
        self._generation = _fork_generation
        self._open_parts()
        self._closed = False
        try:
            self._publisher = self._start_publisher(kafka, publisher)
        except BaseException:
            self.close()
            raise

    def _open_parts(self) -> None:
        """Open the event log, the write path, the tables and the live projector."""
        options = self._options
        cipher_key = options["cipher_key"]
        env = {
            **self.config.env,
            "AGGREGATE_CACHE_MAXSIZE": str(options["cache_size"]),
            # Aggregates are frozen pydantic models: a cached one cannot be corrupted by a caller,
            # so the repository need not deep-copy it on every read.
            "DEEPCOPY_FROM_AGGREGATE_CACHE": "n",
            **cipher_settings(cipher_key),
        }
        encrypted = cipher_key is not None or bool(os.environ.get(CIPHER_KEY_ENV))
        refresh = options["definition_refresh"]
        # One SQLAlchemy engine for everything of ours in the database (projections, keys,
        # trackers); eventsourcing keeps its own connections for the events.
        self._engine = make_engine(self.config, pool_size=options["pool_size"])
        try:
            self._log = EventLog(
                self.config, env, encrypted=encrypted, refresh=refresh, engine=self._engine
            )
        except BaseException:
            self._engine.dispose()
            raise
        # Imported here, not at the top: the service module loads before SQLAlchemy is needed.
        from flowstore.projections.live import LiveProjector
        from flowstore.projections.sql import SqlProjections

        self._live: LiveProjector | None = None
        self._commands = Commands(
            self._log,
            clock=self._clock,
            max_retries=options["max_retries"],
            cache_size=options["cache_size"],
            definition_refresh=refresh,
            written=self._written,
        )
        self._transitions = Transitions(
            self._commands, max_payload_bytes=options["max_payload_bytes"]
        )
        opened: list[Callable[[], None]] = [self._engine.dispose, self._log.close]
        try:
            with self._log.errors("opening the store"):
                self._projections = SqlProjections(
                    self.config, self._engine, write_lock=self._log.write_lock
                )
                opened.append(self._projections.close)
                if self.live_projections:
                    self._projections.catch_up(self._read_contained)  # what happened while away
                    self._live = LiveProjector(self._project_written)
        except BaseException:
            for close in reversed(opened):
                with contextlib.suppress(Exception):
                    close()
            raise
        self._followers: list[Follower] = []
        self._erasure = Erasure(self._commands, self._log.keys, self._project_written)
        # PostgreSQL tells of other processes' appends (LISTEN/NOTIFY): followers wake at once.
        self._notifier = LogNotifier(self.config, self._log.channel)
        if self._live is not None and self._notifier.pushes:
            self._notifier.subscribe(self._live.nudge)

    def _after_fork(self) -> None:
        """In a child process (after `fork`): open connections, projector and caches of its own.

        The parent's connections, threads and locks came along in the fork but are not the
        child's to use: a connection shared by two processes interleaves their protocol, the
        projector thread did not survive, and a lock held by another thread at the fork stays
        held. They are kept (never closed: closing a connection ends the parent's session too)
        and replaced. The parent's publisher stays the parent's.
        """
        with _reopen_lock:
            if self._generation == _fork_generation:
                return  # another thread of the child reopened it first
            # SQLAlchemy's recipe for fork: forget the pooled connections without closing them.
            self._engine.dispose(close=False)
            self._projections.abandon()
            self._inherited.append(
                (self._engine, self._log, self._projections, self._live, self._publisher)
            )
            self._publisher = None
            self._generation = _fork_generation
            try:
                self._open_parts()
            except BaseException:
                self._closed = True  # nothing of its own to use: the child must open a new store
                raise

    def __reduce__(self) -> tuple[Any, ...]:
        # Sent to another process (multiprocessing with spawn/forkserver, a process pool), a store
        # opens the same database there: the URL and options travel, connections do not.
        if self.config.backend == "memory":
            raise TypeError("a memory:// store lives in one process and cannot be pickled")
        options = {**self._options, "kafka": False}
        return (_reopen, (resolve_url(self._url), options))

    @property
    def max_retries(self) -> int:
        """How many times a command is decided again after a concurrent append before giving up."""
        return self._commands.max_retries

    @max_retries.setter
    def max_retries(self, value: int) -> None:
        self._commands.max_retries = value

    @property
    def max_payload_bytes(self) -> int:
        """The largest payload (and message) a command may carry, in bytes of its JSON."""
        return cast(int, self._options["max_payload_bytes"])

    @max_payload_bytes.setter
    def max_payload_bytes(self, value: int) -> None:
        self._options["max_payload_bytes"] = value
        self._transitions.max_payload_bytes = value

    @property
    def engine(self) -> Engine:
        """The store's SQLAlchemy engine (its tables, keys and trackers; not the event log's).

        Adapters that keep rows beside the store's (trackers, followers) use it rather than
        opening connections of their own. Its pool holds `pool_size` connections.
        """
        return self._engine

    @property
    def definition_refresh(self) -> float:
        """Seconds a transition may use a cached definition (other processes' changes)."""
        return self._commands.definition_refresh

    # Lifecycle

    def _start_publisher(
        self, kafka: str | Mapping[str, Any] | bool | None, publisher: PublisherFactory | None
    ) -> Publisher | None:
        """The embedded publisher: `publisher` if given, else Kafka's if asked for (`kafka`)."""
        if publisher is not None:
            if kafka not in (None, False):
                raise InvalidArgumentError(
                    "kafka", kafka, "pass either kafka= or publisher=, not both"
                )
            return publisher(self)
        if kafka is False:
            return None
        if kafka is None or kafka is True:
            bootstrap = os.environ.get(KAFKA_BOOTSTRAP_ENV, "")
            if not bootstrap:
                if kafka is True:
                    raise FlowError(f"kafka=True needs ${KAFKA_BOOTSTRAP_ENV}")
                return None
            options: dict[str, Any] = {"bootstrap": bootstrap}
        elif isinstance(kafka, str):
            options = {"bootstrap": kafka}
        else:
            options = dict(kafka)
        return _plugin_publisher("kafka", options)(self)

    def close(self) -> None:
        """Publish and project what is left, release connections. The store is unusable after
        (any call raises `StoreClosedError`, closing again too)."""
        if self._closed:
            raise StoreClosedError("closed again")
        if self._generation != _fork_generation:
            self._after_fork()  # a child closes its own connections, not the parent's
        try:
            for follower in self._followers:
                follower.stop()  # each finishes the event it is applying
            if self._publisher is not None:
                self._publisher.stop()  # first: it drains the log to Kafka, then releases its lock
            self._notifier.close()
            if self._live is not None:
                self._live.close()
        finally:
            self._closed = True
            self._projections.close()
            self._log.close()
            self._engine.dispose()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # Flow definitions

    def create_flow(self, definition: FlowDefinition | Mapping[str, Any]) -> str:
        """Define a new flow (version 1) and return its id; a deleted flow's id gets a new version."""
        parsed = parse_definition(definition)

        def decide() -> list[DomainEvent]:
            versions = self._log.get(definition_id(parsed.flow), FlowVersions)
            if versions is not None and not versions.deleted:
                raise FlowExistsError(parsed.flow)
            now = self._clock()
            catalog = self._log.get(CATALOG_ID, FlowCatalog)
            return [
                *define_flow(versions, parsed, now=now),
                *list_flow(catalog, parsed.flow, now=now),
            ]

        self._commands.append(decide, user_id="*", flow_id=parsed.flow)
        return parsed.flow

    def update_flow(
        self, flow_id: str, changes: FlowDefinition | Mapping[str, Any]
    ) -> FlowDefinition:
        """Make a new version: top-level keys in `changes` replace the old ones whole."""
        require_id(flow_id, "flow_id")
        if isinstance(changes, FlowDefinition):
            changes = changes.to_seed()

        def decide() -> list[DomainEvent]:
            versions = self._live_versions(flow_id)
            return define_flow(
                versions, update_definition(versions.latest, changes), now=self._clock()
            )

        self._commands.append(decide, user_id="*", flow_id=flow_id)
        return self.get_flow(flow_id)

    def delete_flow(self, flow_id: str) -> None:
        """Delete a flow: later transitions and resets on it raise `FlowNotFoundError`."""
        require_id(flow_id, "flow_id")
        self._commands.append(
            lambda: delete_flow(self._live_versions(flow_id), now=self._clock()),
            user_id="*",
            flow_id=flow_id,
        )

    def list_flows(self) -> list[FlowDefinition]:
        """The latest version of every flow that is not deleted, in order of creation."""
        catalog = self._log.get(CATALOG_ID, FlowCatalog)
        flows = []
        for flow_id in catalog.flow_ids if catalog else ():
            versions = self._log.get(definition_id(flow_id), FlowVersions)
            if versions is not None and not versions.deleted:
                flows.append(versions.latest)
        return flows

    def get_flow(self, flow_id: str, version: int | None = None) -> FlowDefinition:
        """A flow's definition: the latest version, or version `version` (numbered from 1)."""
        definition = self._live_versions(flow_id).get(version)
        if definition is None:
            raise FlowNotFoundError(
                flow_id, f"Flow {flow_id!r} has no version {version}", version=version
            )
        return definition

    # Definition changes, migration, diagrams

    def on_definition_change(self, listener: Callable[[str], None]) -> Callable[[], None]:
        """Call `listener(flow_id)` after this store creates, updates or deletes a flow definition.

        Returns a function that removes the listener. Only changes made through this store object
        are seen: a cache that other processes' changes must reach needs an expiry as well.
        """
        return self._commands.on_definition_change(listener)

    # Reacting to flows

    def on(
        self,
        event_kind: str,
        handler: Handler,
        *,
        flow: str | None = None,
        step: str | None = None,
    ) -> Callable[[], None]:
        """Call `handler(event)` after each of this store's commits of an `event_kind` event.

        Kinds: `flowstore.reactions.KINDS` (`step_entered`, `transition_taken`,
        `transition_rejected`, `flow_completed`, `flow_expired`, `flow_erased`, ...) or "*";
        `flow` and `step` narrow it down. The handler runs in the command's thread after the commit,
        outside the write transaction; what it raises is logged and the command's result stands.
        Returns a function that removes the handler. Other processes' commands are not seen: use
        `follow` for that.
        """
        return self._commands.reactions.on(event_kind, handler, flow=flow, step=step)

    def follow(
        self,
        name: str,
        handler: FollowHandler,
        *,
        page: int = 100,
        interval: float = 0.2,
        start: bool = True,
    ) -> Follower:
        """A durable follower `name`: `handler(event, connection)` once per event of the log, in order.

        The handler's writes through `connection` commit in one transaction with the follower's
        position in this store's database, so each event's effect lands exactly once across
        crashes; a restart resumes where it stopped. One process at a time follows a name (the
        others wait). With `start` (the default) it runs in a background thread until `stop()` or
        this store's `close()`; without, call its `run()` or `catch_up()`.
        """
        from flowstore.follow import Follower  # SQLAlchemy, loaded when a follower is made

        follower = Follower(
            self.config, self.read_events, name, handler, page=page, interval=interval
        )
        self._followers.append(follower)
        return follower.start() if start else follower

    def migrate_flows(
        self,
        flow_id: str,
        to_version: int,
        step_map: Mapping[str, str] | None = None,
        dry_run: bool = False,
    ) -> MigrationReport:
        """Move the flow's active instances to definition version `to_version`, one event each.

        A step `step_map` names goes where it says; any other step that exists in the target
        version maps to itself. Instances whose step maps nowhere are reported as `unmappable`
        and left alone; completed instances stay on their version. With `dry_run` nothing is
        written. Instances are found in the `flow_states` table and each move is decided again on
        the instance itself, so a user moving meanwhile is never lost.
        """
        require_id(flow_id, "flow_id")
        if isinstance(to_version, bool) or not isinstance(to_version, int):
            raise InvalidArgumentError("to_version", to_version, "must be a version number")
        target = self._live_versions(flow_id).get(to_version)
        if target is None:
            raise FlowNotFoundError(
                flow_id, f"Flow {flow_id!r} has no version {to_version}", version=to_version
            )
        mapping = check_step_map(flow_id, target, to_version, step_map)
        users = [row["user_id"] for row in self._tables.instances(flow_id, FlowStatus.ACTIVE)]
        return migrate(self._commands, flow_id, target, to_version, mapping, users, dry_run=dry_run)

    def diagram(
        self,
        flow_id: str,
        format: str = "mermaid",
        stats: bool = False,
        version: int | None = None,
    ) -> str:
        """The flow as a state diagram: Mermaid `stateDiagram-v2` (default) or Graphviz DOT text.

        With `stats`, each step is labelled with the users on it now and each transition with how
        many runs took it and its drop-off (`flowstore.diagrams`), from the statistics tables.
        """
        if format not in DIAGRAM_FORMATS:
            raise InvalidArgumentError(
                "format", format, f"must be one of {', '.join(DIAGRAM_FORMATS)}"
            )
        definition = self.get_flow(flow_id, version)
        counts = None
        if stats:
            funnel = self._tables.funnel(flow_id)
            counts = DiagramStats(
                current={step.step: step.current for step in funnel},
                entered={step.step: step.entered for step in funnel},
                taken=self._tables.transition_counts(flow_id),
            )
        return text_diagram(definition, format, counts)

    # Commands on a user's flow

    def reset_flow(
        self,
        user_id: str,
        flow_id: str,
        step: str | None = None,
        *,
        service: str | None = None,
        entity_id: str | None = None,
    ) -> FlowState:
        """Start or restart the user's run on the latest version, at `step` or the initial step.

        Where the definition marks steps `initial`, only those and the initial step may be entered
        (else `InvalidStepError`). `service` is the run's target service (the state's service for
        the whole run, whatever step it is at) and `entity_id` the entity the run is about.
        """
        require_id(user_id, "user_id")
        if step is not None:
            require_id(step, "step")
        if service is not None:
            require_id(service, "service")
        entity = check_entity(entity_id)

        def decide(instance: FlowInstance | None) -> Decision:
            definition = self._live_versions(flow_id).latest
            return Decision(
                start_flow(
                    instance,
                    definition,
                    user_id=user_id,
                    now=self._clock(),
                    step=step,
                    service=service,
                    entity_id=entity,
                )
            )

        return self._commands.change_instance(user_id, flow_id, decide).to_state()

    def execute_transition(
        self,
        user_id: str,
        flow_id: str,
        transition: str,
        payload: dict[str, Any] | None = None,
        *,
        ok: bool = True,
        message: str | None = None,
    ) -> FlowState:
        """Take `transition` from the user's current step (starting the flow first if needed).

        As in the OwlMeans model: the payload is merged into the state's (top-level keys),
        `previous` becomes the step left when the transition is reversible (else None), and `ok`
        and `message` record how the step's work went (`ok=False`: reached, but failed); a later
        transition without a message clears it. A transition the step does not offer, or a payload
        its schema refuses, is recorded as a rejected attempt, leaves the state unchanged and raises
        `InvalidTransitionError` / `PayloadValidationError`.
        """
        return self._transitions.execute_transition(
            user_id, flow_id, transition, payload, ok=ok, message=message
        )

    def advance(
        self, user_id: str, flow_id: str, payload: dict[str, Any] | None = None
    ) -> FlowState:
        """Take the first transition of the current step that the user does not choose (not
        `explicit`): the model's `next()`. `InvalidTransitionError` (nothing recorded) if none."""
        instance, definition = self._state_definition(user_id, flow_id)
        assert instance.step is not None
        offered = definition.steps[instance.step].transitions.items()
        key = next((name for name, edge in offered if not edge.explicit), None)
        if key is None:
            raise InvalidTransitionError(
                instance.step,
                "next",
                flow_id=flow_id,
                user_id=user_id,
                reason="the step offers no transition that is not explicit",
            )
        return self.execute_transition(user_id, flow_id, key, payload)

    def go_back(self, user_id: str, flow_id: str) -> FlowState:
        """Return the user to the state's `previous` step (left by a reversible transition).

        Recorded in the history as kind `back`; `InvalidTransitionError` when there is no previous
        step (or the run is complete).
        """
        require_id(user_id, "user_id")

        def decide(instance: FlowInstance | None) -> Decision:
            if instance is None or not instance.is_live:
                self._get_versions(flow_id)  # unknown flow -> FlowNotFoundError
                raise FlowStateNotFoundError(user_id, flow_id)
            definition = definition_of(instance, self._live_versions(flow_id))
            return Decision(go_back(instance, definition, now=self._clock()))

        return self._commands.change_instance(user_id, flow_id, decide).to_state()

    def get_available_transitions(
        self, user_id: str, flow_id: str, *, explicit: bool | None = None
    ) -> list[FlowTransition]:
        """The transitions the user's current step offers, in definition order.

        `explicit=True`: only those the user chooses; `False`: only the others (what `advance`
        takes). `FlowStateNotFoundError` when the user has no state in the flow.
        """
        instance, definition = self._state_definition(user_id, flow_id)
        assert instance.step is not None
        offered = list(definition.steps[instance.step].transitions.values())
        if explicit is None:
            return offered
        return [edge for edge in offered if bool(edge.explicit) == explicit]

    def state_token(self, user_id: str, flow_id: str) -> str:
        """The user's state as the OwlMeans model's state token (`serializeState`), to hand over."""
        instance, definition = self._state_definition(user_id, flow_id)
        return encode_state_token(definition, instance.to_state())

    def adopt_state_token(
        self, user_id: str, token: str, *, sender: str | None = None
    ) -> FlowState:
        """Take over a user's flow that another service handed over as a state token.

        The token is read against the flow's latest definition (a `StateTokenError` when it
        cannot be) and its state becomes the user's, recorded as history kind `handoff` with the
        sending service (`sender`, else the token's service). The token's service becomes the
        run's target service.
        """
        require_id(user_id, "user_id")
        if sender is not None:
            require_id(sender, "sender")
        flow_id = token_flow_id(token)

        def decide(instance: FlowInstance | None) -> Decision:
            try:
                definition = self._live_versions(flow_id).latest
            except (FlowNotFoundError, InvalidArgumentError):
                raise StateTokenFlowError(flow_id) from None
            state = decode_state_token(token, definition)
            if state.service:
                require_id(state.service, "service")
            check_entity(state.entity_id)
            check_message(state.message, self.max_payload_bytes)
            check_payload(state.payload, limit=self.max_payload_bytes)
            return Decision(
                hand_over(
                    instance, definition, state, user_id=user_id, sender=sender, now=self._clock()
                )
            )

        try:
            require_id(flow_id, "flow_id")
        except InvalidArgumentError:
            raise StateTokenFlowError(flow_id) from None
        return self._commands.change_instance(user_id, flow_id, decide).to_state()

    def _state_definition(self, user_id: str, flow_id: str) -> tuple[FlowInstance, FlowDefinition]:
        """The user's live instance and the definition version it runs on."""
        require_id(user_id, "user_id")
        require_id(flow_id, "flow_id")
        instance = self._log.get(instance_id(user_id, flow_id), FlowInstance)
        if instance is None or not instance.is_live:
            self._get_versions(flow_id)  # unknown flow -> FlowNotFoundError
            raise FlowStateNotFoundError(user_id, flow_id)
        return instance, definition_of(instance, self._live_versions(flow_id))

    def execute_transitions(
        self,
        requests: Iterable[tuple[str, str, str, dict[str, Any] | None]],
        *,
        batch_size: int = 500,
    ) -> list[FlowState | FlowError]:
        """Apply many (user_id, flow_id, transition, payload) requests, one transaction per batch.

        Returns, in request order, the new state or the error of each request; a rejected
        transition is recorded as in `execute_transition`, and bad input writes nothing for its own
        request only. If another writer touched one of the batch's instances meanwhile, that batch
        is applied again one request at a time (each retried as usual).
        """
        return self._transitions.execute_transitions(requests, batch_size=batch_size)

    def set_flow_states(
        self,
        updates: Iterable[tuple[str, FlowState | Mapping[str, Any]] | Mapping[str, Any]],
        *,
        batch_size: int = 500,
    ) -> list[FlowState | FlowError]:
        """Many administrative overrides in one call: the seed's batch update of flow states.

        Each update is `(user_id, state)` or the seed's `{"userId": ..., "state": {...}}`; each is
        what `set_flow_state` does, and each instance's change is atomic. They are written one
        transaction per `batch_size` (retried one by one if another writer touched an instance
        meanwhile). Returns, in order, each new state or the error of each update (bad input
        writes nothing for its own update only).
        """
        return self._transitions.set_flow_states(updates, batch_size=batch_size)

    def set_flow_state(self, user_id: str, state: FlowState | Mapping[str, Any]) -> FlowState:
        """Administrative override: put the user at `state.step` (recorded as an event).

        The instance keeps its definition version unless `state.definition_version` names another;
        a user without state starts on the latest version.
        """
        return self._transitions.set_flow_state(user_id, state)

    def clear_flow_state(self, user_id: str, flow_id: str) -> None:
        """Forget where the user stands: `get_flow_state` returns None; the history stays."""
        require_id(user_id, "user_id")

        def decide(instance: FlowInstance | None) -> Decision:
            if instance is None or not instance.is_live:
                self._get_versions(flow_id)  # unknown flow -> FlowNotFoundError
                raise FlowStateNotFoundError(user_id, flow_id)
            return Decision(end_flow(instance, now=self._clock(), kind="clear"))

        self._commands.change_instance(user_id, flow_id, decide)

    def purge_expired_flows(self) -> int:
        """Expire every active instance idle past its definition's ttl; return how many."""
        now = self._clock()
        purged = 0
        for user_id, flow_id in self._tables.expired(now):
            expired = False

            def decide(current: FlowInstance | None) -> Decision:
                # Re-checked on the instance itself: the user may have moved on since the scan.
                nonlocal expired
                expired = current is not None and is_expired(current, now)
                if not expired:
                    return Decision([])
                assert current is not None
                return Decision(end_flow(current, now=now, kind="expiry"))

            self._commands.change_instance(user_id, flow_id, decide)
            purged += expired
        return purged

    def erase_user(self, user_id: str) -> int:
        """Erase one user (crypto-shredding); return how many of their flow instances were erased.

        Appends `FlowErased` to each instance of the user (the tables delete that instance's state
        and history rows, found by instance id; the Kafka stream carries the event to other
        services), brings the tables up to date, then deletes the user's key: every event of the
        user, in the log and in any copy of it made from now on, reads with a stand-in user id
        (`erased:<subject>`) and no payload, while the log stays append-only and the statistics
        keep their (anonymous) counts. Erasing again is harmless and finishes an erasure
        interrupted half-way. The same user id may come back later: it starts afresh, under a new
        key.
        """
        require_id(user_id, "user_id")
        return self._erasure.erase_user(user_id)

    # Queries

    def get_flow_state(self, user_id: str, flow_id: str) -> FlowState | None:
        """Where the user stands in the flow, or None if they have no state in it."""
        require_id(user_id, "user_id")
        require_id(flow_id, "flow_id")
        instance = self._log.get(instance_id(user_id, flow_id), FlowInstance)
        return instance.to_state() if instance is not None and instance.is_live else None

    def get_user_flows(
        self, user_id: str, *, status: FlowStatus | str | None = None
    ) -> list[FlowState]:
        """Every flow the user has state in (active or completed, or only `status`), oldest run
        first.

        Read from the `flow_states` table; a row naming a step its definition does not have raises
        `FlowStateCorruptionError` (`recover_flow_state` rebuilds the row from the log).
        """
        require_id(user_id, "user_id")
        wanted = check_listed_status(status, default=None)
        return [self._state_of(row) for row in self._tables.user_flows(user_id, wanted)]

    def _state_of(self, row: dict[str, Any]) -> FlowState:
        versions = self._log.get(definition_id(row["flow_id"]), FlowVersions)
        definition = versions.get(row["definition_version"]) if versions else None
        if definition is None or definition.step(row["step"]) is None:
            raise FlowStateCorruptionError(
                row["user_id"],
                row["flow_id"],
                f"projected step {row['step']!r} does not exist in definition version "
                f"{row['definition_version']}",
            )
        return FlowState.model_validate({**row, "flow": row["flow_id"]})

    def list_instances(
        self,
        flow_id: str,
        *,
        step: str | None = None,
        status: FlowStatus | str | None = None,
        idle_for: timedelta | float | None = None,
        limit: int = 100,
        cursor: str | None = None,
    ) -> InstancePage:
        """The flow's instances (active by default, or `completed`), by user id, a page at a time.

        `step` keeps those at that step; `idle_for` (a timedelta or seconds) those untouched for at
        least that long ("who is stuck at verification for more than a day"). Pass the page's
        `next_cursor` as `cursor` for the next page (at most `MAX_PAGE` per page). Read from the
        `flow_states` table through its (flow, status, step, user) index.
        """
        require_id(flow_id, "flow_id")
        if step is not None:
            require_id(step, "step")
        wanted = check_listed_status(status, default=FlowStatus.ACTIVE)
        assert wanted is not None
        size = check_limit(limit, maximum=MAX_PAGE)
        if size is None:
            raise InvalidArgumentError("limit", limit, "must be a positive integer")
        idle = idle_seconds(idle_for)
        after_user = decode_instance_cursor(cursor)
        self._get_versions(flow_id)  # unknown flow -> FlowNotFoundError
        idle_since = self._clock() - timedelta(seconds=idle) if idle is not None else None
        rows = self._tables.instance_page(
            flow_id,
            status=wanted,
            step=step,
            idle_since=idle_since,
            after_user=after_user,
            limit=size + 1,  # one more: is there a next page?
        )
        states = [self._state_of(row) for row in rows[:size]]
        more = len(rows) > size
        next_cursor = encode_instance_cursor(rows[size - 1]["user_id"]) if more else None
        return InstancePage(instances=states, next_cursor=next_cursor)

    def get_flow_history(
        self,
        user_id: str,
        flow_id: str,
        *,
        limit: int | None = None,
        after: str | datetime | None = None,
        before: str | datetime | None = None,
        kinds: Iterable[HistoryKind | str] | None = None,
        max_bytes: int | None = None,
    ) -> list[FlowStateHistory]:
        """The commands on the user's flow, oldest first (empty if they never started it).

        All of them, or a page: `after`/`before` take a row's `id` (a stable cursor: the next page
        is `after=page[-1].id`) or an aware datetime (`after` inclusive, `before` exclusive);
        `limit` caps the rows (with only `before`, the ones just before it); `kinds` keeps those
        kinds (`HistoryKind`). With `max_bytes`, the rows end at the first one that brings their
        payloads and errors (as JSON and text) to more than that; it is included, so the caller
        can tell the cap was reached. The rows are read in batches, never all at once.
        """
        require_id(user_id, "user_id")
        require_id(flow_id, "flow_id")
        size = check_limit(limit)
        iid = instance_id(user_id, flow_id)
        after_version, since = history_bound(after, "after", iid)
        before_version, until = history_bound(before, "before", iid)
        wanted = check_kinds(kinds)
        rows = self._tables.history(
            user_id,
            flow_id,
            limit=size,
            after_version=after_version,
            before_version=before_version,
            since=since,
            until=until,
            kinds=wanted,
            max_bytes=max_bytes,
        )
        if not rows:
            self._get_versions(flow_id)  # unknown flow -> FlowNotFoundError
        return rows

    def get_flow_statistics(
        self,
        flow_id: str | None = None,
        *,
        since: datetime | None = None,
        until: datetime | None = None,
    ) -> FlowStatistics:
        """Usage and performance of one flow, or of all flows (read from the statistics tables).

        With `since` and/or `until` (aware datetimes; `until` defaults to now, `since` to the
        first event), over that window, to the minute, from the per-minute activity table: see
        `README.md` (Statistics) for what each figure counts in a window.
        """
        if flow_id is not None:
            self._get_versions(flow_id)
        window = self._window(since, until)
        if window is None:
            return self._tables.statistics(
                flow_id, now=self._clock(), window=self.statistics_window
            )
        return self._tables.window_statistics(flow_id, since=window[0], until=window[1])

    def _window(
        self, since: datetime | None, until: datetime | None
    ) -> tuple[datetime, datetime] | None:
        start, end = check_aware(since, "since"), check_aware(until, "until")
        if start is None and end is None:
            return None
        # Without `until`: everything so far, this very instant included (events are stamped by
        # the same clock, and a window ends before `until`).
        end = end or self._clock() + timedelta(microseconds=1)
        start = start or datetime.fromtimestamp(0, UTC)
        if start >= end:
            raise InvalidArgumentError("since", since, f"must be before until ({end.isoformat()})")
        return start, end

    def get_flow_funnel(
        self,
        flow_id: str,
        *,
        since: datetime | None = None,
        until: datetime | None = None,
    ) -> list[FunnelStep]:
        """Per step of the flow: entered, moved on, dropped, and active there now.

        With `since`/`until`, entered, moved on and dropped count only what happened in that
        window (to the minute); `current` is always now.
        """
        definition = self._get_versions(flow_id).latest
        window = self._window(since, until)
        funnel = (
            self._tables.funnel(flow_id)
            if window is None
            else self._tables.window_funnel(flow_id, since=window[0], until=window[1])
        )
        found = {step.step: step for step in funnel}
        order = sorted(definition.steps.values(), key=lambda step: step.index)
        known = [
            found.pop(
                step.step, FunnelStep(step=step.step, entered=0, moved_on=0, dropped=0, current=0)
            )
            for step in order
        ]
        return known + sorted(found.values(), key=lambda step: step.step)  # steps of old versions

    # Projections: rebuild, verify, repair, recover

    def recover_flow_state(self, user_id: str, flow_id: str) -> FlowState | None:
        """Rebuild one instance's projected state and history rows from its events."""
        require_id(user_id, "user_id")
        self._get_versions(flow_id)
        iid = instance_id(user_id, flow_id)
        self._tables.recover(
            (user_id, flow_id),
            lambda: self._log.events_of(iid),
            self._read_contained,
        )
        return self.get_flow_state(user_id, flow_id)

    def rebuild_projections(self, progress: Callable[[int, int], None] | None = None) -> int:
        """Replay the whole log into fresh tables and swap them in; return the events replayed.

        One rebuild at a time per database (across processes): another one running raises
        `RebuildRunningError`. A rebuild that fails drops its shadow tables and leaves the live
        ones as they were; a database that fails under it (a full disk) is `StorageUnavailableError`.
        """
        with self._log.errors("rebuilding the projections"):
            return self._tables.rebuild(self._read_contained, progress=progress)

    def migrate_projections(self, progress: Callable[[int, int], None] | None = None) -> int:
        """Bring the tables to this version's layout blue/green; return the events replayed.

        The old tables keep serving the processes of the previous version until the swap; 0 when
        the tables already have this layout (`ProjectionLayoutError` names the other cases).
        """
        return self._projections.migrate(self.read_events, progress=progress)

    def verify_projections(self) -> list[Difference]:
        """Every difference between the tables and the log (empty when they agree)."""
        return self._tables.verify(self._read_contained)

    def repair_projections(
        self, user_id: str | None = None, flow_id: str | None = None
    ) -> list[Difference]:
        """Rewrite exactly the rows that differ from the log; return what was repaired."""
        return self._tables.repair(self._read_contained, user_id=user_id, flow_id=flow_id)

    def catch_up_projections(self, batch: int = 1000) -> int:
        """Apply events the tables have not seen yet, `batch` per transaction; return the position."""
        return self._projections.catch_up(self._read_contained, page=batch)

    @property
    def log_notifier(self) -> LogNotifier:
        """Wakes followers of the log on other processes' appends (PostgreSQL; SQLite polls)."""
        return self._notifier

    @property
    def publisher(self) -> Publisher | None:
        """The embedded Kafka publisher (`flowstore.adapters.kafka.EmbeddedPublisher`), or None."""
        return self._publisher

    def sync_projections(self, timeout: float = 60.0) -> None:
        """Wait until the tables reflect every event this process wrote (table queries do this)."""
        if self._live is not None:
            self._live.wait(timeout)

    def projection_position(self) -> int:
        """The notification id of the last event the tables reflect."""
        return self._projections.position()

    def read_events(self, start: int, limit: int = 1000) -> list[tuple[int, DomainEvent]]:
        """Up to `limit` events of the log from notification id `start` on: (id, event) pairs.

        Ids increase in commit order (they may have gaps); page with `start = last_id + 1`. This is
        the stream publishers, pushers and auditors follow.
        """
        return self._log.read(start, limit)

    def _read_contained(self, start: int, limit: int) -> list[tuple[int, DomainEvent]]:
        # The projections' reader: an event that cannot be decoded is skipped and named (its own
        # instance answers FlowStateCorruptionError), so one bad event stops nobody else's reads.
        return self._log.read(start, limit, contain=True)

    def unreadable_events(self) -> list[dict[str, Any]]:
        """Events of the log the projections skipped because they cannot be decoded.

        Each: `position`, `originator_id`, `originator_version` and `detail` (why). Their instance
        answers `FlowStateCorruptionError` until the event is quarantined or the store restored.
        """
        return self._projections.unreadable()

    def quarantine_event(self, position: int, reason: str) -> dict[str, Any]:
        """Move the unreadable event at `position` out of the log, keeping it byte for byte.

        The event goes to the `flowstore_quarantine` table with `reason` and the time (the audit
        record, returned); its instance reads again as it was before that event. Only events the
        projections found unreadable can be quarantined: the log stays the truth for every other.
        """
        if not isinstance(position, int) or isinstance(position, bool) or position < 1:
            raise InvalidArgumentError("position", position, "must be a positive event position")
        if not isinstance(reason, str) or not reason.strip():
            raise InvalidArgumentError("reason", reason, "must say why (it is the audit record)")
        known = {row["position"] for row in self.unreadable_events()}
        if position not in known:
            raise InvalidArgumentError(
                "position", position, f"is not an unreadable event (unreadable: {sorted(known)})"
            )
        with self._log.errors("quarantining an event"):
            record = self._projections.quarantine(position, reason, self._clock())
        if record is None:
            raise InvalidArgumentError("position", position, "no such event in this store's log")
        logger.warning(
            "event %s (%s v%s) quarantined: %s",
            position, record["originator_id"], record["originator_version"], reason,
        )
        self._commands.forget_instance(UUID(record["originator_id"]))
        return {k: v for k, v in record.items() if k != "state"}

    def import_events(self, events: Iterable[DomainEvent], *, batch: int = 500) -> int:
        """Append events recorded elsewhere (a restore), as they are: same ids, versions, times.

        Each aggregate's events must come in version order without duplicates; an event whose
        version is already taken raises `ConcurrencyConflictError` and its batch is not written.
        Returns how many events were appended; projections are brought up to date at the end.
        """
        return import_events(self._commands, events, shred=self._erasure.shred, batch=batch)

    def log_position(self) -> int:
        """The notification id of the newest event in the log (0 when the log is empty)."""
        return self._log.position()

    # Internals

    def _written(self, position: int) -> None:
        if self._live is not None:
            self._live.written(position)

    def _project_written(self) -> int:
        # The projections take the log's write lock themselves, only to write (see catch_up).
        return self._projections.catch_up(self._read_contained)

    @property
    def _tables(self) -> SqlProjections:
        """The read-model tables, once they reflect everything this process wrote."""
        self.sync_projections()
        return self._projections

    def _get_versions(self, flow_id: str) -> FlowVersions:
        return self._commands.versions(flow_id)

    def _live_versions(self, flow_id: str) -> FlowVersions:
        return self._commands.live_versions(flow_id)


def _guarded(method: Callable[..., Any]) -> Callable[..., Any]:
    """`method`, refusing to run on a closed store and reopening a forked child's first."""

    @functools.wraps(method)
    def call(self: FlowStore, *args: Any, **kwargs: Any) -> Any:
        if self._closed:
            raise StoreClosedError(f"used ({method.__name__})")
        if self._generation != _fork_generation:
            self._after_fork()
        return method(self, *args, **kwargs)

    return call


# Every public method: a closed store says so (not a pool error or "no such table" from deep
# inside), and a store inherited through fork() opens its own connections before its first use.
for _name, _member in list(vars(FlowStore).items()):
    if callable(_member) and not _name.startswith("_") and _name != "close":
        setattr(FlowStore, _name, _guarded(_member))
