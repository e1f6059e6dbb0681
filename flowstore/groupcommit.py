"""Group commit: the appends of many threads in one transaction, one commit (and fsync) for all.

`EventLog` hands each command's events to its `GroupCommit`; what is appended and when is decided
above it, in `flowstore.commands`.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any, cast
from uuid import UUID

from eventsourcing.application import Application
from eventsourcing.persistence import IntegrityError, InterfaceError, OperationalError, StoredEvent

from flowstore.codec import PydanticMapper
from flowstore.domain import DomainEvent
from flowstore.keys import SealedKey

__all__ = ["GroupCommit"]


class _Pending:
    """One command's stored events waiting for a group's commit, and how it went."""

    __slots__ = ("done", "error", "ids", "stored", "turn")

    def __init__(self, stored: list[StoredEvent]) -> None:
        self.stored = stored
        self.ids: Sequence[int] | None = None
        self.error: BaseException | None = None
        self.done = False
        # Held while a follower waits: released once its command is committed (`done`) or
        # once it is to lead the next groups (not `done`). None: it leads from the start.
        self.turn: threading.Lock | None = None


class GroupCommit:
    """Appends of many threads in one transaction, one commit (and fsync) for all of them.

    Each thread queues its command's stored events. One thread at a time leads: it takes the
    write lock and commits everything queued by then (its own events and those of the threads
    waiting behind it) with the recorder's insert, all of it at once (one statement on SQLite,
    one round trip on PostgreSQL). Only if that conflicts (nothing is committed then) does it go
    again in one transaction, each command's inserts in a SAVEPOINT of their own: a command
    whose insert conflicts (an instance moved on: optimistic concurrency) is rolled back to its
    savepoint alone and gets eventsourcing's `IntegrityError`; the others commit. The others
    wait on a lock of their own (`_Pending.turn`), which the leader releases once their command
    is committed (or has failed), so every call returns only after its own events are durable
    (or raises what the commit raised), without taking the write lock to find that out; then
    the leader hands the lead to the first command queued meanwhile, whose thread commits the
    next group. (When the done threads took the write lock in turn to find their commands done,
    each turn a switch of the GIL, the next group and the projector waited behind them.)

    On PostgreSQL the recorder's insert is retried when the connection drops; a group whose
    connection fails is retried one command at a time the same way (a group that did commit
    then meets its own rows, which `EventLog.save` recognises as its own).
    """

    _SAVEPOINT = "flowstore_command"

    def __init__(
        self, app: Application[UUID], lock: AbstractContextManager[Any], *, postgres: bool = False
    ) -> None:
        self._app = app
        self._lock = lock
        self._postgres = postgres
        self._queue: list[_Pending] = []
        self._queue_lock = threading.Lock()
        self._leading = False  # a thread is committing the queue's groups
        self._crowded = False  # the last group had company: several threads are writing

    def append(
        self, events: Sequence[DomainEvent], keys: Mapping[str, SealedKey] | None = None
    ) -> Sequence[int]:
        """Record one command's events (sealed with `keys`, the users' keys by user id, where
        they have one there); their notification ids, once committed."""
        if not events:
            return ()
        # Encoding and sealing happen here, while another thread's group may be committing.
        mapper = cast(PydanticMapper, self._app.mapper)
        pending = _Pending(mapper.to_stored_events(events, keys))
        with self._queue_lock:
            self._queue.append(pending)
            if self._leading:
                pending.turn = threading.Lock()
                pending.turn.acquire()
            else:
                self._leading = True
        interrupted: BaseException | None = None
        while pending.turn is not None:  # the leader commits us, or hands us the lead
            try:
                pending.turn.acquire()
                break
            except BaseException as exc:  # a signal's (KeyboardInterrupt in the main thread)
                # Waited for all the same: the leader may hand us the lead, and a group nobody
                # leads would stall every writer of the process. Raised once our part is done.
                interrupted = exc
        if not pending.done:
            self._lead(pending)
        if interrupted is not None:
            raise interrupted
        if pending.error is not None:
            raise pending.error
        assert pending.ids
        return pending.ids

    def _lead(self, own: _Pending) -> None:
        """Commit everything queued (`own`, this thread's command, among it) as one group, wake
        the group's other threads, and hand the lead to the first command queued meanwhile."""
        group: list[_Pending] = []
        failure: BaseException | None = None
        try:
            with self._lock:
                if self._crowded:
                    # Other threads are writing too: let whichever wants the GIL run before the
                    # group is taken (with the write lock held, the lock alone is kept waiting).
                    # A thread finishing its command then queues it into this group and waits,
                    # instead of starting a commit of its own right after this one: with 4
                    # threads, 3.4-3.6 commands per commit instead of 2.5, so fewer fsyncs (what
                    # counts when the disk is slow or shared). A lone writer never yields.
                    time.sleep(0)
                # Taken once the write lock is ours: whatever queued while we waited for it
                # (the previous group's commit, the projector's write) goes in this group.
                with self._queue_lock:
                    group, self._queue = self._queue, []
                if self._postgres:
                    self._commit_postgres(group)
                else:
                    self._commit(group)
        except BaseException as exc:  # not the commit's (each command has those): interrupted
            failure = exc
            with self._queue_lock:  # still queued if the write lock was never ours
                self._queue = [pending for pending in self._queue if pending is not own]
            for pending in (own, *group):
                if pending.ids is None and pending.error is None:  # not committed
                    pending.error = exc
        own.done = True
        for pending in group:
            pending.done = True
            if pending.turn is not None and pending is not own:
                pending.turn.release()
        with self._queue_lock:
            self._crowded = len(group) > 1 or bool(self._queue)
            if self._queue:
                # It leads the next group once it has the GIL: by then, the commands of the
                # threads just woken may have queued too, and go in the same commit.
                self._queue[0].turn.release()  # type: ignore[union-attr]  # queued as follower
            else:
                self._leading = False
        if failure is not None:
            raise failure

    def _together(self, group: list[_Pending]) -> bool:
        """Append the whole group in one insert (one statement on SQLite, one round trip on
        PostgreSQL); False, with nothing committed, if any of its commands conflicts."""
        try:
            ids = cast(Any, self._app.recorder).insert_events(
                [stored for pending in group for stored in pending.stored]
            )
        except IntegrityError:
            return False  # all or nothing: the savepoints then find the conflicting command
        ids = sorted(ids)  # assigned in the rows' order, whatever order the rows came back in
        start = 0
        for pending in group:
            pending.ids = ids[start : start + len(pending.stored)]
            start += len(pending.stored)
        return True

    def _commit(self, group: list[_Pending]) -> None:
        recorder = cast(Any, self._app.recorder)
        try:
            if len(group) == 1:  # alone: the recorder's own insert, no savepoint needed
                group[0].ids = recorder.insert_events(group[0].stored)
                return
            # Commands of one process rarely conflict (threads take turns on an instance):
            # first all in one statement, and one savepoint each only if that conflicts.
            if self._together(group):
                return
            with recorder.datastore.transaction(commit=True) as cursor:
                for pending in group:
                    cursor.execute(f"SAVEPOINT {self._SAVEPOINT}")
                    try:
                        pending.ids = recorder._insert_events(cursor, pending.stored)
                    except sqlite3.IntegrityError as exc:
                        cursor.execute(f"ROLLBACK TO {self._SAVEPOINT}")
                        pending.error = IntegrityError(exc)
                    cursor.execute(f"RELEASE {self._SAVEPOINT}")
        except BaseException as exc:  # the commit failed: none of the group's events are in
            for pending in group:
                pending.ids = None
                if pending.error is None:
                    pending.error = exc

    def _commit_postgres(self, group: list[_Pending]) -> None:
        import psycopg

        recorder = cast(Any, self._app.recorder)
        if len(group) > 1:
            try:
                if self._together(group):  # as on SQLite: one round trip for the whole group
                    return
                with recorder.datastore.get_connection() as conn, conn.transaction():
                    for pending in group:
                        try:
                            with conn.transaction(), conn.cursor() as cursor:  # a SAVEPOINT
                                recorder._insert_stored_events(cursor, pending.stored)
                                pending.ids = recorder._fetch_ids_after_insert_events(
                                    cursor, pending.stored
                                )
                        except psycopg.IntegrityError as exc:
                            pending.ids = None
                            pending.error = IntegrityError(str(exc))
                return
            except (OperationalError, InterfaceError):
                for pending in group:  # cut off: each on its own, with the recorder's retries
                    pending.ids = None
            except BaseException as exc:
                for pending in group:
                    pending.ids = None
                    if pending.error is None:
                        pending.error = exc
                return
        for pending in group:
            if pending.error is None:
                try:
                    pending.ids = recorder.insert_events(pending.stored)
                except BaseException as exc:
                    pending.error = exc
