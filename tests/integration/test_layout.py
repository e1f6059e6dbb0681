"""Projection table layouts: opening never drops tables; `migrate` replaces them blue/green."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import create_engine, inspect, text

import flowstore.projections.tables as layouts
from flowstore import FlowStore, ProjectionLayoutError
from flowstore.adapters.cli import main
from flowstore.storage import parse_url
from tests.flows import ring

NOW = layouts.LAYOUT
NEXT = NOW + 1


def populate(store: FlowStore, users: int = 5) -> None:
    store.create_flow(ring("r"))
    for n in range(users):
        store.execute_transition(f"u{n}", "r", "tick")
        store.execute_transition(f"u{n}", "r", "flip")


def rows(url: str, table: str) -> int:
    engine = create_engine(parse_url(url).sqlalchemy_url or "")
    try:
        with engine.connect() as conn:
            return int(conn.execute(text(f"SELECT count(*) FROM {table}")).scalar_one())
    finally:
        engine.dispose()


def test_opening_tables_of_an_older_layout_raises_and_leaves_them_alone(
    store_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with FlowStore(store_url) as store:
        populate(store)
    history = rows(store_url, "flow_history")
    monkeypatch.setattr(layouts, "LAYOUT", NEXT)  # this process is the next version
    with pytest.raises(ProjectionLayoutError, match="projections migrate") as raised:
        FlowStore(store_url)
    assert (raised.value.found, raised.value.expected) == (NOW, NEXT)
    with FlowStore(store_url, live_projections=False) as store:
        with pytest.raises(ProjectionLayoutError):
            store.get_user_flows("u0")  # never reads tables it does not know
        with pytest.raises(ProjectionLayoutError):
            store.catch_up_projections()
    assert rows(store_url, "flow_history") == history  # nothing dropped, nothing replayed


def test_migrate_builds_the_new_layout_while_the_old_process_serves_then_tells_it(
    store_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    old = FlowStore(store_url)  # a process of the previous version, running through the upgrade
    try:
        populate(old)
        before = old.get_user_flows("u1")
        monkeypatch.setattr(layouts, "LAYOUT", NEXT)
        served_during: list[Any] = []
        with FlowStore(store_url, live_projections=False) as new:

            def progress(replayed: int, position: int) -> None:
                # Mid-migration: the old process still writes and reads its tables.
                if not served_during:
                    old.execute_transition("u1", "r", "tick")
                    served_during.append(old.get_user_flows("u1"))

            assert new.migrate_projections(progress) > 0
            assert served_during
            assert served_during[0][0].version == before[0].version + 1
            assert new.migrate_projections() == 0  # already current
            # The old process's write is in the log and in the new tables: nothing lost.
            assert new.get_user_flows("u1") == served_during[0]
            assert new.verify_projections() == []
            old.execute_transition("u2", "r", "tick")  # the log still takes its writes
            with pytest.raises(ProjectionLayoutError, match="new version"):
                old.get_user_flows("u2")  # but its tables are gone: it is told, typed
            assert new.catch_up_projections() == new.log_position()
            assert new.verify_projections() == []
        with FlowStore(store_url) as reopened:  # the next version opens normally now
            assert reopened.verify_projections() == []
    finally:
        monkeypatch.setattr(layouts, "LAYOUT", NOW)
        with pytest.raises(ProjectionLayoutError):
            old.close()  # its last catch-up finds no tables of its layout


def test_a_process_older_than_the_tables_is_told_to_upgrade(
    store_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(layouts, "LAYOUT", NEXT + 1)
    with FlowStore(store_url) as store:
        populate(store)
    monkeypatch.setattr(layouts, "LAYOUT", NEXT)
    with pytest.raises(ProjectionLayoutError, match="new version"):
        FlowStore(store_url)
    with (
        FlowStore(store_url, live_projections=False) as store,
        pytest.raises(ProjectionLayoutError),
    ):
        store.migrate_projections()  # never downgrades


def test_cli_projections_migrate(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"sqlite:///{tmp_path}/cli.db"
    with FlowStore(url) as store:
        populate(store)
    monkeypatch.setattr(layouts, "LAYOUT", NEXT)
    assert main(["--url", url, "state", "list", "u0"]) == 6  # PROJECTION_LAYOUT
    assert main(["--url", url, "projections", "migrate"]) == 0
    assert main(["--url", url, "state", "list", "u0"]) == 0
    engine = create_engine(parse_url(url).sqlalchemy_url or "")
    names = set(inspect(engine).get_table_names())
    engine.dispose()
    assert not any(name.endswith(layouts.REBUILD_SUFFIX) for name in names)
