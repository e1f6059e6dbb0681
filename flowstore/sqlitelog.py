"""SQLite connections that overwrite what they delete: the log's, the tables' and the keys'.

Erasure deletes rows (a user's key, their projected state and history). SQLite leaves deleted
content in free pages and in the write-ahead log unless every connection that writes the file has
`PRAGMA secure_delete = ON` (deleted content is overwritten with zeros) and the WAL is checkpointed
and truncated afterwards (`wipe_wal`). eventsourcing opens its own connections, so its SQLite
factory is subclassed here (`storage.py` names it as the persistence module); SQLAlchemy engines
on the same file call `secure_sqlite`.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any
from uuid import UUID

from eventsourcing import persistence
from eventsourcing.persistence import StoredEvent
from eventsourcing.sqlite import (
    SQLITE3_DEFAULT_LOCK_TIMEOUT,
    SQLiteApplicationRecorder,
    SQLiteConnection,
    SQLiteConnectionPool,
    SQLiteDatastore,
    SQLiteFactory,
)

__all__ = [
    "SECURE_DELETE",
    "OneStatementRecorder",
    "SecureSQLiteFactory",
    "opened_read_only",
    "secure_sqlite",
    "wipe_wal",
]

SECURE_DELETE = "PRAGMA secure_delete = ON"
"""Run on every new SQLite connection of a store."""


_CACHED_STATEMENTS = 64
"""Prepared statements each of the log's connections keeps (by SQL text)."""


def opened_read_only(exc: BaseException | None) -> bool:
    """Whether `exc` (or an exception it was raised from) is SQLite refusing to write because
    the connection has the file read-only.

    SQLite opens a database file it may not write (read-only permissions, `chattr +i`, a
    read-only mount) read-only rather than failing, and such a connection stays read-only once
    the file is writable again: kept in a pool, it would refuse every later write. The pools
    drop a connection that says so (the next one opens the file as it is then).
    """
    while exc is not None:
        if isinstance(exc, sqlite3.Error):
            # The primary code: SQLITE_READONLY and its extended codes (moved, can't lock, ...);
            # none on an error raised by other code than the driver's.
            code = getattr(exc, "sqlite_errorcode", None)
            return code is not None and (code & 0xFF) == sqlite3.SQLITE_READONLY
        exc = exc.__cause__
    return False


class _SecurePool(SQLiteConnectionPool):
    def _create_connection(self) -> SQLiteConnection:
        # As eventsourcing's (the same settings, WAL, rows as sqlite3.Row), but with a statement
        # cache of more than eventsourcing's one: the readers (the live projector's BEGIN, SELECT,
        # ROLLBACK) share the pool's connections with the appends, and each statement they ran
        # evicted the append's, which SQLite then parsed again (a 500-row INSERT: ~0.7 ms).
        try:
            sqlite_conn = sqlite3.connect(
                database=self.db_name,
                uri=True,
                check_same_thread=False,
                isolation_level=None,  # autocommit: transactions are begun explicitly
                cached_statements=_CACHED_STATEMENTS,
                timeout=self.lock_timeout or SQLITE3_DEFAULT_LOCK_TIMEOUT,
            )
        except (sqlite3.Error, TypeError) as exc:
            raise persistence.InterfaceError(exc) from exc
        if not self.is_sqlite_memory_mode and not self.is_journal_mode_wal:
            mode = sqlite_conn.execute("PRAGMA journal_mode;").fetchone()[0]
            if mode.lower() != "wal":
                sqlite_conn.execute("PRAGMA journal_mode=WAL;")
                self.journal_mode_was_changed_to_wal = True
            self.is_journal_mode_wal = True
        sqlite_conn.row_factory = sqlite3.Row
        sqlite_conn.execute(SECURE_DELETE)
        return SQLiteConnection(sqlite_conn=sqlite_conn, max_age=self.max_age)


class _SecureDatastore(SQLiteDatastore):
    @contextmanager
    def get_connection(self, *, commit: bool) -> Iterator[SQLiteConnection]:
        # Every read and write of the log's goes through here: a connection that turns out to
        # have the file read-only is closed, so that the pool drops it (`opened_read_only`).
        with super().get_connection(commit=commit) as connection:
            try:
                yield connection
            except persistence.PersistenceError as exc:
                if opened_read_only(exc):
                    connection.close()
                raise


# sqlite3's errors as eventsourcing's (what `storage_errors` and the callers expect), in the
# order eventsourcing's own SQLite transaction tries them (subclasses first).
_ERRORS: tuple[tuple[type[sqlite3.Error], type[persistence.PersistenceError]], ...] = (
    (sqlite3.InterfaceError, persistence.InterfaceError),
    (sqlite3.DataError, persistence.DataError),
    (sqlite3.OperationalError, persistence.OperationalError),
    (sqlite3.IntegrityError, persistence.IntegrityError),
    (sqlite3.InternalError, persistence.InternalError),
    (sqlite3.ProgrammingError, persistence.ProgrammingError),
    (sqlite3.NotSupportedError, persistence.NotSupportedError),
    (sqlite3.DatabaseError, persistence.DatabaseError),
    (sqlite3.Error, persistence.PersistenceError),
)


class OneStatementRecorder(SQLiteApplicationRecorder):
    """eventsourcing's SQLite application recorder, appending in one statement.

    eventsourcing's `insert_events` runs BEGIN, one INSERT per event and COMMIT: three calls
    into SQLite for a one-event command, each of which releases the GIL (for the live
    projector to take), plus the transaction's Python plumbing. Here one multi-row INSERT runs
    in autocommit mode: one statement is atomic (all rows or none: a conflicting version rolls
    it back whole) and its commit, with the same fsync, happens before it returns.

    The notification ids (rowids) come from `lastrowid`, not from a RETURNING clause: RETURNING
    makes the driver step the statement once more for its rows, and the commit (the fsync)
    happens in that last step; each step releases the GIL, and under concurrency each return
    waits for the GIL while the write lock is held (beside a thread busy in Python, an append
    with RETURNING waited for the GIL twice, one without it once). The rows of one statement
    get consecutive rowids: SQLite gives a row inserted without one the table's largest rowid
    plus one (the table has no AUTOINCREMENT), and nothing else writes in between (one
    statement, the database's write lock). It picks rowids at random only once the table holds
    the largest possible one (2**63 - 1), which nothing appends by itself; a log where some row
    has it (looked up once, at the first append) is appended with RETURNING.
    """

    _MOST = 2000
    """Events appended in one statement at most (4 parameters each: SQLite allows 32,766)."""

    _LARGEST_ROWID = 2**63 - 1

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._statements: dict[tuple[int, bool], str] = {}
        # Before 3.32 a statement took 999 parameters at most.
        self._most = min(self._MOST, _variables_allowed() // 4)
        # None: not looked yet; True: some row has the largest rowid (ids only from RETURNING).
        self._random_rowids: bool | None = None

    def insert_events(
        self, stored_events: Sequence[StoredEvent], **kwargs: Any
    ) -> Sequence[int] | None:
        """Record the events (all or none) and return their notification ids."""
        count = len(stored_events)
        if not count or count > self._most or kwargs:
            return super().insert_events(stored_events, **kwargs)
        returning = self._random_rowids
        if returning is None:
            returning = self._random_rowids = (
                self.max_notification_id() or 0
            ) >= self._LARGEST_ROWID
        if returning and sqlite3.sqlite_version_info < (3, 35):
            return super().insert_events(stored_events, **kwargs)  # no RETURNING before 3.35
        statement = self._statements.get((count, returning))
        if statement is None:
            rows = ",".join(["(?,?,?,?)"] * count)
            statement = f"INSERT INTO {self.events_table_name} VALUES {rows}"
            if returning:
                statement += " RETURNING rowid"
            self._statements[(count, returning)] = statement
        params: list[Any] = []
        for event in stored_events:
            originator = event.originator_id
            params += (
                originator.hex if isinstance(originator, UUID) else originator,
                event.originator_version,
                event.topic,
                # A bytearray is bound as the same BLOB, but as it is: sqlite3 passes bytes
                # through its adapter registry first (a tuple, a dict lookup and two attribute
                # lookups), which cost three times the copy (~1 µs a row).
                bytearray(event.state),
            )
        try:
            found = self._insert(statement, params, returning)
        except persistence.OperationalError as exc:
            if not opened_read_only(exc):
                raise
            # Its connection had the file read-only (and is gone now): on a fresh one, if the
            # file is writable again, the append goes through; nothing was written by this one.
            found = self._insert(statement, params, returning)
        if returning:
            return found
        last = found[0]
        if last == self._LARGEST_ROWID:
            self._random_rowids = True  # the next appends' rowids may be anywhere
        return list(range(last - count + 1, last + 1))

    def _insert(self, statement: str, params: list[Any], returning: bool) -> list[int]:
        """Run the append's INSERT: the rows' ids if `returning`, else the last one's alone."""
        with self.datastore.get_connection(commit=True) as connection:
            try:
                cursor = connection._sqlite_conn.execute(statement, params)
                if returning:
                    # In an order SQLite does not promise; rowids grow with the rows' order.
                    return sorted(row[0] for row in cursor)
                return [cursor.lastrowid]  # type: ignore[list-item]  # an INSERT sets it
            except sqlite3.Error as exc:
                if connection._sqlite_conn.in_transaction:  # an I/O error may leave it open
                    connection._sqlite_conn.rollback()
                raise next(ours for theirs, ours in _ERRORS if isinstance(exc, theirs))(
                    exc
                ) from exc


def _variables_allowed() -> int:
    """How many parameters one SQLite statement may take (the library's compiled limit)."""
    probe = sqlite3.connect(":memory:")
    try:
        return probe.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER)
    finally:
        probe.close()


class SecureSQLiteFactory(SQLiteFactory):
    """eventsourcing's SQLite persistence, with secure_delete on each of its connections."""

    application_recorder_class = OneStatementRecorder

    def __init__(self, env: Any) -> None:
        super().__init__(env)
        plain = self.datastore
        # Same settings, a pool whose connections overwrite deletions (the plain pool has not
        # connected yet: connections are made on first use).
        secure = _SecureDatastore(
            db_name=plain.pool.db_name,
            lock_timeout=plain.pool.lock_timeout,
            single_row_tracking=plain.single_row_tracking,
            originator_id_type=plain.originator_id_type,
        )
        secure.pool = _SecurePool(db_name=plain.pool.db_name, lock_timeout=plain.pool.lock_timeout)
        plain.close()
        self.datastore = secure


def secure_sqlite(engine: Any) -> None:
    """Make every connection of a SQLAlchemy engine on a SQLite file overwrite what it deletes."""
    from sqlalchemy import event  # imported here: this module's users already have SQLAlchemy

    if engine.dialect.name != "sqlite":
        return

    def on_connect(dbapi_connection: sqlite3.Connection, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute(SECURE_DELETE)
        cursor.close()

    event.listen(engine, "connect", on_connect)


def wipe_wal(connection: Any) -> bool:  # a DBAPI (sqlite3) connection, outside any transaction
    """Checkpoint the WAL into the database file and truncate it to zero bytes; True when done.

    Deleted rows are overwritten in the pages written from now on, but the WAL still holds the
    frames written before: until this runs, the "deleted" content sits in the -wal file. A reader
    in the middle of a transaction (any process) keeps the checkpoint from finishing (False).
    """
    cursor = connection.cursor()
    try:
        row = cursor.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
    finally:
        cursor.close()
    return row is not None and row[0] == 0
