"""Opening a store: its settings, its parts, its embedded publisher, and reopening after a fork.

`Parts` is what one open `FlowStore` is made of: the SQLAlchemy engine, the event log, the write
path (`Commands`, `Transitions`), the read-model tables and their live projector, erasure, the log
notifier and the followers. The facade and the modules that serve it by concern (`flowstore.flows`,
`flowstore.instances`, `flowstore.reads`, `flowstore.admin`) work on a `Parts`; a forked child
opens a new one (`generation`, `reopening`).
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator, Mapping
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, cast

from flowstore.batch import Transitions
from flowstore.codec import PlainEvent
from flowstore.commands import Commands
from flowstore.domain import DomainEvent, FlowVersions
from flowstore.erasure import Erasure
from flowstore.errors import FlowError, InvalidArgumentError
from flowstore.eventlog import CIPHER_KEY_ENV, EventLog, cipher_settings
from flowstore.notify import LogNotifier
from flowstore.storage import StorageConfig, make_engine

if TYPE_CHECKING:
    from flowstore.follow import Follower, FollowHandler
    from flowstore.projections.live import LiveProjector
    from flowstore.projections.sql import SqlProjections

__all__ = [
    "KAFKA_BOOTSTRAP_ENV",
    "PUBLISHER_ENTRY_POINTS",
    "Parts",
    "Publisher",
    "check_clock",
    "generation",
    "kafka_publisher",
    "reopening",
    "url_of",
]

KAFKA_BOOTSTRAP_ENV = "FLOWSTORE_KAFKA_BOOTSTRAP"
"""Kafka bootstrap servers: when set, every FlowStore (unless kafka=False) publishes its log."""

PUBLISHER_ENTRY_POINTS = "flowstore.publishers"
"""Entry-point group naming publisher factories by kind (`kafka`): how `kafka=` finds its adapter
without the service importing the adapters layer."""

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


def generation() -> int:
    """How many times this process has been forked from its ancestors (a store opened in another
    generation must reopen before its first use)."""
    return _fork_generation


@contextlib.contextmanager
def reopening() -> Iterator[None]:
    """Hold this process's reopen lock (one thread of a forked child reopens a store)."""
    with _reopen_lock:
        yield


def url_of(url: object) -> str | None:
    """A URL from a string, or from a path (`FlowStore(Path("x.db"))`: that SQLite file)."""
    if url is None or isinstance(url, str):
        return url
    if isinstance(url, os.PathLike):
        path = Path(os.fspath(url)).expanduser()
        return f"sqlite:///{path.resolve()}"
    raise InvalidArgumentError("url", url, "must be a URL (str) or a path to a SQLite file")


def check_clock(clock: object) -> None:
    """The clock must tell UTC-aware time: naive times would be stored as if they were UTC."""
    if not callable(clock):
        raise InvalidArgumentError("clock", clock, "must be a callable returning a datetime")
    now = clock()
    if not isinstance(now, datetime) or now.utcoffset() is None:
        raise InvalidArgumentError(
            "clock", now, "must return timezone-aware datetimes (e.g. datetime.now(UTC))"
        )


class Publisher(Protocol):
    """A running embedded publisher (the port the service knows an adapter by)."""

    def stop(self) -> None:
        """Drain what can be drained and stop; called by `FlowStore.close()` before anything else."""


def kafka_publisher(
    kafka: str | Mapping[str, Any] | bool | None,
) -> Callable[[Any], Publisher] | None:
    """The publisher factory `kafka=` asks for (see `FlowStore`), or None for no publishing."""
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
    return _plugin_publisher("kafka", options)


def _plugin_publisher(kind: str, options: Mapping[str, Any]) -> Callable[[Any], Publisher]:
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
    return cast(Callable[[Any], Publisher], make(**options))


class Parts:
    """One open store's engine, event log, write path, tables, live projector and followers."""

    def __init__(
        self, config: StorageConfig, options: Mapping[str, Any], clock: Callable[[], datetime]
    ) -> None:
        """Open the event log, the write path, the tables and (if asked) the live projector."""
        self.config = config
        self.clock = clock
        cipher_key = options["cipher_key"]
        env = {
            **config.env,
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
        self.engine = make_engine(config, pool_size=options["pool_size"])
        try:
            self.log = EventLog(
                config, env, encrypted=encrypted, refresh=refresh, engine=self.engine
            )
        except BaseException:
            self.engine.dispose()
            raise
        # Imported here, not at the top: the service module loads before SQLAlchemy is needed.
        from flowstore.projections.live import LiveProjector
        from flowstore.projections.sql import SqlProjections

        self.live: LiveProjector | None = None
        self.commands = Commands(
            self.log,
            clock=clock,
            max_retries=options["max_retries"],
            cache_size=options["cache_size"],
            definition_refresh=refresh,
            written=self._written,
        )
        self.transitions = Transitions(
            self.commands, max_payload_bytes=options["max_payload_bytes"]
        )
        opened: list[Callable[[], None]] = [self.engine.dispose, self.log.close]
        try:
            with self.log.errors("opening the store"):
                self.projections = SqlProjections(
                    config, self.engine, write_lock=self.log.write_lock
                )
                opened.append(self.projections.close)
                if options["live_projections"]:
                    self.projections.catch_up(self.read_contained)  # what happened while away
                    self.live = LiveProjector(self.project_written)
        except BaseException:
            for close in reversed(opened):
                with contextlib.suppress(Exception):
                    close()
            raise
        self.followers: list[Follower] = []
        self.erasure = Erasure(self.commands, self.log.keys, self.project_written)
        # PostgreSQL tells of other processes' appends (LISTEN/NOTIFY): followers wake at once.
        self.notifier = LogNotifier(config, self.log.channel)
        if self.live is not None and self.notifier.pushes:
            self.notifier.subscribe(self.live.nudge)

    def abandon(self) -> None:
        """In a forked child: forget the parent's pooled connections without closing them."""
        # SQLAlchemy's recipe for fork: dispose of the pool without closing its connections.
        self.engine.dispose(close=False)
        self.projections.abandon()

    def stop_followers(self) -> None:
        """Stop every follower (each finishes the event it is applying)."""
        for follower in self.followers:
            follower.stop()

    def close(self) -> None:
        """Stop the notifier and the live projector (projecting what is left), release connections."""
        try:
            self.notifier.close()
            if self.live is not None:
                self.live.close()
        finally:
            self.projections.close()
            self.log.close()
            self.engine.dispose()

    def follow(
        self,
        read: Callable[[int, int], list[tuple[int, DomainEvent]]],
        name: str,
        handler: FollowHandler,
        *,
        page: int,
        interval: float,
    ) -> Follower:
        """A durable follower reading the log through `read` (`FlowStore.follow`), stopped when
        the store closes."""
        from flowstore.follow import Follower  # SQLAlchemy, loaded when a follower is made

        follower = Follower(self.config, read, name, handler, page=page, interval=interval)
        self.followers.append(follower)
        return follower

    def sync(self, timeout: float = 60.0) -> None:
        """Wait until the tables reflect every event this process wrote."""
        if self.live is not None:
            self.live.wait(timeout)

    @property
    def tables(self) -> SqlProjections:
        """The read-model tables, once they reflect everything this process wrote."""
        self.sync()
        return self.projections

    def read_contained(self, start: int, limit: int) -> list[tuple[int, DomainEvent]]:
        """The projections' reader: an event that cannot be decoded is skipped and named (its own
        instance answers FlowStateCorruptionError), so one bad event stops nobody else's reads."""
        return self.log.read(start, limit, contain=True)

    def read_plain(self, start: int, limit: int) -> list[tuple[int, PlainEvent | Any]]:
        """`read_contained` with each event as plain data (`flowstore.codec.PlainEvent`): what
        the projections fold, without building the pydantic events (a rebuild's reader)."""
        return self.log.read(start, limit, contain=True, plain=True)

    @contextlib.contextmanager
    def reading_ahead(self) -> Iterator[Callable[[int, int], list[tuple[int, Any]]]]:
        """A rebuild's reader: `read_plain`, with a second process reading and decoding the next
        pages meanwhile when the log is long enough for it to pay (`ReadAhead`)."""
        from flowstore.projections.readahead import READ_AHEAD_FROM, ReadAhead
        from flowstore.projections.rebuild import PAGE

        if self.config.sqlalchemy_url is None or self.log.position() < READ_AHEAD_FROM:
            yield self.read_plain  # memory:// lives in this process only; a short log: no gain
            return
        with ReadAhead(self.log, self.read_plain, PAGE) as read:
            yield read

    def versions(self, flow_id: str) -> FlowVersions:
        """Every version of the flow (deleted or not); `FlowNotFoundError` if none."""
        return self.commands.versions(flow_id)

    def live_versions(self, flow_id: str) -> FlowVersions:
        """The flow's versions; `FlowNotFoundError` if it does not exist or was deleted."""
        return self.commands.live_versions(flow_id)

    def _written(self, position: int) -> None:
        if self.live is not None:
            self.live.written(position)

    def project_written(self) -> int:
        """Bring the tables up to this process's writes now (erasure needs them at once)."""
        # The projections take the log's write lock themselves, only to write (see catch_up).
        return self.projections.catch_up(self.read_contained, projected=self.projected())

    def projected(self) -> Callable[[int, int, int, int], None] | None:
        """What a catch-up tells the observers after each batch it committed (None: nobody)."""
        observers = self.commands.observers
        return observers.projected if observers.active else None

    @contextlib.contextmanager
    def rebuilding(
        self, progress: Callable[[int, int], None] | None
    ) -> Iterator[Callable[[int, int], None] | None]:
        """`progress`, also telling the observers how far a rebuild got (log positions)."""
        observers = self.commands.observers
        if not observers.active:
            yield progress
            return
        total = self.log.position()

        def told(replayed: int, position: int) -> None:
            observers.rebuild(position, max(total, position))
            if progress:
                progress(replayed, position)

        observers.rebuild(0, total)
        observers.rebuild_running(True)
        try:
            yield told
        finally:
            observers.rebuild_running(False)
