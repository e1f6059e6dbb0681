"""One SQLAlchemy engine per store: projections, users' keys and the Kafka tracker share it."""

from __future__ import annotations

from typing import Any

import pytest
import sqlalchemy

import flowstore.storage
from flowstore import FlowStore
from flowstore.adapters.kafka.tracking import PublisherTracking
from tests.flows import linear


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
