"""Read-model tables: live path == rebuild == replay, exactly once under kill -9, verify/repair."""

from __future__ import annotations

import contextlib
import copy
import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import text

from flowstore import (
    FlowError,
    FlowStateCorruptionError,
    FlowStore,
    FunnelStep,
)
from flowstore.projections.batch import RowCache
from flowstore.projections.sql import SqlProjections
from flowstore.storage import parse_url
from tests.flows import Clock, linear, onboarding
from tests.strategies import TRANSITION_NAMES, flow_definitions

FLOW = "user-onboarding"


commands = st.lists(
    st.tuples(
        st.sampled_from(["u1", "u2", "u3"]),
        st.sampled_from(["transition", "transition", "transition", "reset", "clear", "override"]),
        st.sampled_from([*TRANSITION_NAMES, "nope"]),
        st.integers(0, 10),
    ),
    max_size=30,
)


def drive(store: FlowStore, flow: str, definition: dict[str, Any], script: list[Any]) -> None:
    steps = list(definition["steps"])
    for user, kind, name, n in script:
        try:
            if kind == "transition":
                store.execute_transition(user, flow, name, {"n": n})
            elif kind == "reset":
                store.reset_flow(user, flow)
            elif kind == "clear":
                store.clear_flow_state(user, flow)
            else:
                store.set_flow_state(user, {"flow": flow, "step": steps[n % len(steps)]})
        except FlowError:
            pass


def test_live_tables_equal_a_rebuild_for_random_streams(
    store_url: str, tables: SqlProjections
) -> None:
    clock = Clock()
    with FlowStore(store_url, clock=clock) as store:

        @settings(
            max_examples=15 if "postgres" in store_url else 30,
            deadline=None,
            suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
        )
        @given(definition=flow_definitions(), script=commands, tick=st.integers(0, 5))
        def run(definition: dict[str, Any], script: list[Any], tick: int) -> None:
            flow = f"f-{uuid.uuid4().hex[:10]}"
            definition = {**definition, "flow": flow}
            store.create_flow(definition)
            clock.advance(tick)
            drive(store, flow, definition, script)
            assert store.verify_projections() == []

        run()
        store.sync_projections()
        live = tables.snapshot()
        assert live["flow_history"]  # the examples did write something
        replayed = store.rebuild_projections()
        assert replayed == store.log_position() or "postgres" in store_url  # PG ids have gaps
        assert tables.compare(live, tables.snapshot()) == []
        assert store.verify_projections() == []


def test_a_rebuild_equals_tables_that_summed_its_floats_in_other_groups(
    store_url: str, tables: SqlProjections
) -> None:
    """Three runs start in one minute, one in its first second and two in the next, and complete
    0.1, 0.2 and 0.3 ms later. A catch-up of one event at a time adds the minute's durations as
    (0.1 + 0.2) + 0.3; a rebuild sums each second first, 0.1 + (0.2 + 0.3): the last bit differs.
    `compare` (as `verify`) takes them as the same, and still names a count that differs."""
    minute = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
    clock = Clock(minute)
    with FlowStore(store_url, clock=clock, live_projections=False) as store:
        store.create_flow(linear("sums", steps=2))
        for user, second, took in (("a", 0, 100), ("b", 1, 200), ("c", 1, 300)):
            clock.now = minute + timedelta(seconds=second, microseconds=took)
            store.reset_flow(user, "sums")
            clock.advance(took / 1e6)
            store.execute_transition(user, "sums", "next")
        store.catch_up_projections(batch=1)
        assert store.verify_projections() == []
        live = tables.snapshot()
        store.rebuild_projections()
        rebuilt = tables.snapshot()
        assert store.verify_projections() == []
    key = ("sums", 60, int(minute.timestamp()), "")
    summed = (live["flow_activity"][key], rebuilt["flow_activity"][key])
    assert [row["completed"] for row in summed] == [3, 3]
    assert [row["completed_duration_ms"] for row in summed] == [
        (0.1 + 0.2) + 0.3,
        0.1 + (0.2 + 0.3),
    ]
    assert tables.compare(live, rebuilt) == []
    miscounted = copy.deepcopy(live)
    miscounted["flow_activity"][key]["completed"] = 4
    assert [(d.key, d.problem) for d in tables.compare(miscounted, rebuilt)] == [
        (key, "wrong completed")
    ]


def test_a_catch_up_told_to_stop_returns_after_the_batch_in_progress(
    store_url: str, tables: SqlProjections
) -> None:
    """A worker stopping with a backlog ahead commits the batch it is on and leaves the rest to
    the next catch-up (its own, or the next leader's), rather than running through all of it."""
    with FlowStore(store_url, live_projections=False) as store:
        store.create_flow(linear("backlog", steps=40))
        for _ in range(30):
            store.execute_transition("ann", "backlog", "next")
        head = store.log_position()
        tenth = store.read_events(1, 10)[-1][0]
        stop = threading.Event()
        stop.set()
        assert store.catch_up_projections(batch=10, stop=stop) == tenth
        assert tables.position() == tenth < head
        assert store.verify_projections() == []  # the batch whole, as far as it went
        assert store.catch_up_projections(batch=10) == head


def test_a_rebuild_in_small_pages_past_its_cache_equals_the_live_tables(
    store_url: str, tables: SqlProjections, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pages of 7 events and a cache of 4 state rows: rows are looked up in the new tables once
    the copies overflow, erasures and restarts span pages; the result is the live tables."""
    monkeypatch.setattr(RowCache, "LIMIT", 4)
    rng = random.Random(5)
    with FlowStore(store_url) as store:
        store.create_flow(onboarding())
        for n in range(120):
            user = f"u{rng.randrange(8)}"
            kind = rng.choice(["go", "go", "go", "reset", "clear", "erase"])
            with contextlib.suppress(FlowError):
                if kind == "go":
                    store.execute_transition(user, FLOW, rng.choice(["start", "skip", "save"]))
                elif kind == "reset":
                    store.reset_flow(user, FLOW)
                elif kind == "clear":
                    store.clear_flow_state(user, FLOW)
                elif n % 3 == 0:
                    store.erase_user(user)
        store.sync_projections()
        live = tables.snapshot()
        assert tables.rebuild(store.read_events, page=7) > 100
        assert tables.compare(live, tables.snapshot()) == []
        assert store.verify_projections() == []


def test_queries_read_the_tables_and_see_their_own_writes(store_url: str) -> None:
    with FlowStore(store_url) as store:
        store.create_flow(onboarding())
        store.execute_transition("ann", FLOW, "start")
        assert [s.step for s in store.get_user_flows("ann")] == ["profile-setup"]
        assert len(store.get_flow_history("ann", FLOW)) == 2
        store.sync_projections()
        assert store.projection_position() == store.log_position()


def test_funnel_counts_entries_moves_and_drops(store_url: str) -> None:
    with FlowStore(store_url) as store:
        store.create_flow(onboarding())
        for user in ("a", "b", "c"):
            store.execute_transition(user, FLOW, "start")
        store.execute_transition("a", FLOW, "skip")
        store.execute_transition("a", FLOW, "complete")
        store.clear_flow_state("b", FLOW)  # dropped at profile-setup
        funnel = {f.step: f for f in store.get_flow_funnel(FLOW)}
    assert funnel["welcome"] == FunnelStep(
        step="welcome", entered=3, moved_on=3, dropped=0, current=0
    )
    assert funnel["profile-setup"] == FunnelStep(
        step="profile-setup", entered=3, moved_on=1, dropped=1, current=1
    )
    assert funnel["verification"].entered == 1
    assert funnel["completed"].entered == 1
    assert funnel["preferences"] == FunnelStep(
        step="preferences", entered=0, moved_on=0, dropped=0, current=0
    )


def test_corrupted_rows_are_found_by_verify_and_fixed_by_repair(
    store_url: str, tables: SqlProjections
) -> None:
    with FlowStore(store_url) as store:
        store.create_flow(onboarding())
        for user in ("ann", "bob"):
            store.execute_transition(user, FLOW, "start")
        store.sync_projections()  # the rows to damage are there
        with tables.engine.begin() as conn:
            conn.execute(text("UPDATE flow_states SET step = 'bogus' WHERE user_id = 'ann'"))
            conn.execute(text("UPDATE flow_counters SET started = started + 5"))
            conn.execute(text("DELETE FROM flow_history WHERE user_id = 'bob' AND version = 1"))
        with pytest.raises(FlowStateCorruptionError) as caught:
            store.get_user_flows("ann")
        assert (caught.value.user_id, caught.value.flow_id) == ("ann", FLOW)
        assert "bogus" in caught.value.detail

        found = {(d.table, d.key, d.problem) for d in store.verify_projections()}
        assert found == {
            ("flow_states", ("ann", FLOW), "wrong step"),
            ("flow_counters", (FLOW,), "wrong started"),
            ("flow_history", ("bob", FLOW, 1), "missing row"),
        }
        assert "user_id='ann'" in store.verify_projections()[0].describe() or any(
            "user_id='ann'" in d.describe() for d in store.verify_projections()
        )
        repaired = store.repair_projections(user_id="bob")
        assert [(d.table, d.key) for d in repaired] == [("flow_history", ("bob", FLOW, 1))]
        assert len(store.verify_projections()) == 2
        store.repair_projections()
        assert store.verify_projections() == []
        assert [s.step for s in store.get_user_flows("ann")] == ["profile-setup"]


def test_recover_flow_state_rebuilds_one_instance(store_url: str, tables: SqlProjections) -> None:
    with FlowStore(store_url) as store:
        store.create_flow(onboarding())
        store.execute_transition("ann", FLOW, "start")
        store.execute_transition("ann", FLOW, "skip")
        store.sync_projections()
        with tables.engine.begin() as conn:
            conn.execute(text("UPDATE flow_states SET step = 'nowhere' WHERE user_id = 'ann'"))
            conn.execute(text("DELETE FROM flow_history WHERE user_id = 'ann'"))
        with pytest.raises(FlowStateCorruptionError):
            store.get_user_flows("ann")
        state = store.recover_flow_state("ann", FLOW)
        assert state is not None
        assert [s.step for s in store.get_user_flows("ann")] == ["verification"]
        assert [h.transition for h in store.get_flow_history("ann", FLOW)] == [
            "",
            "start",
            "skip",
        ]
        assert store.verify_projections() == []


def test_readers_never_see_empty_tables_during_a_rebuild(store_url: str) -> None:
    with FlowStore(store_url) as store:
        store.create_flow(linear("f", steps=2))
        for i in range(50):
            store.reset_flow("ann", "f") if i % 2 else store.execute_transition(
                f"u{i}", "f", "next"
            )
        expected = len(store.get_flow_history("ann", "f"))
        seen: list[int] = []
        errors: list[BaseException] = []
        first_read = threading.Event()
        stop = threading.Event()

        def read() -> None:
            try:
                with FlowStore(store_url) as reader:
                    while not stop.is_set():
                        seen.append(len(reader.get_flow_history("ann", "f")))
                        first_read.set()
            except BaseException as exc:  # surfaced by the assertion below
                errors.append(exc)
                first_read.set()

        reader = threading.Thread(target=read)
        reader.start()
        try:
            assert first_read.wait(timeout=60)
            reads_before = len(seen)
            rebuilds = 0
            # Rebuild until the reader has read many times while rebuilds were running.
            while len(seen) < reads_before + 50 and rebuilds < 200 and not errors:
                store.rebuild_projections()
                rebuilds += 1
        finally:
            stop.set()
            reader.join()
    assert errors == []
    assert seen
    assert set(seen) == {expected}


WORKER = [sys.executable, "-m", "flowstore.adapters.cli"]


def test_a_worker_killed_at_random_points_leaves_exact_tables(
    store_url: str, tables: SqlProjections
) -> None:
    rng = random.Random(4)
    with FlowStore(store_url, live_projections=False) as store:
        store.create_flow(onboarding())
        for i in range(150):
            user = f"u{i}"
            for transition in rng.sample(["start", "skip", "continue", "bogus", "complete"], 3):
                with contextlib.suppress(FlowError):
                    store.execute_transition(user, FLOW, transition)
        head = store.log_position()
    assert tables.position() == 0
    env = {**os.environ, "FLOWSTORE_URL": store_url}
    # Batches of 3: the work takes long enough for two kills even when this process is starved
    # for a while between seeing progress and killing (with 7, a busy CI could lose the race).
    args = [*WORKER, "projections", "run", "--interval", "0.02", "--batch", "3"]
    kills = 0
    while tables.position() < head and kills < 6:
        before = tables.position()
        worker = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        while tables.position() == before and time.monotonic() < deadline:
            time.sleep(0.005)  # polling for progress, not synchronising on time
        time.sleep(rng.uniform(0, 0.05))  # then die at a random point of the work
        worker.send_signal(signal.SIGKILL)
        worker.wait()
        kills += 1
    assert kills >= 2, "the worker finished before it could be killed twice"
    worker = subprocess.Popen(
        args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert worker.stdout is not None
    assert "following the log" in worker.stdout.readline()  # its SIGTERM handler is in place
    deadline = time.monotonic() + 120
    while tables.position() < head and time.monotonic() < deadline:
        time.sleep(0.01)
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=30) == 0
    assert tables.position() == head
    with FlowStore(store_url) as store:
        assert store.verify_projections() == []
        after_kills = tables.snapshot()
        store.rebuild_projections()
    assert tables.compare(after_kills, tables.snapshot()) == []


def test_cli_verify_exits_non_zero_on_differences(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'x.db'}"
    with FlowStore(url) as store:
        store.create_flow(onboarding())
        store.execute_transition("ann", FLOW, "start")
    env = {**os.environ, "FLOWSTORE_URL": url}
    ok = subprocess.run([*WORKER, "projections", "verify"], env=env, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    handle = SqlProjections(parse_url(url))
    with handle.engine.begin() as conn:
        conn.execute(text("UPDATE flow_states SET version = 99"))
    handle.close()
    bad = subprocess.run(
        [*WORKER, "projections", "verify"], env=env, capture_output=True, text=True
    )
    assert bad.returncode == 8
    assert "user_id='ann'" in bad.stdout
    assert "wrong version" in bad.stdout


def test_a_rebuild_leaves_the_garbage_collector_as_it_found_it(
    store_url: str, tables: SqlProjections
) -> None:
    """Pages are folded with the cyclic collector paused (reference counting frees them); it is
    on again afterwards, and stays off for an application that turned it off, even on failure."""
    import gc

    with FlowStore(store_url) as store:
        store.create_flow(onboarding())
        store.execute_transition("u1", FLOW, "start")
        assert gc.isenabled()
        store.rebuild_projections()
        assert gc.isenabled()

        def failing(start: int, limit: int) -> Any:
            raise RuntimeError("the log went away")

        with pytest.raises(RuntimeError):
            tables.rebuild(failing)
        assert gc.isenabled()
        gc.disable()
        try:
            store.rebuild_projections()
            assert not gc.isenabled()
        finally:
            gc.enable()
        assert store.verify_projections() == []
