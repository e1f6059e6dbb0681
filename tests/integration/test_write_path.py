"""The lean write path keeps its guarantees: key cache, group commit, folding outside the lock."""

from __future__ import annotations

import sqlite3
import threading
from typing import Any

import pytest
from eventsourcing.persistence import IntegrityError, OperationalError
from sqlalchemy import inspect

from flowstore import FlowStore, HistoryKind
from flowstore.commands import definition_of
from flowstore.decisions import execute_transition
from flowstore.domain import FlowInstance, instance_id
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
        (ann_ids, ann_error), (bob_ids, bob_error), (cat_ids, cat_error) = (
            internals.commit_group(commands)
        )
        assert isinstance(bob_error, IntegrityError)
        assert bob_ids is None
        assert ann_error is None
        assert cat_error is None
        assert ann_ids == [before + 1]
        # In commit order (PostgreSQL's sequence may skip the id the rolled-back insert took).
        assert cat_ids is not None
        assert cat_ids[0] > before + 1
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

        # eventsourcing's insert of one command of a group (inside the group's transaction).
        monkeypatch.setattr(recorder, "_insert_events", failing)
        commands = [_tick_events(store, u) for u in ("ann", "bob")]
        before = store.log_position()
        outcomes = internals.commit_group(commands)
        assert all(isinstance(error, OperationalError) and ids is None for ids, error in outcomes)
        assert store.log_position() == before


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
            names = {index["name"] for index in found.get_indexes(table.name)}
            assert names == {index.name for index in table.indexes}
        assert store.get_flow_state("u3", FLOW) is None
        assert store.verify_projections() == []
