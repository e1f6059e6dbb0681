"""One SQLAlchemy engine per store: projections, users' keys and the Kafka tracker share it."""

from __future__ import annotations

from typing import Any

import pytest
import sqlalchemy

import flowstore.storage
from flowstore import FlowStore
from flowstore.adapters.kafka.tracking import PublisherTracking
from tests.flows import linear
from tests.pgserver import PostgresServer


def test_a_store_opens_one_engine_and_everything_of_ours_uses_it(
    store_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    created: list[sqlalchemy.Engine] = []
    real = sqlalchemy.create_engine

    def counting(*args: Any, **kwargs: Any) -> sqlalchemy.Engine:
        engine = real(*args, **kwargs)
        created.append(engine)
        return engine

    monkeypatch.setattr(sqlalchemy, "create_engine", counting)
    with FlowStore(store_url, kafka=False, pool_size=3) as store:
        store.create_flow(linear("f"))
        store.execute_transition("ann", "f", "next")  # a key is made and read, tables written
        assert store.get_flow_history("ann", "f")[-1].to_step == "s1"
        assert created == [store.engine]
        assert store.engine.pool.size() == 3  # type: ignore[attr-defined]
        tracking = PublisherTracking(store.config, store.engine)
        tracking.advance("t", 1)
        assert tracking.position("t") == 1
        assert created == [store.engine]


def test_the_pool_size_comes_from_the_environment_when_not_given(
    store_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(flowstore.storage.POOL_SIZE_ENV, "7")
    with FlowStore(store_url, kafka=False) as store:
        assert store.engine.pool.size() == 7  # type: ignore[attr-defined]


def test_a_dedicated_connection_is_outside_the_pool_autocommit_and_kept_alive(
    pg_server: PostgresServer,
) -> None:
    # The connection a leader's lock or the log's LISTEN lives on (flowstore.leader, .notify).
    config = flowstore.storage.parse_url(pg_server.create_database())
    with flowstore.storage.connect_dedicated(config, "flowstore " + "x" * 100) as conn:
        assert conn.autocommit
        assert conn.info.get_parameters()["application_name"] == ("flowstore " + "x" * 100)[:63]
        assert conn.info.get_parameters()["keepalives_idle"] == "5"
