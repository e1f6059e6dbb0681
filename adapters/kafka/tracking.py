"""Where a publisher stands, and the lock that keeps one publisher per topic and store.

The position (the notification id of the last event the broker acknowledged) lives in the table
`kafka_publisher_tracking` of the store's own database, one row per topic. It only moves forward
(`UPDATE ... WHERE position < new`), so a publisher that lost its lock without knowing it cannot
move it back.

The lock depends on the backend:

- PostgreSQL: a session advisory lock (`pg_try_advisory_lock`) on a connection held for the
  publisher's lifetime (with TCP keepalives); the server releases it when that connection or its
  process dies (`flowstore.leader`).
- SQLite: an OS file lock (`flock`) on `<database>.kafka-<topic>.lock` beside the database file.
  A lock row held under `BEGIN IMMEDIATE` would do the same job but would block every writer of the
  store for as long as the publisher runs; the kernel releases a file lock when the process dies.
- memory://: a lock in this process (the store exists only here).
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import (
    BigInteger,
    Column,
    Connection,
    DateTime,
    Engine,
    MetaData,
    String,
    Table,
    create_engine,
    insert,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.pool import StaticPool

from flowstore.leader import LeaderLock
from flowstore.storage import READ_ONLY, StorageConfig, make_engine, serialize_ddl

__all__ = ["TRACKING_TABLE", "PublisherLock", "PublisherTracking"]

_metadata = MetaData()

TRACKING_TABLE = Table(
    "kafka_publisher_tracking",
    _metadata,
    Column("topic", String(255), primary_key=True),
    Column("position", BigInteger, nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)
"""One row per topic: the notification id of the last event the broker acknowledged."""


def _engine(config: StorageConfig) -> Engine:
    if config.sqlalchemy_url is None:
        # memory:// has no database to share: the position lives (and dies) with this process.
        return create_engine(
            "sqlite://", poolclass=StaticPool, connect_args={"check_same_thread": False}
        )
    # The store's engine recipe: on PostgreSQL its search path is the URL's schema, so the
    # tracking table lives beside the store's other tables, not in `public`.
    return make_engine(config, pool_size=1)


class PublisherTracking:
    """The publisher's position per topic, in the store's database."""

    def __init__(self, config: StorageConfig, engine: Engine | None = None) -> None:
        # The store's one engine (`FlowStore.engine`), or one of our own; always our own for
        # memory://, whose engine is one shared connection that only the projections may use.
        if config.sqlalchemy_url is None:
            engine = None
        self._owns_engine = engine is None
        self.engine = engine if engine is not None else _engine(config)
        with self.engine.begin() as conn:
            serialize_ddl(conn)  # workers of a fleet start together
            _metadata.create_all(conn)

    def close(self) -> None:
        """Release connections (of an engine of our own)."""
        if self._owns_engine:
            self.engine.dispose()

    def position(self, topic: str) -> int:
        """The notification id of the last event published to `topic` (0 before the first)."""
        with self.engine.connect().execution_options(**READ_ONLY) as conn:
            return self._position(conn, topic)

    def known(self, topic: str) -> bool:
        """Whether a publisher has ever recorded a position for `topic`."""
        with self.engine.connect().execution_options(**READ_ONLY) as conn:
            query = select(TRACKING_TABLE.c.position).where(TRACKING_TABLE.c.topic == topic)
            return conn.execute(query).first() is not None

    @staticmethod
    def _position(conn: Connection, topic: str) -> int:
        query = select(TRACKING_TABLE.c.position).where(TRACKING_TABLE.c.topic == topic)
        return int(conn.execute(query).scalar() or 0)

    def advance(self, topic: str, position: int) -> None:
        """Record that every event up to `position` is on the broker (never moves backwards)."""
        now = datetime.now(UTC)
        with self.engine.begin() as conn:
            moved = conn.execute(
                update(TRACKING_TABLE)
                .where(TRACKING_TABLE.c.topic == topic, TRACKING_TABLE.c.position < position)
                .values(position=position, updated_at=now)
            ).rowcount
            if moved or self._has_row(conn, topic):
                return
        try:
            with self.engine.begin() as conn:
                conn.execute(
                    insert(TRACKING_TABLE).values(topic=topic, position=position, updated_at=now)
                )
        except IntegrityError:  # another publisher inserted the row first: move it instead
            self.advance(topic, position)

    @staticmethod
    def _has_row(conn: Connection, topic: str) -> bool:
        query = select(TRACKING_TABLE.c.topic).where(TRACKING_TABLE.c.topic == topic)
        return conn.execute(query).first() is not None

    def reset(self, topic: str, position: int = 0) -> None:
        """Set the position, backwards too (to publish the log again to a fresh topic)."""
        with self.engine.begin() as conn:
            conn.execute(
                update(TRACKING_TABLE)
                .where(TRACKING_TABLE.c.topic == topic)
                .values(position=position, updated_at=datetime.now(UTC))
            )


class PublisherLock(LeaderLock):
    """Held by the one active publisher of a topic and store; `acquire` waits for it.

    A `flowstore.leader.LeaderLock` that keeps the names earlier releases used (the lock file
    `<database>.kafka-<topic>.lock`, the advisory key), so an older publisher still running
    during an upgrade is kept out.
    """

    def __init__(self, config: StorageConfig, topic: str, *, store_key: str = "") -> None:
        schema = config.env.get("POSTGRES_SCHEMA", "")
        super().__init__(
            config,
            f"kafka-{topic}",
            store_key=store_key,
            advisory_name=f"flowstore.kafka_publisher:{schema}:{topic}",
        )
        self.topic = topic
