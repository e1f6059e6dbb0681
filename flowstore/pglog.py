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
from typing import Any

import psycopg
from eventsourcing.persistence import InterfaceError, OperationalError, StoredEvent
from eventsourcing.postgres import PostgresApplicationRecorder
from eventsourcing.utils import retry

__all__ = ["OneTripRecorder"]


class OneTripRecorder(PostgresApplicationRecorder):
    """eventsourcing's PostgreSQL application recorder, appending in one round trip."""

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
            with conn.pipeline() as pipeline, conn.cursor() as control, conn.cursor() as insert:
                try:
                    control.execute("BEGIN")
                    self._lock_table(control)
                    self._notify_channel(control)
                    insert.execute(self.insert_events_statement, (rows,), prepare=True)
                    control.execute("COMMIT")
                    pipeline.sync()
                    ids = [row["notification_id"] for row in insert.fetchall()]
                except psycopg.Error as exc:
                    failed = exc  # raised once out of the pipeline (psycopg warns otherwise)
            if failed is not None:
                if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
                    conn.execute("ROLLBACK")
                raise failed  # get_connection turns it into eventsourcing's error
        return ids
