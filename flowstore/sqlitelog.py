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
from typing import Any

from eventsourcing.sqlite import (
    SQLiteConnection,
    SQLiteConnectionPool,
    SQLiteDatastore,
    SQLiteFactory,
)

__all__ = ["SECURE_DELETE", "SecureSQLiteFactory", "secure_sqlite", "wipe_wal"]

SECURE_DELETE = "PRAGMA secure_delete = ON"
"""Run on every new SQLite connection of a store."""


class _SecurePool(SQLiteConnectionPool):
    def _create_connection(self) -> SQLiteConnection:
        connection = super()._create_connection()
        connection._sqlite_conn.execute(SECURE_DELETE)
        return connection


class SecureSQLiteFactory(SQLiteFactory):
    """eventsourcing's SQLite persistence, with secure_delete on each of its connections."""

    def __init__(self, env: Any) -> None:
        super().__init__(env)
        plain = self.datastore
        # Same settings, a pool whose connections overwrite deletions (the plain pool has not
        # connected yet: connections are made on first use).
        secure = SQLiteDatastore(
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
