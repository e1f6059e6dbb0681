"""Helpers for testing code that uses flowstore: a store in memory, a clock you move, flows to run.

    from flowstore.testing import Clock, linear_flow, memory_store

    clock = Clock()
    with memory_store(clock=clock) as store:
        store.create_flow(linear_flow("signup", steps=3))
        store.execute_transition("ann", "signup", "next")
        clock.advance(60)

`memory_store` is a real `FlowStore` (the same write path, projections and errors) on an in-process
database, so tests of your flows need no files and no server; nothing is published to Kafka.

`Internals(store)` is for white-box tests of flowstore itself (and of code that must survive a
failing database): the store's parts, and faults injected where real ones happen (the recorder's
appends and reads). It is the one place outside the store that knows how a store is put together,
so a refactoring of the store changes it, not every test; it is not API for applications.
"""

from __future__ import annotations

import contextlib
import copy
import json
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from importlib import resources
from typing import TYPE_CHECKING, Any

from eventsourcing.persistence import IntegrityError

from flowstore.domain import DomainEvent, FlowInstance, instance_id
from flowstore.groupcommit import GroupCommit, _Pending
from flowstore.store import FlowStore

if TYPE_CHECKING:
    from flowstore.commands import Commands
    from flowstore.eventlog import Recent
    from flowstore.keys import UserKeys
    from flowstore.projections.sql import SqlProjections

__all__ = [
    "Clock",
    "Internals",
    "linear_flow",
    "memory_store",
    "onboarding_flow",
    "ring_flow",
]


class Clock:
    """A UTC clock that only moves when a test moves it (pass it as `FlowStore(clock=...)`)."""

    def __init__(self, start: datetime | None = None) -> None:
        self.now = start or datetime(2026, 1, 1, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        """Move the clock forward by `seconds`."""
        self.now += timedelta(seconds=seconds)


def memory_store(**options: Any) -> FlowStore:
    """A `FlowStore` on `memory://` that never publishes; `options` go to `FlowStore`."""
    return FlowStore("memory://", **{"kafka": False, **options})


def onboarding_flow() -> dict[str, Any]:
    """The seed's user-onboarding flow, as the seed writes it (a fresh copy on each call)."""
    text = resources.files("flowstore").joinpath("data/user-onboarding.json").read_text()
    return copy.deepcopy(json.loads(text))


def linear_flow(flow: str, steps: int = 3, **extra: Any) -> dict[str, Any]:
    """A flow s0 -> s1 -> ... -> s{steps-1} through transitions named `next`; `extra` is merged in."""
    names = [f"s{i}" for i in range(steps)]
    return {
        "flow": flow,
        "initialStep": names[0],
        "steps": {
            name: {
                "index": i,
                "step": name,
                "service": "svc",
                "transitions": (
                    {"next": {"transition": "next", "step": names[i + 1]}} if i + 1 < steps else {}
                ),
            }
            for i, name in enumerate(names)
        },
        **extra,
    }


def ring_flow(flow: str) -> dict[str, Any]:
    """Steps a and b looping (tick stays, flip a->b, flop b->a), and `finish` from b to `done`.

    Good for concurrency tests: `tick` is always valid, flip/flop only sometimes.
    """
    return {
        "flow": flow,
        "initialStep": "a",
        "steps": {
            "a": {
                "index": 0,
                "step": "a",
                "service": "s",
                "transitions": {
                    "tick": {"transition": "tick", "step": "a"},
                    "flip": {"transition": "flip", "step": "b"},
                },
            },
            "b": {
                "index": 1,
                "step": "b",
                "service": "s",
                "transitions": {
                    "tick": {"transition": "tick", "step": "b"},
                    "flop": {"transition": "flop", "step": "a"},
                    "finish": {"transition": "finish", "step": "done"},
                },
            },
            "done": {"index": 2, "step": "done", "service": "s", "transitions": {}},
        },
    }


@contextlib.contextmanager
def _replaced(owner: object, name: str, replacement: object) -> Iterator[None]:
    """`owner.name` is `replacement` inside the block (an instance attribute, removed after)."""
    own = vars(owner).get(name, _replaced)  # an attribute of the instance itself, if any
    setattr(owner, name, replacement)
    try:
        yield
    finally:
        if own is _replaced:
            delattr(owner, name)
        else:
            setattr(owner, name, own)


def _raising(error: BaseException) -> Callable[..., Any]:
    def fail(*args: Any, **kwargs: Any) -> Any:
        raise error

    return fail


class Internals:
    """A store's parts and fault injection, for white-box tests (see the module docstring).

    Faults are injected at eventsourcing's recorder, where its own retries have already been
    spent: what the store sees is what a real outage gives it.
    """

    def __init__(self, store: FlowStore) -> None:
        self._store = store

    @property
    def _parts(self) -> Any:
        return self._store._parts  # the store's current parts (a forked child opens new ones)

    @property
    def commands(self) -> Commands:
        """The write path (`flowstore.commands.Commands`): its caches, reads and appends."""
        commands: Commands = self._parts.commands
        return commands

    @property
    def keys(self) -> UserKeys:
        """The users' keys (`flowstore.keys.UserKeys`), cached by this store."""
        keys: UserKeys = self._parts.log.keys
        return keys

    @property
    def projections(self) -> SqlProjections:
        """The read-model tables' runner (`flowstore.projections.sql.SqlProjections`)."""
        projections: SqlProjections = self._parts.projections
        return projections

    @property
    def recent(self) -> Recent | None:
        """The events handed from the write path to the live projector (None: no projector)."""
        recent: Recent | None = self._parts.log.recent
        return recent

    def drop_idle_connections(self) -> None:
        """Close every idle connection of the store's pools, the log's and the engine's: the next
        use of each opens a new one (with the database file as it is then)."""
        idle = self.recorder.datastore.pool._pool  # eventsourcing's: a deque of idle connections
        while idle:
            with contextlib.suppress(IndexError):  # taken meanwhile by another thread
                idle.popleft().close()
        self._parts.engine.dispose()

    @contextlib.contextmanager
    def paused_projections(self) -> Iterator[None]:
        """Inside the block no catch-up of this store's tables starts (the live projector waits)."""
        with self.projections._lock:
            yield

    @property
    def recorder(self) -> Any:
        """eventsourcing's application recorder under the log (SQLite, PostgreSQL or memory)."""
        return self._parts.log.app.recorder

    def cached_instance(self, user_id: str, flow_id: str) -> FlowInstance | None:
        """The instance as this store's cache holds it (None if not cached): no read of the log."""
        iid = instance_id(user_id, flow_id)
        return self.commands.cached_instances((iid,)).get(iid.int)

    # Faults

    def failing_appends(self, error: BaseException) -> contextlib.AbstractContextManager[None]:
        """Inside the block every append to the log raises `error` (an outage) and writes nothing."""
        return _replaced(self.recorder, "insert_events", _raising(error))

    def failing_reads(self, error: BaseException) -> contextlib.AbstractContextManager[None]:
        """Inside the block every read of an aggregate's events raises `error`."""
        return _replaced(self.recorder, "select_events", _raising(error))

    @contextlib.contextmanager
    def lost_acknowledgement(self) -> Iterator[list[int]]:
        """Inside the block the first append commits, then fails as its reply had been lost.

        It raises what eventsourcing's retry of the same insert raises (`IntegrityError`: the
        rows are already there). Yields the list the appends made are counted in (one item each).
        """
        recorder = self.recorder
        real = recorder.insert_events
        calls: list[int] = []

        def insert_events(stored_events: Any, **kwargs: Any) -> Any:
            calls.append(1)
            result = real(stored_events, **kwargs)
            if len(calls) == 1:
                raise IntegrityError("duplicate key value violates unique constraint")
            return result

        with _replaced(recorder, "insert_events", insert_events):
            yield calls

    def on_retry(self, hook: Callable[[int], None]) -> None:
        """Call `hook(attempt)` before each pause after a conflicting append (the store retries)."""
        commands = self.commands
        pause = commands.backoff

        def backoff(attempt: int) -> None:
            hook(attempt)
            pause(attempt)

        commands.backoff = backoff  # type: ignore[method-assign]

    @contextlib.contextmanager
    def key_lookups(self) -> Iterator[list[int]]:
        """Inside the block, each read of the key table is recorded: how many users it asked for."""
        keys = self.keys
        load = keys._load_users
        calls: list[int] = []

        def counted(refs: list[str]) -> dict[str, tuple[str, bytes]]:
            calls.append(len(refs))
            return load(refs)

        with _replaced(keys, "_load_users", counted):
            yield calls

    @contextlib.contextmanager
    def keys_later(self, seconds: float) -> Iterator[None]:
        """Inside the block the key cache's clock reads `seconds` later (its refresh falls due)."""
        with _replaced(self.keys, "_clock", lambda: time.monotonic() + seconds):
            yield

    # The group commit

    def commit_group(
        self, commands: Sequence[Sequence[DomainEvent]]
    ) -> list[tuple[Sequence[int] | None, BaseException | None]]:
        """Commit the commands' events as one group, as concurrent appends are committed.

        Returns, per command, the notification ids it got (None if not committed) and the error
        it met (an `IntegrityError` for a command that conflicts: the others still commit).
        """
        group: GroupCommit | None = self._parts.log._group
        if group is None:
            raise TypeError("this store's log commits each append on its own (memory://)")
        mapper = self._parts.log.app.mapper
        pending = [_Pending([mapper.to_stored_event(e) for e in events]) for events in commands]
        if group._postgres:
            group._commit_postgres(pending)
        else:
            group._commit(pending)
        return [(p.ids, p.error) for p in pending]

    def stored(self, events: Sequence[DomainEvent]) -> list[Any]:
        """The events encoded (and sealed) as the recorder stores them."""
        mapper = self._parts.log.app.mapper
        return [mapper.to_stored_event(event) for event in events]
