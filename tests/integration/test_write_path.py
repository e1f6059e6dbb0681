"""The lean write path keeps its guarantees: key cache, group commit, folding outside the lock."""

from __future__ import annotations

import sqlite3
import threading
from typing import Any, cast

import pytest
from eventsourcing.persistence import IntegrityError, OperationalError
from sqlalchemy import bindparam, inspect
from sqlalchemy.dialects import postgresql, sqlite

from flowstore import FlowStore, HistoryKind
from flowstore.commands import definition_of
from flowstore.decisions import execute_transition
from flowstore.domain import FlowInstance, instance_id
from flowstore.projections import writes
from flowstore.projections.batch import INSERT, SUM, UPDATE, columns_of
from flowstore.projections.sql import SqlProjections
from flowstore.testing import Internals, ring_flow

FLOW = "loop"


def _ticks(store: FlowStore, user: str) -> int:
    return sum(
        h.kind is HistoryKind.TRANSITION and h.success for h in store.get_flow_history(user, FLOW)
    )


def test_a_users_key_is_read_once_however_many_commands(store_url: str) -> None:
    with FlowStore(store_url) as store:
        store.create_flow(ring_flow(FLOW))
        with Internals(store).key_lookups() as loads:
            for _ in range(20):
                store.execute_transition("ann", FLOW, "tick", {"n": 1})
        # Created on the first command (looked up, inserted, read back), then never read again.
        assert loads == [1, 1]


def test_a_batch_loads_and_creates_all_its_users_keys_at_once(store_url: str) -> None:
    users = [f"user-{i}" for i in range(40)]
    with FlowStore(store_url) as store:
        store.create_flow(ring_flow(FLOW))
        with Internals(store).key_lookups() as loads:
            results = store.execute_transitions([(u, FLOW, "tick", None) for u in users])
        assert all(not isinstance(r, Exception) for r in results)
        assert loads == [40, 40]  # one lookup for all, one read-back of those just created
        assert all(_ticks(store, u) == 1 for u in users)


def test_an_erasure_by_another_store_stops_this_ones_cached_key(store_url: str) -> None:
    with FlowStore(store_url) as serving, FlowStore(store_url) as admin:
        serving.create_flow(ring_flow(FLOW))
        serving.execute_transition("ann", FLOW, "tick", {"secret": "first run"})
        internals = Internals(serving)
        assert admin.erase_user("ann") == 1
        # `refresh` seconds later the serving store looks for erasures in the log.
        with internals.keys_later(internals.keys.refresh + 1):
            old = [e for _, e in serving.read_events(1) if getattr(e, "payload", None)]
            assert all(e.payload != {"secret": "first run"} for e in old)
            # Her new run gets a new key, so it stays readable (not sealed with the shredded one).
            serving.execute_transition("ann", FLOW, "tick", {"secret": "second run"})
    with FlowStore(store_url) as fresh:
        state = fresh.get_flow_state("ann", FLOW)
        assert state is not None
        assert state.payload == {"secret": "second run"}
        assert fresh.verify_projections() == []


def _with_users(store: FlowStore, *users: str) -> Internals:
    """The ring flow defined and each user's run started; the store's internals."""
    store.create_flow(ring_flow(FLOW))
    for user in users:
        store.reset_flow(user, FLOW)
    return Internals(store)


def _tick_events(store: FlowStore, user: str) -> list[Any]:
    """The events of one accepted tick for `user`, decided but not appended."""
    commands = Internals(store).commands
    instance = commands.get_instance(instance_id(user, FLOW))
    assert isinstance(instance, FlowInstance)
    definition = definition_of(instance, commands.versions(FLOW))
    decision = execute_transition(
        instance,
        definition,
        transition="tick",
        payload=None,
        now=commands.clock(),
        elapsed_ms=0,
    )
    return list(decision.events)


def test_a_group_commits_each_command_but_the_conflicting_one(store_url: str) -> None:
    with FlowStore(store_url) as store:
        store.create_flow(ring_flow(FLOW))
        for user in ("ann", "bob", "cat"):
            store.reset_flow(user, FLOW)
        internals = Internals(store)
        bob = _tick_events(store, "bob")
        store.execute_transition("bob", FLOW, "tick")  # bob moves on: the decided tick is stale
        commands = [_tick_events(store, "ann"), bob, _tick_events(store, "cat")]
        before = store.log_position()
        (ann_ids, ann_error), (bob_ids, bob_error), (cat_ids, cat_error) = internals.commit_group(
            commands
        )
        assert isinstance(bob_error, IntegrityError)
        assert bob_ids is None
        assert ann_error is None
        assert cat_error is None
        # In commit order (PostgreSQL's sequence may skip the ids rolled-back inserts took: the
        # group's one insert, then bob's).
        assert ann_ids is not None
        assert cat_ids is not None
        assert before < ann_ids[0] < cat_ids[0]
        assert len(ann_ids) == len(cat_ids) == 1
        internals.commands.forget_instance(instance_id("ann", FLOW))
        internals.commands.forget_instance(instance_id("cat", FLOW))
        store.sync_projections()
        store.catch_up_projections()
        assert [_ticks(store, u) for u in ("ann", "bob", "cat")] == [1, 1, 1]
        assert store.verify_projections() == []


def test_a_group_whose_commit_fails_commits_none_of_it(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    with FlowStore(f"sqlite:///{tmp_path / 'g.db'}") as store:
        store.create_flow(ring_flow(FLOW))
        for user in ("ann", "bob"):
            store.reset_flow(user, FLOW)
        internals = Internals(store)
        recorder: Any = internals.recorder
        insert, calls = recorder._insert_events, []

        def failing(cursor: Any, stored: Any) -> Any:
            calls.append(1)
            if len(calls) == 2:
                raise sqlite3.OperationalError("disk I/O error")
            return insert(cursor, stored)

        def conflicting(stored: Any) -> Any:
            raise IntegrityError("as if a command of the group conflicted")

        # The group's one insert conflicts, so each command goes in a savepoint of its own;
        # eventsourcing's insert of the second (inside the group's transaction) fails.
        monkeypatch.setattr(recorder, "insert_events", conflicting)
        monkeypatch.setattr(recorder, "_insert_events", failing)
        commands = [_tick_events(store, u) for u in ("ann", "bob")]
        before = store.log_position()
        outcomes = internals.commit_group(commands)
        assert all(isinstance(error, OperationalError) and ids is None for ids, error in outcomes)
        assert store.log_position() == before


def test_a_group_without_conflicts_is_appended_in_one_insert(store_url: str) -> None:
    with FlowStore(store_url) as store:
        users = ("ann", "bob", "cat")
        internals = _with_users(store, *users)
        recorder: Any = internals.recorder
        insert, inserts = recorder.insert_events, []

        def counted(stored: Any, **kwargs: Any) -> Any:
            inserts.append(len(stored))
            return insert(stored, **kwargs)

        recorder.insert_events = counted
        try:
            commands = [_tick_events(store, u) for u in users]
            before = store.log_position()
            outcomes = internals.commit_group(commands)
        finally:
            del recorder.insert_events
        assert inserts == [sum(map(len, commands))]  # one statement / round trip for all
        assert [(ids, error) for ids, error in outcomes] == [
            ([before + 1], None),
            ([before + 2], None),
            ([before + 3], None),
        ]
        assert [e for _, e in store.read_events(before + 1)] == [e for c in commands for e in c]
        internals.commands.forget_instance(instance_id("ann", FLOW))
        store.sync_projections()
        store.catch_up_projections()
        assert [_ticks(store, u) for u in users] == [1, 1, 1]
        assert store.verify_projections() == []


def test_threads_sharing_one_store_lose_no_update(store_url: str) -> None:
    threads, per_thread = 4, 15
    with FlowStore(store_url, max_retries=200) as store:
        store.create_flow(ring_flow(FLOW))
        store.reset_flow("shared", FLOW)
        barrier = threading.Barrier(threads)
        errors: list[BaseException] = []

        def work(t: int) -> None:
            barrier.wait(timeout=60)
            try:
                for _ in range(per_thread):
                    store.execute_transition("shared", FLOW, "tick")  # conflicts: retried
                    store.execute_transition(f"own-{t}", FLOW, "tick")  # never conflicts
            except BaseException as exc:
                errors.append(exc)

        workers = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        assert errors == []
        assert _ticks(store, "shared") == threads * per_thread
        assert [_ticks(store, f"own-{t}") for t in range(threads)] == [per_thread] * threads
        assert store.verify_projections() == []


def test_a_fold_overtaken_by_another_catch_up_is_discarded(store_url: str) -> None:
    with FlowStore(store_url, live_projections=False) as store:
        store.create_flow(ring_flow(FLOW))
        for _ in range(5):
            store.execute_transition("ann", FLOW, "tick")
        other = SqlProjections(store.config)  # another process's runner, on its own engine
        overtaken = []

        def read(start: int, limit: int) -> list[Any]:
            events = store.read_events(start, limit)
            if not overtaken:  # the other runner applies the same events meanwhile
                overtaken.append(other.catch_up(store.read_events))
            return events

        try:
            assert store.read_model().catch_up(read) == store.log_position()
        finally:
            other.close()
        assert overtaken == [store.log_position()]
        assert _ticks(store, "ann") == 5  # applied once, not twice
        assert store.verify_projections() == []


def test_a_rebuild_builds_every_index_of_the_live_tables(store_url: str) -> None:
    with FlowStore(store_url) as store:
        store.create_flow(ring_flow(FLOW))
        store.execute_transitions([(f"u{i}", FLOW, "tick", None) for i in range(30)])
        store.erase_user("u3")
        assert store.rebuild_projections() == store.log_position()
        found = inspect(store.engine)
        for table in store.read_model().tables.all:
            indexes = found.get_indexes(table.name)
            names = {index["name"] for index in indexes}
            declared = {index.name for index in table.indexes}
            if store_url.startswith("sqlite") and table.name == "flow_history":
                # SQLite: the key, built at the swap (`rebuild._key_index_ddl`)
                (key,) = [i for i in indexes if i["name"] not in declared]
                assert key["unique"]
                assert key["column_names"] == [c.name for c in table.primary_key.columns]
                declared.add(key["name"])
            assert names == declared
        assert store.get_flow_state("u3", FLOW) is None
        assert store.verify_projections() == []


def test_a_runner_whose_position_another_moved_folds_again(store_url: str) -> None:
    # After a batch of its own a runner starts the next from where it left the tables, without
    # reading the position: the conditional move must catch the other runner's batches.
    with FlowStore(store_url, live_projections=False) as store:
        store.create_flow(ring_flow(FLOW))
        mine = Internals(store).projections
        store.execute_transition("ann", FLOW, "tick")
        assert mine.catch_up(store.read_events) == store.log_position()
        other = SqlProjections(store.config)
        try:
            for _ in range(3):
                store.execute_transition("ann", FLOW, "tick")
            assert other.catch_up(store.read_events) == store.log_position()
            assert mine.catch_up(store.read_events) == store.log_position()  # nothing new
            for _ in range(2):
                store.execute_transition("ann", FLOW, "tick")
            other.catch_up(store.read_events, page=1)  # one event further than `mine` knows
            assert mine.catch_up(store.read_events) == store.log_position()
        finally:
            other.close()
        assert _ticks(store, "ann") == 6  # each applied once
        assert store.get_flow_statistics(FLOW).performance_metrics.throughput_per_second >= 0
        assert store.verify_projections() == []


def test_a_sqlite_catch_up_takes_two_thousand_events_a_transaction(store_url: str) -> None:
    # SQLite's transactions cost less per event the more they hold (each state row rewritten
    # once each); PostgreSQL's live pages stay at a thousand (more would go by COPY).
    with FlowStore(store_url, live_projections=False) as store:
        store.create_flow(ring_flow(FLOW))
        runner = Internals(store).projections
        start = runner.catch_up(store.read_events)
        users = [f"u{i}" for i in range(500)]
        for _ in range(3):
            store.execute_transitions([(u, FLOW, "tick", None) for u in users])
        end = store.log_position()
        assert 1000 < end - start <= 2000
        batches: list[tuple[int, int, int]] = []
        runner.catch_up(store.read_events, projected=lambda a, b, n, _: batches.append((a, b, n)))
        if store.engine.dialect.name == "sqlite":
            assert batches == [(start + 1, end, end - start)]
        else:
            assert batches == [
                (start + 1, start + 1000, 1000),
                (start + 1001, end, end - start - 1000),
            ]
        assert all(_ticks(store, u) == 3 for u in ("u0", "u499"))
        assert store.verify_projections() == []


def _dump(store: FlowStore) -> dict[str, list[str]]:
    """Every row of every projection table as the database renders it (types and JSON null too)."""
    from sqlalchemy import text

    dumped = {}
    with store.engine.connect() as conn:
        for table in Internals(store).projections.tables.all:
            if conn.dialect.name == "postgresql":
                query = f'SELECT row_to_json(t)::text FROM "{table.name}" t'
            else:  # quote() shows each value's storage class: 1 and 1.0 differ, as do 'x' and x
                query = 'SELECT {} FROM "{}"'.format(
                    " || ',' || ".join(f'quote("{c.name}")' for c in table.columns), table.name
                )
            dumped[table.name] = sorted(str(tuple(row)) for row in conn.execute(text(query)))
    return dumped


class _SqlAlchemyWriter:
    """The reference: rows written by SQLAlchemy statements, one parameter set per row."""

    def write_all(self, conn: Any, writes: list[tuple[Any, str, list[dict[str, Any]]]]) -> None:
        for table, how, rows in writes:
            self.write(conn, table, how, rows)

    def write(self, conn: Any, table: Any, how: str, rows: list[dict[str, Any]]) -> None:
        if how == INSERT:
            conn.execute(table.insert(), rows)
            return
        if how == UPDATE:  # some columns of rows known to be there
            keys, _ = columns_of(table)
            where = [table.c[k] == bindparam(f"key_{k}") for k in keys]
            sets = {c: bindparam(f"set_{c}") for c in rows[0] if c not in keys}
            conn.execute(
                table.update().where(*where).values(sets),
                [{f"key_{k}" if k in keys else f"set_{k}": v for k, v in r.items()} for r in rows],
            )
            return
        insert = (sqlite.insert if conn.dialect.name == "sqlite" else postgresql.insert)(table)
        keys, others = columns_of(table)
        sets = {
            c: table.c[c] + insert.excluded[c] if how == SUM else insert.excluded[c] for c in others
        }
        conn.execute(insert.on_conflict_do_update(index_elements=keys, set_=sets), rows)


@pytest.mark.parametrize("copy_from", [1000, 0], ids=["statements", "copy"])
def test_the_row_writer_stores_what_sqlalchemy_stores(
    store_url: str, copy_from: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The projector's writer (executemany on SQLite; on PostgreSQL one statement per table in
    # one pipeline, or COPY for many inserted rows); the same events written through SQLAlchemy
    # statements (a rebuild with them) give the very same rows.
    if copy_from == 0 and store_url.startswith("sqlite"):
        pytest.skip("SQLite has no COPY")
    monkeypatch.setattr(writes, "_COPY_FROM", copy_from)
    with FlowStore(store_url, live_projections=False) as store:
        store.create_flow(ring_flow(FLOW))
        store.execute_transitions(
            [
                (
                    f"u{i}",
                    FLOW,
                    "tick",
                    {"n": i, "deep": {"x": [1.5, None, "é\"'"]}} if i % 2 else None,
                )
                for i in range(12)
            ]
        )
        store.execute_transition("u1", FLOW, "tick", {"n": 0.1}, ok=False, message="late")
        store.reset_flow("u2", FLOW)
        store.erase_user("u3")
        store.catch_up_projections(batch=5)
        # SQLite updates only the changed columns of a state row it holds: values equal in
        # Python but stored otherwise (1, 1.0, True) must still be written, each its own batch.
        for payload, ok in (({"n": 1}, True), ({"n": 1.0}, False), ({"n": True}, True)):
            store.execute_transition("u4", FLOW, "tick", payload, ok=ok)
            store.catch_up_projections()
        live = _dump(store)
        assert sum(map(len, live.values())) > 30
        Internals(store).projections._writer = cast(Any, _SqlAlchemyWriter())
        store.rebuild_projections()
        assert _dump(store) == live
        assert store.verify_projections() == []


def test_a_state_row_missing_under_the_projectors_copy_fails_its_batch(store_url: str) -> None:
    # SQLite writes a state row its copies say the tables hold as an UPDATE of the changed
    # columns; if the row is gone (deleted by hand), the batch fails and writes nothing rather
    # than losing the row, and the next catch-up reads the tables again and writes it whole.
    if not store_url.startswith("sqlite"):
        pytest.skip("PostgreSQL upserts whole state rows")
    from sqlalchemy import delete, func, select

    with FlowStore(store_url, live_projections=False) as store:
        store.create_flow(ring_flow(FLOW))
        store.execute_transition("ann", FLOW, "tick")
        store.catch_up_projections()
        tables = Internals(store).projections.tables
        history = select(func.count()).select_from(tables.history)
        with store.engine.begin() as conn:
            conn.execute(delete(tables.states))
            before = conn.execute(history).scalar()
        position = store.projection_position()
        state = store.execute_transition("ann", FLOW, "tick")
        with pytest.raises(RuntimeError, match="missing"):
            store.catch_up_projections()
        assert store.projection_position() == position
        with store.engine.connect() as conn:  # the batch's history row went with it
            assert conn.execute(history).scalar() == before
        assert store.catch_up_projections() == store.log_position()
        with store.engine.connect() as conn:
            versions = conn.execute(select(tables.states.c.version)).scalars().all()
            assert versions == [state.version]
            assert conn.execute(history).scalar() == before + 1


def test_an_append_in_one_statement_commits_all_or_nothing(store_url: str) -> None:
    # flowstore.pglog sends the COMMIT with the append's other statements (one query), and
    # flowstore.sqlitelog appends in one autocommit INSERT: a conflict anywhere in the append
    # must still leave nothing committed, no transaction open, and the ids returned in order.
    from flowstore.pglog import OneTripRecorder
    from flowstore.sqlitelog import OneStatementRecorder

    with FlowStore(store_url) as store:
        internals = _with_users(store, "ann", "bob")
        recorder = internals.recorder
        assert isinstance(recorder, OneTripRecorder | OneStatementRecorder)
        stale = _tick_events(store, "ann")
        store.execute_transition("ann", FLOW, "tick")
        fresh = _tick_events(store, "bob")  # its insert alone would succeed
        before = store.log_position()
        with pytest.raises(IntegrityError):
            recorder.insert_events(internals.stored([*fresh, *stale]))
        assert store.log_position() == before  # bob's event went with the conflicting one
        if isinstance(recorder, OneTripRecorder):
            import psycopg

            with recorder.datastore.get_connection() as conn:  # returned to the pool clean
                assert conn.info.transaction_status is psycopg.pq.TransactionStatus.IDLE
        else:
            with recorder.datastore.get_connection(commit=True) as conn:
                assert not conn._sqlite_conn.in_transaction
        two = [*fresh, *_tick_events(store, "ann")]
        ids = list(recorder.insert_events(internals.stored(two)) or [])
        assert len(ids) == 2
        assert before < ids[0] < ids[1]  # PostgreSQL's sequence skips what the failure took
        assert store.read_events(ids[0]) == list(zip(ids, two, strict=True))
        state = store.execute_transition("ann", FLOW, "tick")
        assert state.version == stale[0].originator_version + 2
        store.sync_projections()
        assert store.verify_projections() == []


def test_a_postgres_append_is_one_query_whose_literals_keep_every_byte(
    pg_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # flowstore.pglog sends the append as one query string (no pipeline): the events' states
    # and topics go as literals, so any byte (quotes, backslashes, NUL) must come back as it was.
    import psycopg
    from eventsourcing.persistence import StoredEvent

    with FlowStore(pg_server.create_database()) as store:
        recorder = Internals(store).recorder
        states = [b"", b"\x00'\"\\\x00\xff", bytes(range(256)), b"{'a': \"b\"}"]
        stored = [
            StoredEvent(instance_id(f"bytes-{i}", FLOW), 1, "odd'topic\\ \u00e9", state)
            for i, state in enumerate(states)
        ]
        execute, queries = psycopg.Cursor.execute, []

        def counted(self: Any, query: Any, *args: Any, **kwargs: Any) -> Any:
            queries.append(query)
            return execute(self, query, *args, **kwargs)

        monkeypatch.setattr(psycopg.Cursor, "execute", counted)
        ids = recorder.insert_events(stored)
        monkeypatch.undo()
        appends = [q for q in queries if isinstance(q, bytes)]  # not the notifier's LISTEN
        assert len(appends) == 1  # BEGIN, lock, NOTIFY, INSERT, COMMIT in one message
        assert ids is not None
        assert len(ids) == len(stored)
        found = recorder.select_notifications(ids[0], 10)
        assert [n.id for n in found] == list(ids)
        assert [(n.topic, bytes(n.state)) for n in found] == [(e.topic, e.state) for e in stored]


def test_a_sqlite_append_too_big_for_one_statement_goes_the_recorders_way(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Over the statement's parameter limit (or on a SQLite without RETURNING, before 3.35, when
    # the limit is 0), eventsourcing's own insert appends: still all or nothing, ids in order.
    with FlowStore(f"sqlite:///{tmp_path / 'big.db'}") as store:
        internals = _with_users(store, "ann", "bob")
        recorder = internals.recorder
        monkeypatch.setattr(recorder, "_most", 1)
        stale = _tick_events(store, "ann")
        store.execute_transition("ann", FLOW, "tick")
        before = store.log_position()
        with pytest.raises(IntegrityError):
            recorder.insert_events(internals.stored([*_tick_events(store, "bob"), *stale]))
        assert store.log_position() == before
        two = [*_tick_events(store, "bob"), *_tick_events(store, "ann")]
        assert list(recorder.insert_events(internals.stored(two)) or []) == [before + 1, before + 2]
        assert [e for _, e in store.read_events(before + 1)] == two


def test_a_sqlite_append_takes_its_ids_from_the_rows_even_once_rowids_are_random(
    tmp_path: Any,
) -> None:
    # An append's ids are worked out from the statement's last rowid (rows of one INSERT get
    # consecutive rowids), except in a log holding the largest rowid, where SQLite picks new
    # rowids at random: there they must come from the rows themselves.
    path = tmp_path / "random.db"
    with FlowStore(f"sqlite:///{path}", live_projections=False) as store:
        internals = _with_users(store, "ann", "bob", "cat")
        two = [*_tick_events(store, "ann"), *_tick_events(store, "bob")]
        before = store.log_position()
        assert list(internals.recorder.insert_events(internals.stored(two)) or []) == [
            before + 1,
            before + 2,
        ]
        last = internals.stored(_tick_events(store, "cat"))[0]
    with sqlite3.connect(path) as raw:  # another writer gives one row the largest rowid
        raw.execute(
            "INSERT INTO stored_events (rowid, originator_id, originator_version, topic, state) "
            "VALUES (?, ?, ?, ?, ?)",
            (2**63 - 1, last.originator_id.hex, last.originator_version, last.topic, last.state),
        )
    with FlowStore(f"sqlite:///{path}", live_projections=False) as store:
        internals = Internals(store)
        for _ in range(3):
            events = [*_tick_events(store, "ann"), *_tick_events(store, "bob")]
            ids = list(internals.recorder.insert_events(internals.stored(events)) or [])
            with sqlite3.connect(path) as raw:
                found = [
                    raw.execute(
                        "SELECT rowid FROM stored_events "
                        "WHERE originator_id = ? AND originator_version = ?",
                        (event.originator_id.hex, event.originator_version),
                    ).fetchone()[0]
                    for event in events
                ]
            assert ids == sorted(found)
            for user in ("ann", "bob"):
                internals.commands.forget_instance(instance_id(user, FLOW))


def test_a_failing_statement_of_a_pipelined_batch_raises_as_sqlalchemy_does(
    store_url: str,
) -> None:
    # PostgreSQL runs a batch's statements in one pipeline, on the driver: its errors must still
    # reach the projector (and `storage_errors`) as SQLAlchemy's, and the batch write nothing.
    from sqlalchemy import exc, func, select

    from flowstore.projections.writes import RowWriter

    with FlowStore(store_url, live_projections=False) as store:
        store.create_flow(ring_flow(FLOW))
        store.execute_transition("ann", FLOW, "tick")
        store.catch_up_projections()
        tables = Internals(store).projections.tables
        started = select(func.sum(tables.counters.c.started))
        with store.engine.connect() as conn:
            rows = [dict(r._mapping) for r in conn.execute(select(tables.history))]
            before = conn.execute(started).scalar()
        assert rows
        writer = RowWriter(store.engine.dialect)
        counters = [{c.name: 0 for c in tables.counters.columns} | {"flow_id": FLOW, "started": 5}]
        with pytest.raises(exc.IntegrityError), store.engine.begin() as conn:
            writer.write_all(
                conn, [(tables.counters, SUM, counters), (tables.history, INSERT, rows)]
            )
        with store.engine.connect() as conn:  # rolled back: the counters were not added to
            assert conn.execute(started).scalar() == before


def test_a_sqlite_append_is_not_parsed_again_after_reads_on_its_connection(tmp_path: Any) -> None:
    # The pool's connections serve the readers too (the live projector's BEGIN, SELECT,
    # ROLLBACK); with eventsourcing's statement cache of one, each of their statements evicted
    # the append's INSERT, which SQLite then parsed again (0.7 ms for a batch of 500).
    with FlowStore(f"sqlite:///{tmp_path / 'cache.db'}", live_projections=False) as store:
        internals = _with_users(store, "ann")
        with internals.recorder.datastore.get_connection(commit=True) as conn:
            raw: sqlite3.Connection = conn._sqlite_conn
        parsed: list[str] = []

        def authorizer(action: int, table: str | None, *_: Any) -> int:
            if action == sqlite3.SQLITE_INSERT:  # asked while a statement is parsed only
                parsed.append(cast(str, table))
            return sqlite3.SQLITE_OK

        raw.set_authorizer(authorizer)
        version = store.execute_transition("ann", FLOW, "tick").version
        first = len(parsed)
        for _ in range(3):
            raw.execute("BEGIN")
            raw.execute("SELECT MAX(rowid) FROM stored_events").fetchall()
            raw.execute("ROLLBACK")
            state = store.execute_transition("ann", FLOW, "tick")
        assert len(parsed) == first <= 1
        assert state.version == version + 3


def test_a_sqlite_append_binds_its_states_without_sqlites_adapters(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # sqlite3 looks bytes up in its adapter registry before binding them (~1 µs a row); the
    # states go as bytearrays, bound as the same BLOBs without that, and read back as bytes.
    adapted: list[Any] = []
    monkeypatch.setitem(
        sqlite3.adapters,
        (bytes, sqlite3.PrepareProtocol),
        lambda value: adapted.append(value) or value,
    )
    with FlowStore(f"sqlite:///{tmp_path / 'blobs.db'}") as store:
        internals = _with_users(store, "ann", "bob")
        before = store.log_position()
        events = [*_tick_events(store, "ann"), *_tick_events(store, "bob")]
        stored = internals.stored(events)
        assert internals.recorder.insert_events(stored) == [before + 1, before + 2]
        rows = internals.recorder.select_notifications(before + 1, 2)
        assert [(type(row.state), row.state) for row in rows] == [(bytes, s.state) for s in stored]
        assert [e for _, e in store.read_events(before + 1)] == events
    assert adapted == []
