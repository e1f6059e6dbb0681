"""How a rebuild reads and writes (issue 17): plain events, indexes built when needed, a reader
process; the results are always the live tables'."""

from __future__ import annotations

import contextlib
import gc
import pickle
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
from sqlalchemy import create_engine, inspect
from sqlalchemy.dialects import sqlite
from sqlalchemy.exc import IntegrityError
from sqlalchemy.schema import CreateTable

from flowstore import FlowError, FlowStore
from flowstore.errors import CorruptEventError
from flowstore.eventlog import UnreadableEvent
from flowstore.projections.readahead import ReadAhead, compact
from flowstore.projections.rebuild import _sorting_threads, _without_key
from flowstore.projections.sql import SqlProjections
from flowstore.projections.tables import REBUILD_SUFFIX, define_tables
from flowstore.testing import Internals
from tests.flows import onboarding
from tests.integration.test_encryption import new_key
from tests.reliability.test_bad_input import corrupt, seed

FLOW = "user-onboarding"


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
        assert before
        assert not any(before)
        assert after
        assert all(len(names) >= 2 for names in after)
        assert tables.compare(live, tables.snapshot()) == []
        assert store.verify_projections() == []


def _unique_indexes(tables: SqlProjections, table: str) -> list[list[str]]:
    """SQLite: the columns of each unique index of `table`, its primary key's own included
    (`sqlite_autoindex_...`, which SQLAlchemy's inspector leaves out)."""
    with tables.engine.connect() as conn:
        return [
            [column for _, _, column in conn.exec_driver_sql(f'PRAGMA index_info("{name}")')]
            for _, name, unique, *_ in conn.exec_driver_sql(f'PRAGMA index_list("{table}")')
            if unique
        ]


def test_a_rebuild_fills_the_history_before_building_its_key_which_then_holds(
    store_url: str, tables: SqlProjections
) -> None:
    """SQLite: the new history table gets its key (user, flow, version) at the swap, built once
    over all its rows, not kept up to date row by row; the rebuilt tables are the live ones, the
    key refuses a second row for a (user, flow, version) as the primary key did, and the next
    rebuild replaces a table carrying it."""
    on_sqlite = store_url.startswith("sqlite")
    with FlowStore(store_url) as store:
        store.create_flow(onboarding())
        for user in ("ann", "bob", "cy"):
            store.execute_transition(user, FLOW, "start")
        store.execute_transition("cy", FLOW, "skip")
        store.sync_projections()
        live = tables.snapshot()
        key = [c.name for c in tables.tables.history.primary_key.columns]
        filling: list[list[list[str]]] = []

        def look(replayed: int, position: int) -> None:
            if on_sqlite:
                filling.append(_unique_indexes(tables, "flow_history__rebuild"))

        for _ in range(2):
            filling.clear()
            tables.rebuild(store.read_events, page=2, progress=look)
            assert len(filling) > 1 or not on_sqlite
            assert not any(filling)  # no key while the rows go in
            assert tables.snapshot() == live
            if on_sqlite:
                assert _unique_indexes(tables, "flow_history") == [key]
            row = next(iter(live["flow_history"].values()))
            with pytest.raises(IntegrityError), tables.engine.begin() as conn:
                conn.execute(tables.tables.history.insert(), dict(row))
        assert store.verify_projections() == []


def test_the_keyless_history_table_is_the_history_table_but_for_its_key() -> None:
    # Whatever a column of the history table comes to hold (a default, a type's constraint),
    # the table a SQLite rebuild fills must declare it too: only the PRIMARY KEY clause goes.
    history = define_tables(REBUILD_SUFFIX).history
    whole, keyless = (
        str(CreateTable(table).compile(dialect=sqlite.dialect()))
        for table in (history, _without_key(history))
    )
    key = ", ".join(c.name for c in history.primary_key.columns)
    assert f"PRIMARY KEY ({key})" in whole
    assert keyless == whole.replace(f", \n\tPRIMARY KEY ({key})", "")


def test_sorting_threads_are_set_for_the_block_and_set_back_after_it(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite:///{tmp_path / 'threads.db'}")
    with engine.connect() as conn:
        threads = lambda: conn.exec_driver_sql("PRAGMA threads").scalar_one()  # noqa: E731
        before = threads()
        with _sorting_threads(conn, 2):
            if threads() == before:
                pytest.skip("this SQLite has no worker threads (the setting is ignored)")
            assert threads() == 2
        assert threads() == before
        with pytest.raises(RuntimeError), _sorting_threads(conn, 2):
            raise RuntimeError("an index build failed")
        assert threads() == before
    engine.dispose()


def _build_log(store: FlowStore) -> None:
    """Starts, transitions, an erasure and a reset: every kind of row, across pages of 5."""
    store.create_flow(onboarding())
    for n in range(16):
        with contextlib.suppress(FlowError):  # some moves are refused: recorded all the same
            store.execute_transition(f"u{n % 4}", FLOW, ["start", "skip", "save"][n // 4 % 3])
    store.erase_user("u1")
    store.reset_flow("u2", FLOW)


def test_a_rebuild_reading_ahead_in_a_child_process_equals_the_live_tables(
    store_url: str, tables: SqlProjections
) -> None:
    """The child reads and decodes the pages after the first (once it has opened the log), an
    unreadable event among them: the rebuild is the live tables, and names that event."""
    seed(store_url)
    with FlowStore(store_url) as store:
        _build_log(store)
    corrupt(store_url, "fields")
    with FlowStore(store_url) as store:
        store.reset_flow("u3", FLOW)
        store.sync_projections()
        live = tables.snapshot()
        parts = Internals(store)._parts
        with ReadAhead(parts.log, parts.read_plain, 5) as read:
            assert read.wait_until_ready(60)
            assert tables.rebuild(read, page=5) == store.log_position()
            assert read.served >= 3
        assert tables.compare(live, tables.snapshot()) == []
        assert len(store.unreadable_events()) == 1
        assert store.verify_projections() == []


def test_the_reading_child_gets_no_secret_in_its_arguments_or_environment(
    store_url: str,
) -> None:
    key = new_key()
    with FlowStore(store_url, cipher_key=key) as store:
        _build_log(store)
        parts = Internals(store)._parts
        with ReadAhead(parts.log, parts.read_plain, 5) as read:
            assert read.wait_until_ready(60)
            child = read._child
            assert child is not None
            seen = Path(f"/proc/{child.pid}/cmdline").read_bytes()
            seen += Path(f"/proc/{child.pid}/environ").read_bytes()
            assert key.encode() not in seen
            assert store_url.encode() not in seen
            assert Internals(store).projections.rebuild(read, page=5) > 0
            assert read.served >= 1  # it read the encrypted log with the key it was given
        assert store.verify_projections() == []


_ORPHAN = """
import sys
from flowstore import FlowError, FlowStore
from flowstore.errors import CorruptEventError
from flowstore.eventlog import UnreadableEvent
from flowstore.projections.readahead import ReadAhead, compact
from flowstore.testing import Internals
store = FlowStore(sys.argv[1], live_projections=False)
parts = Internals(store)._parts
read = ReadAhead(parts.log, parts.read_plain, 5)
assert read.wait_until_ready(60)
print(read._child.pid, flush=True)
sys.stdin.read()  # until killed
"""


def test_the_reading_child_ends_when_its_parent_is_killed(store_url: str) -> None:
    with FlowStore(store_url) as store:
        _build_log(store)
    parent = subprocess.Popen(
        [sys.executable, "-c", _ORPHAN, store_url],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
    finally:
        parent.kill()
        parent.wait()
    for _ in range(600):  # the child sees its pipe close and exits (a zombie, if nobody reaps)
        status = Path(f"/proc/{child}/status")
        if not status.exists() or "State:\tZ" in status.read_text():
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"the reading child {child} outlived its parent")


def test_a_plain_read_gives_the_decoded_events_fields_page_by_page(
    store_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A plain read (a rebuild's, the publisher's) gives each event's fields exactly as decoding
    it does: sealed fields opened, an erased user's stand-ins, an unreadable event named in its
    place, in pages that split users' runs. On SQLite it reads the driver's rows without the
    recorder's `select_notifications` (a `Notification` and a `UUID` per row)."""
    seed(store_url)
    with FlowStore(store_url) as store:
        _build_log(store)
    corrupt(store_url, "bytes")
    with FlowStore(store_url, live_projections=False) as store:
        store.reset_flow("u3", FLOW)
        log = Internals(store)._parts.log
        end = store.log_position()
        decoded = [
            (n, e if isinstance(e, UnreadableEvent) else (type(e).__name__, e.__dict__))
            for n, e in log.read(1, end, contain=True)
        ]
        assert any(isinstance(e, UnreadableEvent) for _, e in decoded)
        if store_url.startswith("sqlite"):
            recorder = Internals(store).recorder

            def unused(*args: object) -> None:
                raise AssertionError("a plain read went through select_notifications")

            monkeypatch.setattr(recorder, "select_notifications", unused)
        plain = [
            e
            for start in range(1, end + 1, 7)
            for e in log.read(start, 7, contain=True, plain=True)
        ]
        assert plain == decoded
        with pytest.raises(CorruptEventError):
            log.read(1, end, plain=True)  # not contained: the unreadable event raises


def test_the_collector_stays_off_through_a_rebuild_and_is_back_on_after(
    store_url: str, tables: SqlProjections
) -> None:
    """Turned back on between pages it scanned every object of the page in flight (3 of the
    rebuild's 45 µs per event): it is off from the first page to the swap."""
    with FlowStore(store_url) as store:
        _build_log(store)
        seen: list[bool] = []
        tables.rebuild(store.read_events, page=3, progress=lambda *_: seen.append(gc.isenabled()))
        assert len(seen) > 3
        assert not any(seen)
        assert gc.isenabled()
        assert store.verify_projections() == []


def test_the_reading_child_sends_each_string_of_a_page_once() -> None:
    """`compact`: the same events (definition events as their kind alone), equal strings of
    instance events as one object, so that the parent unpickles each once per page."""
    instance = UUID(int=5)
    moment = datetime(2026, 1, 2, tzinfo=UTC)
    events: list[tuple[int, Any]] = [
        (
            n,
            (
                "FlowCleared",
                {
                    "originator_id": instance,
                    "timestamp": moment,
                    "flow_id": "".join(["f", "1"]),
                    "from_step": None,
                    "user_id": f"u{n % 2}",
                },
            ),
        )
        for n in range(1, 5)
    ]
    events.append((5, ("FlowDefined", {"definition": object()})))
    events.append((6, UnreadableEvent(6, str(instance), 3, "bad")))
    sent = compact(events)
    assert sent[:4] == events[:4]
    assert sent[4:] == [(5, ("FlowDefined", {})), events[5]]
    flows = {id(fields["flow_id"]) for _, (_, fields) in sent[:4]}
    users = {id(fields["user_id"]) for _, (_, fields) in sent[:4]}
    assert (len(flows), len(users)) == (1, 2)
    assert pickle.loads(pickle.dumps(sent, protocol=5)) == sent
