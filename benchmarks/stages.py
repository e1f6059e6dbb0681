"""Where a transition's time goes: wall µs per operation in each stage of the write path.

`Stages` wraps the functions that make up each stage with timers for the duration of a `with`
block (every thread counts: the live projector's work shows up too), and `table()` prints the
totals divided by the number of operations. Stages nest (the recorder's insert includes the
commit), so the rows are inclusive and do not add up to the total. Timers cost about a
microsecond per call; the figures are for comparing stages, not for the results table.

A profiler of the store's internals: it wraps private functions and swaps the store's write lock
(through `store._parts`, the store's event log and tables), so it changes with them; tests never
do this (they use `flowstore.testing.Internals`).
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["Stages"]


def _targets() -> list[tuple[str, object, str]]:
    """(stage name, owner, attribute) of every timed function, in the order they are printed."""
    import eventsourcing.persistence as es_persistence
    import eventsourcing.sqlite as es_sqlite

    import flowstore.batch as batch
    import flowstore.store as store
    from flowstore.codec import PydanticMapper
    from flowstore.commands import Commands
    from flowstore.eventlog import EventLog
    from flowstore.groupcommit import GroupCommit
    from flowstore.keys import UserKeys
    from flowstore.pglog import OneTripRecorder
    from flowstore.projections.sql import SqlProjections
    from flowstore.sqlitelog import OneStatementRecorder

    return [
        ("command (execute_transition)", store.FlowStore, "execute_transition"),
        ("  input checks (check_payload)", batch, "check_payload"),
        ("  read instance (cached_instance)", Commands, "cached_instance"),
        ("  read a batch's instances (cached_instances)", Commands, "cached_instances"),
        ("  decide (decisions.execute_transition)", batch, "execute_transition"),
        ("  definitions (command_versions)", Commands, "command_versions"),
        ("  append (EventLog.save)", EventLog, "save"),
        ("    keys for the users (for_users)", UserKeys, "for_users"),
        ("    encode + seal (to_stored_events)", PydanticMapper, "to_stored_events"),
        ("    recorder put (insert + commit)", es_persistence.EventStore, "put"),
        ("      commit (SQLite)", es_sqlite.SQLiteConnection, "commit"),
        # Group commit: one thread per group takes the write lock and commits the group's commands
        # (calls/op: groups per command); the others wait for it and return, without the lock.
        ("    lead a group (write lock + commit)", GroupCommit, "_lead"),
        # flowstore's SQLite recorder: one multi-row INSERT in autocommit (insert + commit).
        ("      insert + commit (SQLite, one statement)", OneStatementRecorder, "insert_events"),
        # flowstore's recorder (one round trip: insert + commit); eventsourcing's for the rest.
        ("      insert + commit (PostgreSQL)", OneTripRecorder, "insert_events"),
        ("projector catch-up (all threads)", SqlProjections, "catch_up"),
        ("  read + decode events", EventLog, "read"),
        # The live projector's read: this process's own events handed over, the rest decoded.
        ("  read (handed over + from the log)", EventLog, "read_live"),
        ("    decode events (not handed over)", EventLog, "_decode"),
        ("    key lookups (prefetch)", UserKeys, "prefetch"),
        ("  fold rows", SqlProjections, "_fold"),
        ("  prepare rows (before the write lock)", SqlProjections, "_prepare"),
        ("  write rows", SqlProjections, "_write"),
    ]


_THREAD_CPU = {
    "command (execute_transition)": "CPU of the commands' threads (thread_time)",
    "projector catch-up (all threads)": "CPU of the catch-ups' threads (thread_time)",
}
"""Stages whose own thread's CPU is also summed (the GIL's share of each side)."""


class Stages:
    """Timers around the write path's stages while active."""

    def __init__(self) -> None:
        self.wall: defaultdict[str, float] = defaultdict(float)
        self.calls: defaultdict[str, int] = defaultdict(int)
        self.lock_wait: defaultdict[str, float] = defaultdict(float)  # by who waited
        self.lock_calls: defaultdict[str, int] = defaultdict(int)
        self.cpu: defaultdict[str, float] = defaultdict(float)
        self._guard = threading.Lock()

    def _timed(self, name: str, func: Callable[..., Any]) -> Callable[..., Any]:
        if name in _THREAD_CPU:
            return self._cpu_timed(name, func)

        def timed(*args: Any, **kwargs: Any) -> Any:
            began = time.perf_counter()
            try:
                return func(*args, **kwargs)
            finally:
                spent = time.perf_counter() - began
                with self._guard:
                    self.wall[name] += spent
                    self.calls[name] += 1

        return timed

    def _cpu_timed(self, name: str, func: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            began, cpu = time.perf_counter(), time.thread_time()
            try:
                return func(*args, **kwargs)
            finally:
                spent, used = time.perf_counter() - began, time.thread_time() - cpu
                with self._guard:
                    self.wall[name] += spent
                    self.calls[name] += 1
                    self.cpu[name] += used

        return timed

    @contextmanager
    def active(self, store: Any = None) -> Iterator[Stages]:
        """Time the stages inside the block (and the write lock's waits of `store`, if given)."""
        patched: list[tuple[object, str, Any]] = []
        for name, owner, attr in _targets():
            if not hasattr(owner, attr):  # a stage older code does not have
                continue
            # A class's own attribute is put back; an inherited one is deleted again afterwards.
            original = vars(owner).get(attr) if isinstance(owner, type) else getattr(owner, attr)
            patched.append((owner, attr, original))
            setattr(owner, attr, self._timed(name, getattr(owner, attr)))
        parts = store._parts if store is not None else None
        lock_owner = parts.log if parts is not None else None
        lock = lock_owner.write_lock if lock_owner is not None else None
        group = getattr(lock_owner, "_group", None)
        group_lock = group._lock if group is not None and not group._postgres else None
        if lock_owner is not None:
            lock_owner.write_lock = _TimedLock(lock, self)
            parts.projections._write_lock = lock_owner.write_lock
            if group_lock is not None:  # the commands' side of the same lock (group commit)
                group._lock = lock_owner.write_lock
        try:
            yield self
        finally:
            for owner, attr, original in reversed(patched):
                if original is None:
                    delattr(owner, attr)
                else:
                    setattr(owner, attr, original)
            if lock_owner is not None:
                lock_owner.write_lock = lock
                parts.projections._write_lock = lock
                if group_lock is not None:
                    group._lock = group_lock

    def table(self, ops: int, wall: float, cpu: float) -> str:
        """The stages as text: wall µs per operation, and calls per operation."""
        lines = [
            f"{'stage':<44}{'µs/op':>10}{'calls/op':>10}",
            f"{'total wall':<44}{wall / ops * 1e6:>10.0f}",
            f"{'total CPU (process_time, all threads)':<44}{cpu / ops * 1e6:>10.0f}",
        ]
        for name, label in _THREAD_CPU.items():
            if self.calls[name]:
                lines.append(f"{'  ' + label:<44}{self.cpu[name] / ops * 1e6:>10.0f}")
        for name, _, _ in _targets():
            if self.calls[name]:
                lines.append(
                    f"{name:<44}{self.wall[name] / ops * 1e6:>10.0f}{self.calls[name] / ops:>10.2f}"
                )
        for who in sorted(self.lock_calls):
            lines.append(
                f"{f'waiting for the write lock ({who})':<44}"
                f"{self.lock_wait[who] / ops * 1e6:>10.0f}{self.lock_calls[who] / ops:>10.2f}"
            )
        return "\n".join(lines)


class _TimedLock:
    """A write lock that adds the time spent waiting for it to the stages."""

    def __init__(self, lock: Any, stages: Stages) -> None:
        self._lock = lock
        self._stages = stages

    def __enter__(self) -> Any:
        began = time.perf_counter()
        entered = self._lock.__enter__()
        spent = time.perf_counter() - began
        who = (
            "projector" if threading.current_thread().name == "flowstore-projector" else "commands"
        )
        with self._stages._guard:
            self._stages.lock_wait[who] += spent
            self._stages.lock_calls[who] += 1
        return entered

    def __exit__(self, *exc: object) -> Any:
        return self._lock.__exit__(*exc)
