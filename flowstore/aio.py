"""`AsyncFlowStore`: every call of `FlowStore` as a coroutine, for asyncio applications.

Each call runs on a small pool of worker threads owned by the async store, never on the event loop.
Why threads, not async drivers: the event log is eventsourcing's recorder (sqlite3 and psycopg's
synchronous pool), the commands hold a process-wide write lock on SQLite and the projections run in
their own thread; there is no async recorder for eventsourcing 9.5, and a command is a handful of
short statements, so the price of a thread hop is small against the commit it waits for.

The pool is sized to the store's connection pool (`worker_threads`): never more threads than
connections kept (a call waiting too long for a connection fails), and no more than the database
can use at once, since every extra thread also takes the GIL from the event loop.

Cancellation: a call cancelled while it waits for a worker never runs; a call cancelled while it runs
finishes in its thread (a command commits whole or not at all) and its result is dropped. Nothing is
ever half-written.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import inspect
import logging
import os
import threading
from collections.abc import Awaitable, Callable, Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime, timedelta
from types import TracebackType
from typing import TYPE_CHECKING, Any, ParamSpec, Self, TypeAlias, TypeVar

from flowstore.codec import PlainEvent
from flowstore.definitions import FlowDefinition, FlowTransition
from flowstore.domain import DomainEvent, InstanceEvent
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
from flowstore.reactions import Handler
from flowstore.storage import POOL_SIZE_ENV, StorageConfig
from flowstore.store import FlowStore, Publisher
from flowstore.telemetry import StoreObserver

if TYPE_CHECKING:
    from sqlalchemy import Connection, Engine

    from flowstore.errors import FlowError
    from flowstore.follow import Follower, FollowHandler
    from flowstore.projections.sql import Difference, SqlProjections

__all__ = [
    "AsyncFlowStore",
    "AsyncFollowHandler",
    "AsyncFollower",
    "AsyncHandler",
    "worker_threads",
]

AsyncFollowHandler: TypeAlias = "Callable[[DomainEvent, Connection], Awaitable[object]]"
"""A follower's handler as a coroutine function: `async def handler(event, connection)`."""

AsyncHandler: TypeAlias = "Callable[[InstanceEvent], Awaitable[object]]"
"""An `on` reaction as a coroutine function: `async def handler(event)`."""

_log = logging.getLogger(__name__)


def _log_failure(handler: object, event: InstanceEvent, future: Future[object]) -> None:
    """Log what a coroutine reaction raised (the command that caused it has returned)."""
    if not future.cancelled() and future.exception() is not None:
        _log.error(
            "reaction %r to %s failed", handler, type(event).__name__, exc_info=future.exception()
        )


P = ParamSpec("P")
R = TypeVar("R")

# eventsourcing's PostgreSQL pool keeps POSTGRES_POOL_SIZE connections (default 5) and opens up to
# POSTGRES_MAX_OVERFLOW more for bursts. The pool is sized to the connections kept: appends are
# serialised by the recorder's table lock anyway, and more threads only take the GIL from the event
# loop (benchmarks/aio.py, 100 handlers: 5 threads p99 gap 9 ms at 83 handlers/s, 15 threads
# 20 ms at 65/s).
_PG_POOL_SIZE = 5
# A SQLite file has one writer at a time: two threads let a read or the next command's decoding
# overlap a commit; more only contend for the GIL (2 threads: p99 gap 9 ms at 138 handlers/s;
# 5 threads: 22 ms at 174/s).
_SQLITE_THREADS = 2
# memory:// keeps everything on one shared connection: a second thread would only wait for it.
_MEMORY_THREADS = 1


def worker_threads(config: StorageConfig) -> int:
    """How many calls `AsyncFlowStore` runs at once by default, from the store's connection pool."""
    if config.backend == "postgres":
        size = config.env.get("POSTGRES_POOL_SIZE") or os.environ.get(POOL_SIZE_ENV)
        return max(1, int(size or _PG_POOL_SIZE))
    if config.backend == "sqlite":
        return _SQLITE_THREADS
    return _MEMORY_THREADS


class AsyncFollower:
    """A durable follower (`flowstore.follow.Follower`) driven from asyncio."""

    def __init__(self, follower: Follower) -> None:
        self.follower = follower
        """The follower (its thread, position and lock)."""

    @property
    def name(self) -> str:
        """The follower's name."""
        return self.follower.name

    async def position(self) -> int:
        """The notification id of the last event applied."""
        return await asyncio.to_thread(self.follower.position)

    async def catch_up(self) -> int:
        """Apply every event the log holds now; return how many."""
        return await asyncio.to_thread(self.follower.catch_up)

    async def stop(self) -> None:
        """Stop once the event being applied commits or rolls back, and release the name."""
        await asyncio.shield(asyncio.to_thread(self.follower.stop))

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


class AsyncFlowStore:
    """`FlowStore` for asyncio: the same calls, arguments, results and errors, as coroutines.

    `AsyncFlowStore(url, **options)` opens a `FlowStore(url, **options)` (opening reads the database:
    do it at startup, or `await AsyncFlowStore.open(...)`); `AsyncFlowStore.wrap(store)` serves an
    open one. `threads` overrides the worker pool size (`worker_threads`). Use it as an async
    context manager, or `await store.close()`.
    """

    def __init__(
        self, url: str | None = None, *, threads: int | None = None, **options: Any
    ) -> None:
        self._init(FlowStore(url, **options), threads)

    def _init(self, store: FlowStore, threads: int | None) -> None:
        self.store = store
        """The synchronous store every call runs on."""
        self.threads = threads if threads is not None else worker_threads(store.config)
        """How many calls run at once."""
        self._executor = ThreadPoolExecutor(self.threads, thread_name_prefix="flowstore-aio")

    @classmethod
    def wrap(cls, store: FlowStore, *, threads: int | None = None) -> AsyncFlowStore:
        """An async store over an open `store` (closing the async store closes `store`)."""
        wrapped = cls.__new__(cls)
        wrapped._init(store, threads)
        return wrapped

    @classmethod
    async def open(
        cls, url: str | None = None, *, threads: int | None = None, **options: Any
    ) -> AsyncFlowStore:
        """Open a store without blocking the event loop (opening catches the tables up)."""
        store = await asyncio.to_thread(functools.partial(FlowStore, url, **options))
        return cls.wrap(store, threads=threads)

    async def _run(self, call: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
        """Run `call` on a worker thread; see the module docstring for cancellation."""
        loop = asyncio.get_running_loop()
        context = contextvars.copy_context()  # as asyncio.to_thread does: logging context etc.
        bound = functools.partial(context.run, call, *args, **kwargs)
        return await loop.run_in_executor(self._executor, bound)

    # Lifecycle

    async def close(self) -> None:
        """Let running calls finish, then close the store (`FlowStore.close`)."""

        def close() -> None:
            self._executor.shutdown(wait=True)
            self.store.close()

        # Shielded: a cancelled close would leave the store open and its threads running.
        await asyncio.shield(asyncio.to_thread(close))

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    @property
    def config(self) -> StorageConfig:
        """The store's parsed database URL."""
        return self.store.config

    @property
    def engine(self) -> Engine:
        """The store's SQLAlchemy engine (`FlowStore.engine`); blocking: use it in a worker thread."""
        return self.store.engine

    @property
    def max_retries(self) -> int:
        """How many times a command is decided again after a concurrent append (`FlowStore.max_retries`)."""
        return self.store.max_retries

    @max_retries.setter
    def max_retries(self, value: int) -> None:
        self.store.max_retries = value

    @property
    def max_payload_bytes(self) -> int:
        """The largest payload (and message) a command may carry (`FlowStore.max_payload_bytes`)."""
        return self.store.max_payload_bytes

    @max_payload_bytes.setter
    def max_payload_bytes(self, value: int) -> None:
        self.store.max_payload_bytes = value

    @property
    def definition_refresh(self) -> float:
        """Seconds a transition may use a cached definition (`FlowStore.definition_refresh`)."""
        return self.store.definition_refresh

    @property
    def publisher(self) -> Publisher | None:
        """The embedded Kafka publisher, or None (`FlowStore.publisher`)."""
        return self.store.publisher

    @property
    def log_notifier(self) -> LogNotifier:
        """Wakes followers of the log on other processes' appends (`FlowStore.log_notifier`)."""
        return self.store.log_notifier

    def on_definition_change(self, listener: Callable[[str], None]) -> Callable[[], None]:
        """Register `listener` (`FlowStore.on_definition_change`); registering does no I/O."""
        return self.store.on_definition_change(listener)

    def add_observer(self, observer: StoreObserver) -> Callable[[], None]:
        """Register `observer` (`FlowStore.add_observer`); registering does no I/O."""
        return self.store.add_observer(observer)

    def on(
        self,
        event_kind: str,
        handler: Handler | AsyncHandler,
        *,
        flow: str | None = None,
        step: str | None = None,
    ) -> Callable[[], None]:
        """Register an in-process reaction (`FlowStore.on`); `handler` may be a coroutine function.

        A plain handler runs on the worker thread after the commit. A coroutine handler is
        scheduled on the event loop current at registration (the command does not wait for it);
        what it raises is logged.
        """
        call: Handler
        if inspect.iscoroutinefunction(handler):
            loop = asyncio.get_running_loop()
            coroutine_handler = handler

            def call(event: InstanceEvent) -> None:
                future = asyncio.run_coroutine_threadsafe(coroutine_handler(event), loop)
                future.add_done_callback(functools.partial(_log_failure, handler, event))

        else:
            call = handler
        return self.store.on(event_kind, call, flow=flow, step=step)

    async def follow(
        self,
        name: str,
        handler: FollowHandler | AsyncFollowHandler,
        *,
        page: int = 100,
        interval: float = 0.2,
        start: bool = True,
    ) -> AsyncFollower:
        """A durable follower (`FlowStore.follow`); `handler` may be a coroutine function.

        A coroutine handler runs on this event loop while the follower's thread holds the event's
        transaction open: it may await (an HTTP call, say) and write through the connection; its
        writes commit with the follower's position.
        """
        loop = asyncio.get_running_loop()
        call: FollowHandler
        if inspect.iscoroutinefunction(handler):
            coroutine_handler = handler

            def call(event: DomainEvent, connection: Connection) -> object:
                future = asyncio.run_coroutine_threadsafe(
                    coroutine_handler(event, connection), loop
                )
                return future.result()

        else:
            call = handler
        follower = await self._run(
            self.store.follow, name, call, page=page, interval=interval, start=start
        )
        return AsyncFollower(follower)

    # Flow definitions

    async def create_flow(self, definition: FlowDefinition | Mapping[str, Any]) -> str:
        """Define a new flow (`FlowStore.create_flow`)."""
        return await self._run(self.store.create_flow, definition)

    async def update_flow(
        self, flow_id: str, changes: FlowDefinition | Mapping[str, Any]
    ) -> FlowDefinition:
        """Make a new version of a flow (`FlowStore.update_flow`)."""
        return await self._run(self.store.update_flow, flow_id, changes)

    async def delete_flow(self, flow_id: str) -> None:
        """Delete a flow (`FlowStore.delete_flow`)."""
        return await self._run(self.store.delete_flow, flow_id)

    async def list_flows(self) -> list[FlowDefinition]:
        """The latest version of every flow (`FlowStore.list_flows`)."""
        return await self._run(self.store.list_flows)

    async def get_flow(self, flow_id: str, version: int | None = None) -> FlowDefinition:
        """A flow's definition (`FlowStore.get_flow`)."""
        return await self._run(self.store.get_flow, flow_id, version)

    async def migrate_flows(
        self,
        flow_id: str,
        to_version: int,
        step_map: Mapping[str, str] | None = None,
        dry_run: bool = False,
    ) -> MigrationReport:
        """Move a flow's active instances to another version (`FlowStore.migrate_flows`)."""
        return await self._run(self.store.migrate_flows, flow_id, to_version, step_map, dry_run)

    async def diagram(
        self,
        flow_id: str,
        format: str = "mermaid",
        stats: bool = False,
        version: int | None = None,
    ) -> str:
        """The flow as a state diagram (`FlowStore.diagram`)."""
        return await self._run(self.store.diagram, flow_id, format, stats, version)

    # Commands

    async def reset_flow(
        self,
        user_id: str,
        flow_id: str,
        step: str | None = None,
        *,
        service: str | None = None,
        entity_id: str | None = None,
    ) -> FlowState:
        """Start or restart the user's run (`FlowStore.reset_flow`)."""
        return await self._run(
            self.store.reset_flow, user_id, flow_id, step, service=service, entity_id=entity_id
        )

    async def execute_transition(
        self,
        user_id: str,
        flow_id: str,
        transition: str,
        payload: dict[str, Any] | None = None,
        *,
        ok: bool = True,
        message: str | None = None,
    ) -> FlowState:
        """Take a transition from the user's current step (`FlowStore.execute_transition`)."""
        return await self._run(
            self.store.execute_transition,
            user_id,
            flow_id,
            transition,
            payload,
            ok=ok,
            message=message,
        )

    async def advance(
        self, user_id: str, flow_id: str, payload: dict[str, Any] | None = None
    ) -> FlowState:
        """Take the step's first transition the user does not choose (`FlowStore.advance`)."""
        return await self._run(self.store.advance, user_id, flow_id, payload)

    async def go_back(self, user_id: str, flow_id: str) -> FlowState:
        """Return the user to the `previous` step (`FlowStore.go_back`)."""
        return await self._run(self.store.go_back, user_id, flow_id)

    async def get_available_transitions(
        self, user_id: str, flow_id: str, *, explicit: bool | None = None
    ) -> list[FlowTransition]:
        """The transitions the user's current step offers (`FlowStore.get_available_transitions`)."""
        return await self._run(
            self.store.get_available_transitions, user_id, flow_id, explicit=explicit
        )

    async def state_token(self, user_id: str, flow_id: str) -> str:
        """The user's state as an OwlMeans state token (`FlowStore.state_token`)."""
        return await self._run(self.store.state_token, user_id, flow_id)

    async def adopt_state_token(
        self, user_id: str, token: str, *, sender: str | None = None
    ) -> FlowState:
        """Take over a flow handed over as a state token (`FlowStore.adopt_state_token`)."""
        return await self._run(self.store.adopt_state_token, user_id, token, sender=sender)

    async def execute_transitions(
        self,
        requests: Iterable[tuple[str, str, str, dict[str, Any] | None]],
        *,
        batch_size: int = 500,
    ) -> list[FlowState | FlowError]:
        """Apply many transitions in batches (`FlowStore.execute_transitions`)."""
        return await self._run(self.store.execute_transitions, requests, batch_size=batch_size)

    async def set_flow_state(self, user_id: str, state: FlowState | Mapping[str, Any]) -> FlowState:
        """Administrative override of a user's step (`FlowStore.set_flow_state`)."""
        return await self._run(self.store.set_flow_state, user_id, state)

    async def set_flow_states(
        self,
        updates: Iterable[tuple[str, FlowState | Mapping[str, Any]] | Mapping[str, Any]],
        *,
        batch_size: int = 500,
    ) -> list[FlowState | FlowError]:
        """Many administrative overrides in one call (`FlowStore.set_flow_states`)."""
        return await self._run(self.store.set_flow_states, updates, batch_size=batch_size)

    async def clear_flow_state(self, user_id: str, flow_id: str) -> None:
        """Forget where the user stands (`FlowStore.clear_flow_state`)."""
        return await self._run(self.store.clear_flow_state, user_id, flow_id)

    async def purge_expired_flows(self) -> int:
        """Expire idle instances (`FlowStore.purge_expired_flows`)."""
        return await self._run(self.store.purge_expired_flows)

    async def erase_user(self, user_id: str) -> int:
        """Erase one user by crypto-shredding (`FlowStore.erase_user`)."""
        return await self._run(self.store.erase_user, user_id)

    # Queries

    async def get_flow_state(self, user_id: str, flow_id: str) -> FlowState | None:
        """Where the user stands in the flow (`FlowStore.get_flow_state`)."""
        return await self._run(self.store.get_flow_state, user_id, flow_id)

    async def get_user_flows(
        self, user_id: str, *, status: FlowStatus | str | None = None
    ) -> list[FlowState]:
        """Every flow the user has state in (`FlowStore.get_user_flows`)."""
        return await self._run(self.store.get_user_flows, user_id, status=status)

    async def list_instances(
        self,
        flow_id: str,
        *,
        step: str | None = None,
        status: FlowStatus | str | None = None,
        idle_for: timedelta | float | None = None,
        limit: int = 100,
        cursor: str | None = None,
    ) -> InstancePage:
        """A page of the flow's instances (`FlowStore.list_instances`)."""
        return await self._run(
            self.store.list_instances,
            flow_id,
            step=step,
            status=status,
            idle_for=idle_for,
            limit=limit,
            cursor=cursor,
        )

    async def get_flow_history(
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
        """Commands on the user's flow, oldest first (`FlowStore.get_flow_history`)."""
        return await self._run(
            self.store.get_flow_history,
            user_id,
            flow_id,
            limit=limit,
            after=after,
            before=before,
            kinds=kinds,
            max_bytes=max_bytes,
        )

    async def get_flow_statistics(
        self,
        flow_id: str | None = None,
        *,
        since: datetime | None = None,
        until: datetime | None = None,
    ) -> FlowStatistics:
        """Usage and performance (`FlowStore.get_flow_statistics`)."""
        return await self._run(self.store.get_flow_statistics, flow_id, since=since, until=until)

    async def get_flow_funnel(
        self, flow_id: str, *, since: datetime | None = None, until: datetime | None = None
    ) -> list[FunnelStep]:
        """Per step: entered, moved on, dropped, active (`FlowStore.get_flow_funnel`)."""
        return await self._run(self.store.get_flow_funnel, flow_id, since=since, until=until)

    async def recover_flow_state(self, user_id: str, flow_id: str) -> FlowState | None:
        """Rebuild one instance's rows from its events (`FlowStore.recover_flow_state`)."""
        return await self._run(self.store.recover_flow_state, user_id, flow_id)

    # Projections and the log

    async def rebuild_projections(self, progress: Callable[[int, int], None] | None = None) -> int:
        """Replay the log into fresh tables (`FlowStore.rebuild_projections`); `progress` runs on a worker thread."""
        return await self._run(self.store.rebuild_projections, progress)

    async def migrate_projections(self, progress: Callable[[int, int], None] | None = None) -> int:
        """Bring the tables to this version's layout blue/green (`FlowStore.migrate_projections`)."""
        return await self._run(self.store.migrate_projections, progress)

    async def verify_projections(self) -> list[Difference]:
        """Differences between the tables and the log (`FlowStore.verify_projections`)."""
        return await self._run(self.store.verify_projections)

    async def repair_projections(
        self, user_id: str | None = None, flow_id: str | None = None
    ) -> list[Difference]:
        """Rewrite the rows that differ from the log (`FlowStore.repair_projections`)."""
        return await self._run(self.store.repair_projections, user_id, flow_id)

    async def catch_up_projections(
        self, batch: int = 1000, *, stop: threading.Event | None = None
    ) -> int:
        """Apply events the tables have not seen (`FlowStore.catch_up_projections`)."""
        return await self._run(self.store.catch_up_projections, batch, stop=stop)

    async def sync_projections(self, timeout: float = 60.0) -> None:
        """Wait until the tables reflect this process's writes (`FlowStore.sync_projections`)."""
        return await self._run(self.store.sync_projections, timeout)

    async def projection_position(self) -> int:
        """The last event the tables reflect (`FlowStore.projection_position`)."""
        return await self._run(self.store.projection_position)

    async def read_model(self) -> SqlProjections:
        """The read-model tables, once they reflect this process's writes (`FlowStore.read_model`)."""
        return await self._run(self.store.read_model)

    async def read_events(self, start: int, limit: int = 1000) -> list[tuple[int, DomainEvent]]:
        """A page of the event log (`FlowStore.read_events`)."""
        return await self._run(self.store.read_events, start, limit)

    async def read_plain_events(
        self, start: int, limit: int = 1000
    ) -> list[tuple[int, PlainEvent]]:
        """A page of the event log as plain data (`FlowStore.read_plain_events`)."""
        return await self._run(self.store.read_plain_events, start, limit)

    async def import_events(self, events: Iterable[DomainEvent], *, batch: int = 500) -> int:
        """Append events recorded elsewhere (`FlowStore.import_events`)."""
        return await self._run(self.store.import_events, events, batch=batch)

    async def unreadable_events(self) -> list[dict[str, Any]]:
        """Events the projections skipped as undecodable (`FlowStore.unreadable_events`)."""
        return await self._run(self.store.unreadable_events)

    async def quarantine_event(self, position: int, reason: str) -> dict[str, Any]:
        """Move an unreadable event out of the log (`FlowStore.quarantine_event`)."""
        return await self._run(self.store.quarantine_event, position, reason)

    async def log_position(self) -> int:
        """The newest event's notification id (`FlowStore.log_position`)."""
        return await self._run(self.store.log_position)
