"""Paged and filtered queries: history pages, a user's flows by status, instances by step and idle
time, statistics and the funnel over a time window, and the seed's history fields."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from flowstore import (
    FlowNotFoundError,
    FlowStore,
    HistoryKind,
    InvalidArgumentError,
    InvalidTransitionError,
    ProjectionLayoutError,
)
from flowstore.models import FlowStatus
from tests.flows import Clock, linear

FLOW = "user-onboarding"


def test_history_pages_follow_a_stable_cursor(store: FlowStore) -> None:
    store.execute_transition("ann", FLOW, "start")
    for _ in range(3):
        with pytest.raises(InvalidTransitionError):
            store.execute_transition("ann", FLOW, "nope")
    store.execute_transition("ann", FLOW, "continue")
    everything = store.get_flow_history("ann", FLOW)
    assert len(everything) == 6
    pages, after = [], None
    while page := store.get_flow_history("ann", FLOW, limit=4, after=after):
        pages.append(page)
        after = page[-1].id
        store.execute_transition(f"bob{len(pages)}", FLOW, "start")  # others write meanwhile
    assert [len(p) for p in pages] == [4, 2]
    assert [h for p in pages for h in p] == everything
    tail = store.get_flow_history("ann", FLOW, limit=2, before=everything[-1].id)
    assert tail == everything[3:5]
    assert store.get_flow_history("ann", FLOW, before=everything[2].id) == everything[:2]
    between = store.get_flow_history("ann", FLOW, after=everything[0].id, before=everything[3].id)
    assert between == everything[1:3]


def test_history_filters_by_kind_and_time(store: FlowStore, clock: Clock) -> None:
    store.execute_transition("ann", FLOW, "start")
    clock.advance(60)
    noon = clock()
    store.reset_flow("ann", FLOW)
    clock.advance(60)
    store.execute_transition("ann", FLOW, "start")
    kinds = [h.kind for h in store.get_flow_history("ann", FLOW, kinds=["reset", "transition"])]
    assert kinds == [HistoryKind.TRANSITION, HistoryKind.RESET, HistoryKind.TRANSITION]
    assert [h.kind for h in store.get_flow_history("ann", FLOW, kinds=[HistoryKind.START])] == [
        HistoryKind.START
    ]
    since_noon = store.get_flow_history("ann", FLOW, after=noon)
    assert [h.kind for h in since_noon] == [HistoryKind.RESET, HistoryKind.TRANSITION]
    before_noon = store.get_flow_history("ann", FLOW, before=noon)
    assert [h.kind for h in before_noon] == [HistoryKind.START, HistoryKind.TRANSITION]


@pytest.mark.parametrize(
    "arguments",
    [
        {"limit": 0},
        {"limit": True},
        {"limit": "3"},
        {"after": "not-a-cursor"},
        {"after": "00000000-0000-0000-0000-000000000000:1"},  # another instance's row
        {"before": 3},
        {"after": datetime(2026, 1, 1)},  # naive
        {"kinds": ["transition", "teleport"]},
    ],
)
def test_bad_history_arguments_are_invalid_arguments(
    store: FlowStore, arguments: dict[str, Any]
) -> None:
    store.execute_transition("ann", FLOW, "start")
    with pytest.raises(InvalidArgumentError):
        store.get_flow_history("ann", FLOW, **arguments)


def test_history_fields_are_the_seeds_strings(store: FlowStore) -> None:
    store.execute_transition("ann", FLOW, "start")
    with pytest.raises(InvalidTransitionError):
        store.execute_transition("ann", FLOW, "complete")
    store.clear_flow_state("ann", FLOW)
    rows = [(h.from_step, h.to_step, h.transition) for h in store.get_flow_history("ann", FLOW)]
    assert rows == [
        ("", "welcome", ""),  # the start: no step before, no transition
        ("welcome", "profile-setup", "start"),
        ("profile-setup", "profile-setup", "complete"),  # rejected: stayed where they were
        ("profile-setup", "", ""),  # cleared: on no step
    ]
    wire = store.get_flow_history("ann", FLOW)[0].to_dict()
    assert (wire["fromStep"], wire["toStep"], wire["transition"]) == ("", "welcome", "")


def test_the_seeds_recover_flow_state_example_works_after_a_rejected_transition(
    store: FlowStore,
) -> None:
    # The seed's recoverFlowState, as written, in Python.
    def recover_flow_state(user_id: str, flow_id: str) -> None:
        history = store.get_flow_history(user_id, flow_id)
        if len(history) > 0:
            last_valid_state = history[-1]
            store.set_flow_state(
                user_id,
                {
                    "flow": flow_id,
                    "step": last_valid_state.to_step,
                    "service": last_valid_state.metadata.get("service") or "default",
                    "ok": True,
                },
            )
        else:
            store.reset_flow(user_id, flow_id)

    store.execute_transition("ann", FLOW, "start")
    with pytest.raises(InvalidTransitionError):
        store.execute_transition("ann", FLOW, "complete")
    recover_flow_state("ann", FLOW)
    state = store.get_flow_state("ann", FLOW)
    assert state is not None
    assert (state.step, state.ok) == ("profile-setup", True)
    recover_flow_state("bob", FLOW)
    assert store.get_flow_state("bob", FLOW) is not None


def test_user_flows_by_status(store: FlowStore) -> None:
    store.create_flow(linear("short", 2))
    store.execute_transition("ann", "short", "next")  # completed
    store.execute_transition("ann", FLOW, "start")  # active
    assert [s.flow for s in store.get_user_flows("ann")] == ["short", FLOW]
    assert [s.flow for s in store.get_user_flows("ann", status="active")] == [FLOW]
    assert [s.flow for s in store.get_user_flows("ann", status=FlowStatus.COMPLETED)] == ["short"]
    with pytest.raises(InvalidArgumentError):
        store.get_user_flows("ann", status="cleared")


def test_list_instances_finds_who_is_stuck_and_pages(store: FlowStore, clock: Clock) -> None:
    for user in ("u1", "u2", "u3", "u4", "u5"):
        store.execute_transition(user, FLOW, "start")
        store.execute_transition(user, FLOW, "skip")  # at verification
    clock.advance(2 * 86_400)
    store.execute_transition("u3", FLOW, "complete")  # done
    store.reset_flow("u5", FLOW)  # back at welcome, just now
    store.execute_transition("u6", FLOW, "start")
    store.execute_transition("u6", FLOW, "skip")  # at verification, but recently

    stuck = store.list_instances(FLOW, step="verification", idle_for=timedelta(days=1))
    assert [s.user_id for s in stuck.instances] == ["u1", "u2", "u4"]
    assert stuck.next_cursor is None
    assert all(s.step == "verification" for s in stuck.instances)
    at_verification = store.list_instances(FLOW, step="verification")
    assert [s.user_id for s in at_verification.instances] == ["u1", "u2", "u4", "u6"]
    assert [s.user_id for s in store.list_instances(FLOW, status="completed").instances] == ["u3"]

    seen, cursor = [], None
    while True:
        page = store.list_instances(FLOW, limit=2, cursor=cursor)
        seen.append([s.user_id for s in page.instances])
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    assert seen == [["u1", "u2"], ["u4", "u5"], ["u6"]]
    assert store.list_instances(FLOW, idle_for=86_400.0).instances[0].user_id == "u1"


@pytest.mark.parametrize(
    "arguments",
    [
        {"limit": 0},
        {"limit": 1001},
        {"status": "cleared"},
        {"idle_for": -1},
        {"idle_for": "1d"},
        {"cursor": "%%%"},
        {"cursor": ""},
    ],
)
def test_bad_instance_listings_are_invalid_arguments(
    store: FlowStore, arguments: dict[str, Any]
) -> None:
    with pytest.raises(InvalidArgumentError):
        store.list_instances(FLOW, **arguments)


def test_list_instances_of_an_unknown_flow(store: FlowStore) -> None:
    with pytest.raises(FlowNotFoundError):
        store.list_instances("nope")


def _day_then_hour(store: FlowStore, clock: Clock) -> tuple[datetime, datetime]:
    """Day one: ann completes, bob fails once. A day later: cat starts. Returns both moments."""
    day_one = clock()
    store.execute_transition("ann", FLOW, "start")
    store.execute_transition("ann", FLOW, "skip")
    store.execute_transition("ann", FLOW, "complete")
    store.execute_transition("bob", FLOW, "start")
    with pytest.raises(InvalidTransitionError):
        store.execute_transition("bob", FLOW, "complete")
    clock.advance(86_400)
    later = clock()
    store.execute_transition("cat", FLOW, "start")
    clock.advance(30)
    return day_one, later


def test_statistics_over_a_window_count_only_that_window(store: FlowStore, clock: Clock) -> None:
    day_one, later = _day_then_hour(store, clock)
    everything = store.get_flow_statistics(FLOW)
    assert everything.total_flows == 3
    recent = store.get_flow_statistics(FLOW, since=later)
    assert recent.total_flows == 1
    assert recent.completion_rate == 0.0
    assert recent.error_rate == 0.0
    assert {s.step: s.count for s in recent.popular_steps} == {"welcome": 1, "profile-setup": 1}
    assert recent.active_users == 2  # bob and cat, now
    assert recent.performance_metrics.throughput_per_second == pytest.approx(1 / 30)
    first_day = store.get_flow_statistics(FLOW, since=day_one, until=later)
    assert first_day.total_flows == 2
    assert first_day.completion_rate == 0.5
    assert first_day.error_rate == pytest.approx(1 / 5)  # ann's 3 attempts and bob's 2
    every_flow = store.get_flow_statistics(since=day_one)
    assert every_flow.total_flows == everything.total_flows
    empty = {"since": clock() + timedelta(minutes=5), "until": clock() + timedelta(minutes=9)}
    assert store.get_flow_statistics(FLOW, **empty).total_flows == 0
    with pytest.raises(InvalidArgumentError):
        store.get_flow_statistics(FLOW, since=later, until=day_one)
    with pytest.raises(InvalidArgumentError):
        store.get_flow_statistics(FLOW, since=datetime(2026, 1, 1))


def test_the_funnel_over_a_window(store: FlowStore, clock: Clock) -> None:
    day_one, later = _day_then_hour(store, clock)
    recent = {s.step: s for s in store.get_flow_funnel(FLOW, since=later)}
    assert (recent["welcome"].entered, recent["welcome"].moved_on) == (1, 1)
    assert recent["profile-setup"].entered == 1
    assert recent["profile-setup"].current == 2  # bob (day one) and cat: now, not windowed
    assert recent["verification"].entered == 0
    assert [s.step for s in store.get_flow_funnel(FLOW, since=later)] == [
        s.step for s in store.get_flow_funnel(FLOW)
    ]
    whole = store.get_flow_funnel(FLOW, since=day_one - timedelta(hours=1))
    assert whole == store.get_flow_funnel(FLOW)


def test_windowed_tables_survive_a_rebuild_and_verify(store: FlowStore, clock: Clock) -> None:
    _day_then_hour(store, clock)
    store.erase_user("bob")
    before = store.get_flow_statistics(FLOW, since=clock() - timedelta(days=2))
    assert store.verify_projections() == []
    store.rebuild_projections()
    assert store.verify_projections() == []
    assert store.get_flow_statistics(FLOW, since=clock() - timedelta(days=2)) == before


def test_tables_of_the_older_layout_are_migrated(store_url: str, clock: Clock) -> None:
    from sqlalchemy import create_engine, text

    from flowstore.storage import parse_url

    with FlowStore(store_url, clock=clock) as store:
        store.create_flow(linear("f"))
        store.execute_transition("ann", "f", "next")
        expected = store.get_flow_statistics("f", since=clock() - timedelta(hours=1))
    engine = create_engine(parse_url(store_url).sqlalchemy_url or "")
    with engine.begin() as conn:  # what a database written by the previous release looks like
        conn.execute(text("DELETE FROM projection_tracking WHERE name = 'flowstore.layout'"))
        conn.execute(text("DROP TABLE flow_activity"))
    engine.dispose()
    with pytest.raises(ProjectionLayoutError):
        FlowStore(store_url, clock=clock)  # opening never drops or replays: an operator migrates
    with FlowStore(store_url, clock=clock, live_projections=False) as upgrading:
        assert upgrading.migrate_projections() > 0
    with FlowStore(store_url, clock=clock) as store:
        assert store.verify_projections() == []
        assert store.get_flow_statistics("f", since=clock() - timedelta(hours=1)) == expected
        assert store.get_flow_history("ann", "f")[0].from_step == ""


def test_set_flow_states_applies_each_instance_atomically_in_one_call(store: FlowStore) -> None:
    store.execute_transition("ann", FLOW, "start")
    results = store.set_flow_states(
        [
            {"userId": "ann", "state": {"flow": FLOW, "step": "verification", "service": "s"}},
            ("bob", {"flow": FLOW, "step": "preferences"}),
            {"userId": "cat", "state": {"flow": FLOW, "step": "nowhere"}},
            {"userId": "dan", "state": {"flow": "nope", "step": "welcome"}},
            {"userId": "ann", "state": {"flow": FLOW, "step": "completed"}},
        ]
    )
    kinds = [type(r).__name__ for r in results]
    assert kinds == [
        "FlowState",
        "FlowState",
        "InvalidStepError",
        "FlowNotFoundError",
        "FlowState",
    ]
    ann = store.get_flow_state("ann", FLOW)
    assert ann is not None
    assert (ann.step, ann.status) == ("completed", FlowStatus.COMPLETED)
    assert [h.to_step for h in store.get_flow_history("ann", FLOW)][-2:] == [
        "verification",
        "completed",
    ]
    bob = store.get_flow_state("bob", FLOW)
    assert bob is not None
    assert bob.step == "preferences"
    assert store.get_flow_state("cat", FLOW) is None  # bad input changes nothing
    with pytest.raises(InvalidArgumentError):
        store.set_flow_states([{"user": "ann"}])  # type: ignore[list-item]


def test_window_arguments_must_be_aware(store: FlowStore) -> None:
    with pytest.raises(InvalidArgumentError):
        store.get_flow_funnel(FLOW, until=datetime(2026, 1, 2))
    assert store.get_flow_funnel(FLOW, until=datetime(2026, 1, 2, tzinfo=UTC))


def test_the_read_model_answers_with_this_process_s_writes(store: FlowStore) -> None:
    # The console's window into the tables: no sync_projections() first, the call waits for them.
    state = store.execute_transition("ann", FLOW, "start")
    rows = store.read_model().user_flows("ann")
    assert [(row["flow_id"], row["step"]) for row in rows] == [(FLOW, state.step)]


def test_a_window_reads_whole_hours_from_hour_rows_and_its_ends_from_minute_rows() -> None:
    """Every minute of [first, end) is counted exactly once, whatever the window's edges."""
    from hypothesis import given, settings
    from hypothesis import strategies as st
    from sqlalchemy import create_engine, func, select

    from flowstore.projections.ops import ACTIVITY_COLUMNS
    from flowstore.projections.queries import _buckets
    from flowstore.projections.tables import define_tables

    tables = define_tables()
    a = tables.activity
    engine = create_engine("sqlite://")
    tables.metadata.create_all(engine)
    minutes = range(6 * 60)  # six hours: one attempt a minute, hour rows of 60
    row = {"flow_id": "f", "step": "", **dict.fromkeys(ACTIVITY_COLUMNS, 0)}
    with engine.begin() as conn:
        conn.execute(
            a.insert(),
            [{**row, "span": 60, "start": m * 60, "attempts": 1} for m in minutes]
            + [{**row, "span": 3600, "start": h * 3600, "attempts": 60} for h in range(6)],
        )

    @settings(max_examples=200, deadline=None)
    @given(st.integers(0, 6 * 60), st.integers(0, 6 * 60))
    def check(first: int, end: int) -> None:
        query = select(func.coalesce(func.sum(a.c.attempts), 0)).where(_buckets(a, first, end))
        with engine.connect() as conn:
            assert conn.execute(query).scalar_one() == max(0, end - first)

    check()
