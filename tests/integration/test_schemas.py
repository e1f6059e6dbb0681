"""Two stores in two schemas of one PostgreSQL database share no row: every table is per schema."""

from __future__ import annotations

import pytest
from sqlalchemy import create_engine, text

from flowstore import FlowStore
from flowstore.adapters.kafka.tracking import PublisherLock, PublisherTracking
from flowstore.leader import LeaderLock
from flowstore.projections.tables import define_tables
from flowstore.storage import parse_url
from tests.flows import ring
from tests.integration.test_encryption import new_key
from tests.pgserver import PostgresServer


def test_two_schemas_of_one_database_share_nothing(pg_server: PostgresServer) -> None:
    base = pg_server.create_database()
    engine = create_engine(parse_url(base).sqlalchemy_url or "")
    with engine.begin() as conn:
        for schema in ("alpha", "beta"):
            conn.execute(text(f"CREATE SCHEMA {schema}"))
    urls = {schema: f"{base}?schema={schema}" for schema in ("alpha", "beta")}
    for schema, url in urls.items():
        # Encrypted: users' keys get a table too.
        with FlowStore(url, cipher_key=new_key()) as store:
            store.create_flow(ring(f"flow_{schema}"))
            store.execute_transition(f"user_{schema}", f"flow_{schema}", "tick")
            tracking = PublisherTracking(store.config, store.engine)
            tracking.advance(f"topic_{schema}", store.log_position())
            tracking.close()
            assert store.verify_projections() == []
    # What the standalone publisher opens (no store engine) must land in the schema too.
    standalone = PublisherTracking(parse_url(urls["beta"]))
    standalone.advance("topic_standalone", 1)
    standalone.close()

    with engine.connect() as conn:
        tables = {
            schema: {
                name
                for (name,) in conn.execute(
                    text(
                        "SELECT table_name FROM information_schema.tables WHERE table_schema = :s"
                    ),
                    {"s": schema},
                )
            }
            for schema in ("alpha", "beta", "public")
        }
        assert tables["public"] == set(), "nothing of either store in public"
        assert tables["alpha"] == tables["beta"]
        expected = {
            "flow_states",
            "flow_history",
            "projection_tracking",
            "kafka_publisher_tracking",
        }
        assert expected <= tables["alpha"]
        assert any("key" in name for name in tables["alpha"])
        for schema, other in (("alpha", "beta"), ("beta", "alpha")):
            for table in sorted(tables[schema]):
                dump = " ".join(
                    str(row) for row in conn.execute(text(f'SELECT * FROM {schema}."{table}"'))
                )
                assert f"_{other}" not in dump, f"{schema}.{table} holds a row of {other}"
        states = conn.execute(text("SELECT user_id FROM alpha.flow_states")).scalars().all()
        assert states == ["user_alpha"]
        topics = set(
            conn.execute(text("SELECT topic FROM beta.kafka_publisher_tracking")).scalars()
        )
        assert topics == {"topic_beta", "topic_standalone"}
    engine.dispose()


@pytest.mark.parametrize("name", ["projections", "kafka"])
def test_leader_locks_of_two_schemas_are_separate(pg_server: PostgresServer, name: str) -> None:
    base = pg_server.create_database()
    alpha, beta = parse_url(f"{base}?schema=alpha"), parse_url(f"{base}?schema=beta")
    if name == "kafka":
        first, second, again = (
            PublisherLock(alpha, "t"),
            PublisherLock(beta, "t"),
            PublisherLock(alpha, "t"),
        )
    else:
        first, second, again = (
            LeaderLock(alpha, name),
            LeaderLock(beta, name),
            LeaderLock(alpha, name),
        )
    try:
        assert first.try_acquire()
        assert second.try_acquire()  # another schema: another store, another leader
        assert not again.try_acquire()
    finally:
        for lock in (first, second, again):
            lock.release()


def test_stores_opening_a_new_database_together_create_its_tables_once(
    pg_server: PostgresServer,
) -> None:
    import threading

    from flowstore.adapters.http.console.jobs import Operations

    url = pg_server.create_database()
    with FlowStore(url) as first:  # the event table; the tables below are what processes race on
        first.create_flow(ring("r"))
    engine = create_engine(parse_url(url).sqlalchemy_url or "")
    with engine.begin() as conn:
        for table in [
            "projection_tracking",
            "console_jobs",
            *(t.name for t in define_tables().all),
        ]:
            conn.execute(text(f"DROP TABLE IF EXISTS {table} CASCADE"))
    engine.dispose()
    barrier, errors = threading.Barrier(4), []

    def open_store() -> None:
        try:
            barrier.wait()
            with FlowStore(url, live_projections=False) as store:
                Operations(store)
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=open_store) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
