"""Group commit: the appends of many threads in one transaction, one commit (and fsync) for all.

`EventLog` hands each command's events to its `GroupCommit`; what is appended and when is decided
above it, in `flowstore.commands`.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Any, cast
from uuid import UUID

from eventsourcing.application import Application
from eventsourcing.persistence import IntegrityError, InterfaceError, OperationalError, StoredEvent

from flowstore.domain import DomainEvent

__all__ = ["GroupCommit"]


class _Pending:
    """One command's stored events waiting for a group's commit, and how it went."""

    __slots__ = ("done", "error", "ids", "stored")

    def __init__(self, stored: list[StoredEvent]) -> None:
        self.stored = stored
        self.ids: Sequence[int] | None = None
        self.error: BaseException | None = None
        self.done = False


class GroupCommit:
    """Appends of many threads in one transaction, one commit (and fsync) for all of them.

    Each thread queues its command's stored events and takes the write lock; whoever holds it
    commits everything queued so far (its own events and those of the threads waiting behind it)
    in one transaction, each command's inserts in a SAVEPOINT of their own. A command whose
    insert conflicts (an instance moved on: optimistic concurrency) is rolled back to its
    savepoint alone and gets eventsourcing's `IntegrityError`; the others commit. A thread whose
    command another thread committed finds it done once it gets the lock, so every call returns
    only after its own events are durable (or raises what the commit raised).

    On PostgreSQL a command alone goes through the recorder's own insert (pipelined, retried
    when the connection drops); a group whose connection fails is retried one command at a
    time the same way (a group that did commit then meets its own rows, which
    `EventLog.save` recognises as its own).
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

    def append(self, events: Sequence[DomainEvent]) -> int:
        """Record one command's events; the notification id of its last one (0 if none)."""
        if not events:
            return 0
        # Encoding and sealing happen here, while another thread's group may be committing.
        mapper = self._app.mapper
        pending = _Pending([mapper.to_stored_event(event) for event in events])
        with self._queue_lock:
            self._queue.append(pending)
        with self._lock:
            if not pending.done:
                with self._queue_lock:
                    group, self._queue = self._queue, []
                try:
                    if self._postgres:
                        self._commit_postgres(group)
                    else:
                        self._commit(group)
                finally:
                    for done in group:
                        done.done = True
        if pending.error is not None:
            raise pending.error
        assert pending.ids
        return pending.ids[-1]

    def _commit(self, group: list[_Pending]) -> None:
        recorder = cast(Any, self._app.recorder)
        try:
            if len(group) == 1:  # alone: the recorder's own insert, no savepoint needed
                group[0].ids = recorder.insert_events(group[0].stored)
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
