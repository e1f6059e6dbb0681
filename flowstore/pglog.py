"""The PostgreSQL recorder of the event log: eventsourcing's, with an append in one round trip.

eventsourcing's `insert_events` sends, in a pipeline, BEGIN, the table lock (which keeps
notification ids in commit order), NOTIFY and the INSERT, waits for the INSERT's result, and only
then sends COMMIT: two round trips per append. Here the COMMIT goes in the same pipeline. If
anything before it fails (a conflicting version: optimistic concurrency), PostgreSQL skips the rest
of the pipeline up to its sync, the COMMIT with it, and the transaction is rolled back here before
the error is raised: nothing of a failed append is ever committed. `storage.parse_url` names this
class as the application recorder of PostgreSQL stores.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import psycopg
from eventsourcing.persistence import InterfaceError, OperationalError, StoredEvent
from eventsourcing.postgres import PostgresApplicationRecorder
from eventsourcing.utils import retry
from psycopg.sql import SQL, Composable, Identifier

__all__ = ["OneTripRecorder"]


class OneTripRecorder(PostgresApplicationRecorder):
    """eventsourcing's PostgreSQL application recorder, appending in one round trip."""

    _rendered: tuple[bytes, bytes, bytes, bytes] | None = None

    @retry((InterfaceError, OperationalError), max_attempts=10, wait=0.2)
    def insert_events(
        self, stored_events: Sequence[StoredEvent], **kwargs: Any
    ) -> Sequence[int] | None:
        """Record the events (all or none) and return their notification ids.

        Retried like eventsourcing's when the connection drops: a retry of an append that did
        commit meets its own rows, which `EventLog.save` recognises as its own.
        """
        if self.datastore.enable_db_functions or not stored_events:
            ids: Sequence[int] | None = super().insert_events(stored_events, **kwargs)
            return ids

        rows = [
            self.construct_pg_stored_event(e.originator_id, e.originator_version, e.topic, e.state)
            for e in stored_events
        ]
        failed: psycopg.Error | None = None
        ids = []
        with self.datastore.get_connection() as conn:
            lock_timeout, lock, notify, insert_sql = self._statements(conn)
            with conn.pipeline() as pipeline, conn.cursor() as control, conn.cursor() as insert:
                try:
                    control.execute(b"BEGIN")
                    control.execute(lock_timeout, prepare=True)
                    control.execute(lock, prepare=True)
                    control.execute(notify)
                    insert.execute(insert_sql, (rows,), prepare=True)
                    control.execute(b"COMMIT")
                    pipeline.sync()
                    ids = [row["notification_id"] for row in insert.fetchall()]
                except psycopg.Error as exc:
                    failed = exc  # raised once out of the pipeline (psycopg warns otherwise)
            if failed is not None:
                if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
                    conn.execute("ROLLBACK")
                raise failed  # get_connection turns it into eventsourcing's error
        return ids

    def _statements(self, conn: psycopg.Connection[Any]) -> tuple[bytes, bytes, bytes, bytes]:
        """The append's statements as bytes, rendered once (psycopg composes eventsourcing's
        `sql.Composed` statements again on every execute: a quarter of an append's CPU)."""
        if self._rendered is None:
            lock_timeout, lock = (
                cast(Composable, s).as_bytes(conn) for s in self.lock_table_statements
            )
            notify = SQL("NOTIFY {0}").format(Identifier(self.channel_name)).as_bytes(conn)
            insert = cast(Composable, self.insert_events_statement).as_bytes(conn)
            self._rendered = (lock_timeout, lock, notify, insert)
        return self._rendered
