"""How a rebuild reads and writes (issue 17): plain events, indexes built when needed, a reader
process; the results are always the live tables'."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy import inspect

from flowstore import FlowStore
from flowstore.projections.sql import SqlProjections
from flowstore.storage import parse_url
from tests.flows import onboarding

FLOW = "user-onboarding"


@pytest.fixture
def tables(store_url: str) -> Iterator[SqlProjections]:
    """A second handle on the store's tables, to rebuild them and look at them from outside."""
    handle = SqlProjections(parse_url(store_url))
    yield handle
    handle.close()


def _instance_indexes(tables: SqlProjections) -> set[str]:
    with tables.engine.connect() as conn:
        found = inspect(conn)
        return {
            index["name"] or ""
            for table in found.get_table_names()
            if table.endswith("__rebuild")
            for index in found.get_indexes(table)
            if (index["name"] or "").endswith("_instance")
        }


def test_a_rebuild_indexes_its_tables_by_instance_from_the_first_erasure_on(
    store_url: str, tables: SqlProjections
) -> None:
    """Rows are inserted without the indexes by instance id (one B-tree fewer per row) until an
    erasure, which deletes by instance id, needs them; the result is the live tables."""
    with FlowStore(store_url) as store:
        store.create_flow(onboarding())
        for user in ("ann", "bob", "cy"):
            store.execute_transition(user, FLOW, "start")
        store.erase_user("bob")
        erased_at = store.log_position()
        store.execute_transition("cy", FLOW, "skip")
        store.execute_transition("dee", FLOW, "start")
        store.sync_projections()
        live = tables.snapshot()
        seen: list[tuple[int, set[str]]] = []
        tables.rebuild(
            store.read_events,
            page=2,
            progress=lambda _, p: seen.append((p, _instance_indexes(tables))),
        )
        before = [names for position, names in seen if position < erased_at]
        after = [names for position, names in seen[:-1] if position >= erased_at]
        assert before and not any(before)
        assert after and all(len(names) >= 2 for names in after)  # states' and history's
        assert tables.snapshot() == live
        assert store.verify_projections() == []
