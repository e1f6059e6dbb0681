"""`FlowStore`: the service facade. Commands append events; queries read aggregates and the tables.

Each public method is a few lines over the modules that do the work, by concern: `flowstore.opening`
(settings, the store's parts, the publisher, reopening after fork), `flowstore.flows` (definitions),
`flowstore.instances` and `flowstore.batch` (commands on a user's flow), `flowstore.reads` (queries),
`flowstore.admin` (quarantine), `flowstore.commands` (the write path: read, decide, append, retry),
`flowstore.erasure`, `flowstore.migration`, `flowstore.importing`, the event log
(`flowstore.eventlog`) and the read-model tables (`flowstore.projections`). The decisions
themselves are pure functions in `flowstore.decisions`.
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self, cast

from flowstore import admin, flows, instances, reads
from flowstore.codec import PlainEvent
from flowstore.definitions import FlowDefinition, FlowTransition
from flowstore.domain import DomainEvent
from flowstore.errors import FlowError, InvalidArgumentError, StoreClosedError
from flowstore.importing import import_events
from flowstore.inputs import DEFAULT_MAX_PAYLOAD_BYTES, require_id
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
from flowstore.opening import (
    Parts,
    Publisher,
    check_clock,
    generation,
    kafka_publisher,
    reopening,
    url_of,
)
from flowstore.reactions import Handler
from flowstore.storage import StorageConfig, parse_url, resolve_url
from flowstore.telemetry import StoreObserver

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from flowstore.follow import Follower, FollowHandler
    from flowstore.projections.sql import Difference, SqlProjections

__all__ = ["FlowStore", "Publisher", "PublisherFactory"]

PublisherFactory = Callable[["FlowStore"], Publisher]
"""Starts a publisher for a store: `FlowStore(publisher=factory)` calls it once, while opening."""


def _reopen(url: str, options: dict[str, Any]) -> FlowStore:
    return FlowStore(url, **options)


_utc_now: Callable[[], datetime] = functools.partial(datetime.now, UTC)
"""The default clock: `datetime.now(UTC)`, called without a Python function around it (every
command reads it)."""


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
        self._url = url_of(url)
        self.config: StorageConfig = parse_url(resolve_url(self._url))
        check_clock(clock)
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
        self._generation = generation()
        self._parts = Parts(self.config, self._options, clock)
        self._closed = False
        try:
            self._publisher = self._start_publisher(kafka, publisher)
        except BaseException:
            self.close()
            raise

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
        factory = kafka_publisher(kafka)
        return factory(self) if factory is not None else None

    def _after_fork(self) -> None:
        """In a child process (after `fork`): open connections, projector and caches of its own.

        The parent's connections, threads and locks came along in the fork but are not the
        child's to use: a connection shared by two processes interleaves their protocol, the
        projector thread did not survive, and a lock held by another thread at the fork stays
        held. They are kept (never closed: closing a connection ends the parent's session too)
        and replaced. The parent's publisher stays the parent's.
        """
        with reopening():
            if self._generation == generation():
                return  # another thread of the child reopened it first
            self._parts.abandon()
            self._inherited.append((self._parts, self._publisher))
            self._publisher = None
            self._generation = generation()
            try:
                self._parts = Parts(self.config, self._options, self._clock)
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
        return self._parts.commands.max_retries

    @max_retries.setter
    def max_retries(self, value: int) -> None:
        self._options["max_retries"] = value
        self._parts.commands.max_retries = value

    @property
    def max_payload_bytes(self) -> int:
        """The largest payload (and message) a command may carry, in bytes of its JSON."""
        return cast(int, self._options["max_payload_bytes"])

    @max_payload_bytes.setter
    def max_payload_bytes(self, value: int) -> None:
        self._options["max_payload_bytes"] = value
        self._parts.transitions.max_payload_bytes = value

    @property
    def engine(self) -> Engine:
        """The store's SQLAlchemy engine (its tables, keys and trackers; not the event log's).

        Adapters that keep rows beside the store's (trackers, followers) use it rather than
        opening connections of their own. Its pool holds `pool_size` connections.
        """
        return self._parts.engine

    @property
    def definition_refresh(self) -> float:
        """Seconds a transition may use a cached definition (other processes' changes)."""
        return self._parts.commands.definition_refresh

    # Lifecycle

    def close(self) -> None:
        """Publish and project what is left, release connections. The store is unusable after
        (any call raises `StoreClosedError`, closing again too)."""
        if self._closed:
            raise StoreClosedError("closed again")
        if self._generation != generation():
            self._after_fork()  # a child closes its own connections, not the parent's
        try:
            self._parts.stop_followers()
            if self._publisher is not None:
                self._publisher.stop()  # first: it drains the log to Kafka, then releases its lock
        finally:
            self._closed = True
            self._parts.close()

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
        return flows.create_flow(self._parts, definition)

    def update_flow(
        self, flow_id: str, changes: FlowDefinition | Mapping[str, Any]
    ) -> FlowDefinition:
        """Make a new version: top-level keys in `changes` replace the old ones whole."""
        return flows.update_flow(self._parts, flow_id, changes)

    def delete_flow(self, flow_id: str) -> None:
        """Delete a flow: later transitions and resets on it raise `FlowNotFoundError`."""
        flows.remove_flow(self._parts, flow_id)

    def list_flows(self) -> list[FlowDefinition]:
        """The latest version of every flow that is not deleted, in order of creation."""
        return flows.list_flows(self._parts)

    def get_flow(self, flow_id: str, version: int | None = None) -> FlowDefinition:
        """A flow's definition: the latest version, or version `version` (numbered from 1)."""
        return flows.get_flow(self._parts, flow_id, version)

    # Definition changes, migration, diagrams

    def on_definition_change(self, listener: Callable[[str], None]) -> Callable[[], None]:
        """Call `listener(flow_id)` after this store creates, updates or deletes a flow definition.

        Returns a function that removes the listener. Only changes made through this store object
        are seen: a cache that other processes' changes must reach needs an expiry as well.
        """
        return self._parts.commands.on_definition_change(listener)

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
        return self._parts.commands.reactions.on(event_kind, handler, flow=flow, step=step)

    def add_observer(self, observer: StoreObserver) -> Callable[[], None]:
        """Tell `observer` about this store's commands, rebuilds, expiry and spans; returns its remover.

        The hooks are in `flowstore.telemetry.StoreObserver`; `flowstore.adapters.metrics` and
        `flowstore.adapters.tracing` provide Prometheus and OpenTelemetry observers. They hear
        this process's work only (every caller of this store: library, CLI, HTTP, worker).
        """
        return self._parts.commands.observers.add(observer)

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
        follower = self._parts.follow(self.read_events, name, handler, page=page, interval=interval)
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
        return flows.migrate_flows(self._parts, flow_id, to_version, step_map, dry_run)

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
        return flows.diagram(self._parts, flow_id, format, stats, version)

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
        return instances.reset_flow(
            self._parts, user_id, flow_id, step, service=service, entity_id=entity_id
        )

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
        return self._parts.transitions.execute_transition(
            user_id, flow_id, transition, payload, ok=ok, message=message
        )

    def advance(
        self, user_id: str, flow_id: str, payload: dict[str, Any] | None = None
    ) -> FlowState:
        """Take the first transition of the current step that the user does not choose (not
        `explicit`): the model's `next()`. `InvalidTransitionError` (nothing recorded) if none."""
        return instances.advance(self._parts, user_id, flow_id, payload)

    def go_back(self, user_id: str, flow_id: str) -> FlowState:
        """Return the user to the state's `previous` step (left by a reversible transition).

        Recorded in the history as kind `back`; `InvalidTransitionError` when there is no previous
        step (or the run is complete).
        """
        return instances.return_back(self._parts, user_id, flow_id)

    def get_available_transitions(
        self, user_id: str, flow_id: str, *, explicit: bool | None = None
    ) -> list[FlowTransition]:
        """The transitions the user's current step offers, in definition order.

        `explicit=True`: only those the user chooses; `False`: only the others (what `advance`
        takes). `FlowStateNotFoundError` when the user has no state in the flow.
        """
        return instances.available_transitions(self._parts, user_id, flow_id, explicit)

    def state_token(self, user_id: str, flow_id: str) -> str:
        """The user's state as the OwlMeans model's state token (`serializeState`), to hand over."""
        return instances.state_token(self._parts, user_id, flow_id)

    def adopt_state_token(
        self, user_id: str, token: str, *, sender: str | None = None
    ) -> FlowState:
        """Take over a user's flow that another service handed over as a state token.

        The token is read against the flow's latest definition (a `StateTokenError` when it
        cannot be) and its state becomes the user's, recorded as history kind `handoff` with the
        sending service (`sender`, else the token's service). The token's service becomes the
        run's target service.
        """
        return instances.adopt_state_token(self._parts, user_id, token, sender=sender)

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
        return self._parts.transitions.execute_transitions(requests, batch_size=batch_size)

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
        return self._parts.transitions.set_flow_states(updates, batch_size=batch_size)

    def set_flow_state(self, user_id: str, state: FlowState | Mapping[str, Any]) -> FlowState:
        """Administrative override: put the user at `state.step` (recorded as an event).

        The instance keeps its definition version unless `state.definition_version` names another;
        a user without state starts on the latest version.
        """
        return self._parts.transitions.set_flow_state(user_id, state)

    def clear_flow_state(self, user_id: str, flow_id: str) -> None:
        """Forget where the user stands: `get_flow_state` returns None; the history stays."""
        instances.clear_flow_state(self._parts, user_id, flow_id)

    def purge_expired_flows(self) -> int:
        """Expire every active instance idle past its definition's ttl; return how many."""
        return instances.purge_expired_flows(self._parts)

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
        return self._parts.erasure.erase_user(user_id)

    # Queries

    def get_flow_state(self, user_id: str, flow_id: str) -> FlowState | None:
        """Where the user stands in the flow, or None if they have no state in it."""
        return reads.get_flow_state(self._parts, user_id, flow_id)

    def get_user_flows(
        self, user_id: str, *, status: FlowStatus | str | None = None
    ) -> list[FlowState]:
        """Every flow the user has state in (active or completed, or only `status`), oldest run
        first.

        Read from the `flow_states` table; a row naming a step its definition does not have raises
        `FlowStateCorruptionError` (`recover_flow_state` rebuilds the row from the log).
        """
        return reads.get_user_flows(self._parts, user_id, status)

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
        return reads.list_instances(
            self._parts,
            flow_id,
            step=step,
            status=status,
            idle_for=idle_for,
            limit=limit,
            cursor=cursor,
        )

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
        return reads.get_flow_history(
            self._parts,
            user_id,
            flow_id,
            limit=limit,
            after=after,
            before=before,
            kinds=kinds,
            max_bytes=max_bytes,
        )

    def get_flow_statistics(
        self,
        flow_id: str | None = None,
        *,
        since: datetime | None = None,
        until: datetime | None = None,
    ) -> FlowStatistics:
        """Usage and performance of one flow, or of all flows (read from the statistics tables).

        With `since` and/or `until` (aware datetimes; `until` defaults to now, `since` to the
        first event), over that window, to the minute, from the activity table (its minute and
        hour rows): see `README.md` (Statistics) for what each figure counts in a window.
        """
        return reads.get_flow_statistics(
            self._parts, flow_id, since=since, until=until, window=self.statistics_window
        )

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
        return reads.get_flow_funnel(self._parts, flow_id, since=since, until=until)

    # Projections: rebuild, verify, repair, recover

    def recover_flow_state(self, user_id: str, flow_id: str) -> FlowState | None:
        """Rebuild one instance's projected state and history rows from its events."""
        return reads.recover_flow_state(self._parts, user_id, flow_id)

    def rebuild_projections(self, progress: Callable[[int, int], None] | None = None) -> int:
        """Replay the whole log into fresh tables and swap them in; return the events replayed.

        One rebuild at a time per database (across processes): another one running raises
        `RebuildRunningError`. A rebuild that fails drops its shadow tables and leaves the live
        ones as they were; a database that fails under it (a full disk) is `StorageUnavailableError`.
        """
        parts = self._parts
        with (
            parts.log.errors("rebuilding the projections"),
            parts.rebuilding(progress) as told,
            parts.reading_ahead() as read,
        ):
            return parts.tables.rebuild(read, progress=told)

    def migrate_projections(self, progress: Callable[[int, int], None] | None = None) -> int:
        """Bring the tables to this version's layout blue/green; return the events replayed.

        The old tables keep serving the processes of the previous version until the swap; 0 when
        the tables already have this layout (`ProjectionLayoutError` names the other cases).
        """
        with self._parts.rebuilding(progress) as told:
            return self._parts.projections.migrate(self.read_events, progress=told)

    def verify_projections(self) -> list[Difference]:
        """Every difference between the tables and the log (empty when they agree)."""
        return self._parts.tables.verify(self._parts.read_contained)

    def repair_projections(
        self, user_id: str | None = None, flow_id: str | None = None
    ) -> list[Difference]:
        """Rewrite exactly the rows that differ from the log; return what was repaired."""
        return self._parts.tables.repair(
            self._parts.read_contained, user_id=user_id, flow_id=flow_id
        )

    def catch_up_projections(
        self, batch: int = 1000, *, stop: threading.Event | None = None
    ) -> int:
        """Apply events the tables have not seen yet, `batch` per transaction; return the position.

        Once `stop` is set, it returns after the batch in progress (each batch commits whole).
        """
        parts = self._parts
        return parts.projections.catch_up(
            parts.read_contained, page=batch, projected=parts.projected(), stop=stop
        )

    @property
    def log_notifier(self) -> LogNotifier:
        """Wakes followers of the log on other processes' appends (PostgreSQL; SQLite polls)."""
        return self._parts.notifier

    @property
    def publisher(self) -> Publisher | None:
        """The embedded Kafka publisher (`flowstore.adapters.kafka.EmbeddedPublisher`), or None."""
        return self._publisher

    def sync_projections(self, timeout: float = 60.0) -> None:
        """Wait until the tables reflect every event this process wrote (table queries do this)."""
        self._parts.sync(timeout)

    def projection_position(self) -> int:
        """The notification id of the last event the tables reflect."""
        return self._parts.projections.position()

    def read_events(self, start: int, limit: int = 1000) -> list[tuple[int, DomainEvent]]:
        """Up to `limit` events of the log from notification id `start` on: (id, event) pairs.

        Ids increase in commit order (they may have gaps); page with `start = last_id + 1`. This is
        the stream publishers, pushers and auditors follow.
        """
        return self._parts.log.read(start, limit)

    def read_plain_events(self, start: int, limit: int = 1000) -> list[tuple[int, PlainEvent]]:
        """`read_events` with each event as plain data, `(class name, fields)`: the fields the
        event would have, without building it (several times faster; for publishers)."""
        return self._parts.log.read(start, limit, plain=True)

    def unreadable_events(self) -> list[dict[str, Any]]:
        """Events of the log the projections skipped because they cannot be decoded.

        Each: `position`, `originator_id`, `originator_version` and `detail` (why). Their instance
        answers `FlowStateCorruptionError` until the event is quarantined or the store restored.
        """
        return self._parts.projections.unreadable()

    def quarantine_event(self, position: int, reason: str) -> dict[str, Any]:
        """Move the unreadable event at `position` out of the log, keeping it byte for byte.

        The event goes to the `flowstore_quarantine` table with `reason` and the time (the audit
        record, returned); its instance reads again as it was before that event. Only events the
        projections found unreadable can be quarantined: the log stays the truth for every other.
        """
        return admin.quarantine_event(self._parts, position, reason)

    def import_events(self, events: Iterable[DomainEvent], *, batch: int = 500) -> int:
        """Append events recorded elsewhere (a restore), as they are: same ids, versions, times.

        Each aggregate's events must come in version order without duplicates; an event whose
        version is already taken raises `ConcurrencyConflictError` and its batch is not written.
        Returns how many events were appended; projections are brought up to date at the end.
        """
        return import_events(
            self._parts.commands, events, shred=self._parts.erasure.shred, batch=batch
        )

    def log_position(self) -> int:
        """The notification id of the newest event in the log (0 when the log is empty)."""
        return self._parts.log.position()

    def read_model(self) -> SqlProjections:
        """The read-model tables, once they reflect every event this process wrote.

        For queries the store does not offer (the console's time buckets, dwell and idle runs):
        `flowstore.projections.sql.SqlProjections`' query methods; read only, never write.
        """
        return self._parts.tables


def _guarded(method: Callable[..., Any]) -> Callable[..., Any]:
    """`method`, refusing to run on a closed store and reopening a forked child's first."""

    @functools.wraps(method)
    def call(self: FlowStore, *args: Any, **kwargs: Any) -> Any:
        if self._closed:
            raise StoreClosedError(f"used ({method.__name__})")
        if self._generation != generation():
            self._after_fork()
        return method(self, *args, **kwargs)

    return call


# Every public method: a closed store says so (not a pool error or "no such table" from deep
# inside), and a store inherited through fork() opens its own connections before its first use.
for _name, _member in list(vars(FlowStore).items()):
    if callable(_member) and not _name.startswith("_") and _name != "close":
        setattr(FlowStore, _name, _guarded(_member))
