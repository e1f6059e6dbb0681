"""The PostgreSQL recorder of the event log: eventsourcing's, with an append in one round trip.

eventsourcing's `insert_events` sends, in a pipeline, BEGIN, the table lock (which keeps
notification ids in commit order), NOTIFY and the INSERT, waits for the INSERT's result, and only
then sends COMMIT: two round trips per append. Here all of them, COMMIT included, go as one query
string (the simple query protocol, the events as literals escaped by libpq): one message, one
exchange, and none of a pipeline's per-statement client work (which cost more CPU than the rest of
a command). If a statement fails (a conflicting version: optimistic concurrency), PostgreSQL skips
the rest of the query, the COMMIT with it, and the transaction is rolled back here before the
error is raised: nothing of a failed append is ever committed. `storage.parse_url` names this
class as the application recorder of PostgreSQL stores.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast
from uuid import UUID

import psycopg
from eventsourcing.persistence import InterfaceError, OperationalError, StoredEvent
from eventsourcing.postgres import PostgresApplicationRecorder
from eventsourcing.utils import retry
from psycopg.sql import SQL, Composable, Identifier, Literal

__all__ = ["OneTripRecorder"]

_RETURNING = b" RETURNING notification_id"


def _first(row: Any) -> int:
    """The first column of a row, whatever the connection's row factory (dicts here)."""
    return int(row["notification_id"] if isinstance(row, dict) else row[0])


class OneTripRecorder(PostgresApplicationRecorder):
    """eventsourcing's PostgreSQL application recorder, appending in one round trip."""

    _rendered: tuple[bytes, bytes, bytes, bytes] | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._topics: dict[str, bytes] = {}  # each topic as an SQL literal

    @retry((InterfaceError, OperationalError), max_attempts=10, wait=0.2)
    def insert_events(
        self, stored_events: Sequence[StoredEvent], **kwargs: Any
    ) -> Sequence[int] | None:
        """Record the events (all or none) and return their notification ids.

        Retried like eventsourcing's when the connection drops: a retry of an append that did
        commit meets its own rows, which `EventLog.save` recognises as its own.
        """
        if self.datastore.enable_db_functions or not stored_events:
            inserted: Sequence[int] | None = super().insert_events(stored_events, **kwargs)
            return inserted

        failed: psycopg.Error | None = None
        ids: list[int] = []
        with self.datastore.get_connection() as conn:
            query = self._query(conn, stored_events)
            with conn.cursor() as cursor:
                try:
                    # No parameters: the simple query protocol, all statements in one message
                    # and one exchange (each statement's result comes back in turn).
                    cursor.execute(query, prepare=False)
                    while True:
                        if cursor.description is not None:  # the INSERT's RETURNING
                            ids = [_first(row) for row in cursor.fetchall()]
                        if not cursor.nextset():
                            break
                except psycopg.Error as exc:
                    failed = exc  # a failed statement skips the rest of the query, COMMIT too
            if failed is not None:
                if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
                    conn.execute("ROLLBACK")
                raise failed  # get_connection turns it into eventsourcing's error
        return sorted(ids)  # assigned in the rows' order, whatever order they came back in

    def _query(self, conn: psycopg.Connection[Any], stored_events: Sequence[StoredEvent]) -> bytes:
        """BEGIN, the table lock, NOTIFY, the INSERT of the events as literals, COMMIT: one query."""
        lock_timeout, lock, notify, insert = self._statements(conn)
        topics = self._topics
        rows = []
        for event in stored_events:
            originator = event.originator_id
            uuid = originator if isinstance(originator, UUID) else UUID(str(originator))
            topic = topics.get(event.topic)
            if topic is None:
                topic = topics[event.topic] = Literal(event.topic).as_bytes(conn)
            state = Literal(event.state).as_bytes(conn)  # bytea, escaped by libpq
            rows.append(
                b"('%s'::uuid,%d,%s,%s)"
                % (uuid.hex.encode(), event.originator_version, topic, state)
            )
        return b";".join(
            (b"BEGIN", lock_timeout, lock, notify, insert + b",".join(rows) + _RETURNING, b"COMMIT")
        )

    def _statements(self, conn: psycopg.Connection[Any]) -> tuple[bytes, bytes, bytes, bytes]:
        """The append's statements as bytes, rendered once (psycopg composes eventsourcing's
        `sql.Composed` statements again on every execute: a quarter of an append's CPU)."""
        if self._rendered is None:
            lock_timeout, lock = (
                cast(Composable, s).as_bytes(conn) for s in self.lock_table_statements
            )
            notify = SQL("NOTIFY {0}").format(Identifier(self.channel_name)).as_bytes(conn)
            insert = (
                SQL("INSERT INTO {0}.{1} (originator_id, originator_version, topic, state) VALUES ")
                .format(Identifier(self.datastore.schema), Identifier(self.events_table_name))
                .as_bytes(conn)
            )
            self._rendered = (lock_timeout, lock, notify, insert)
        return self._rendered
