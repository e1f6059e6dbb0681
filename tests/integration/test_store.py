"""The FlowStore service contract, run against SQLite and a real PostgreSQL server."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from flowstore import (
    ConcurrencyConflictError,
    DefinitionError,
    FlowExistsError,
    FlowNotFoundError,
    FlowState,
    FlowStateNotFoundError,
    FlowStatus,
    FlowStore,
    HistoryKind,
    InvalidArgumentError,
    InvalidStepError,
    InvalidTransitionError,
    PayloadTooLargeError,
    PayloadValidationError,
)
from tests.flows import Clock, linear, onboarding

FLOW = "user-onboarding"


def walk(store: FlowStore, user: str, *transitions: str) -> FlowState:
    state = None
    for transition in transitions:
        state = store.execute_transition(user, FLOW, transition)
    assert state is not None
    return state


# Definitions


def test_create_flow_returns_its_id_and_version_one(store: FlowStore) -> None:
    definition = store.get_flow(FLOW)
    assert definition.version == 1
    assert definition.to_seed() == {**onboarding(), "version": 1}
    assert [f.flow for f in store.list_flows()] == [FLOW]


def test_creating_an_existing_flow_is_refused(store: FlowStore) -> None:
    position = store.log_position()
    with pytest.raises(FlowExistsError, match=FLOW):
        store.create_flow(onboarding())
    assert store.log_position() == position


def test_malformed_definition_writes_nothing(store: FlowStore) -> None:
    position = store.log_position()
    bad = linear("broken")
    bad["steps"]["s0"]["transitions"]["next"]["step"] = "nowhere"
    with pytest.raises(DefinitionError, match="nowhere"):
        store.create_flow(bad)
    assert store.log_position() == position
    assert [f.flow for f in store.list_flows()] == [FLOW]


def test_update_makes_a_new_version_and_keeps_the_old(store: FlowStore) -> None:
    updated = store.update_flow(FLOW, {"ttl": 600})
    assert updated.version == 2
    assert updated.ttl == 600
    assert store.get_flow(FLOW, 1).ttl is None
    assert store.get_flow(FLOW).version == 2
    with pytest.raises(FlowNotFoundError, match="no version 3"):
        store.get_flow(FLOW, 3)


def test_instances_keep_their_version_until_reset(store: FlowStore) -> None:
    walk(store, "ann", "start")  # on version 1, at profile-setup
    steps = onboarding()["steps"]
    steps["profile-setup"]["transitions"].pop("skip")
    store.update_flow(FLOW, {"steps": steps})
    state = store.execute_transition("ann", FLOW, "skip")  # still allowed on version 1
    assert (state.step, state.definition_version) == ("verification", 1)
    assert store.reset_flow("ann", FLOW).definition_version == 2
    walk(store, "ann", "start")
    with pytest.raises(InvalidTransitionError):
        store.execute_transition("ann", FLOW, "skip")


def test_deleted_flow_refuses_transitions_and_can_be_recreated(store: FlowStore) -> None:
    walk(store, "ann", "start")
    store.delete_flow(FLOW)
    assert store.list_flows() == []
    with pytest.raises(FlowNotFoundError, match="deleted"):
        store.execute_transition("ann", FLOW, "continue")
    with pytest.raises(FlowNotFoundError):
        store.reset_flow("bob", FLOW)
    with pytest.raises(FlowNotFoundError):
        store.delete_flow(FLOW)
    assert store.create_flow(onboarding()) == FLOW
    assert store.get_flow(FLOW).version == 2


def test_unknown_flow_is_a_typed_error_and_writes_nothing(store: FlowStore) -> None:
    position = store.log_position()
    for call in (
        lambda: store.execute_transition("ann", "nope", "start"),
        lambda: store.reset_flow("ann", "nope"),
        lambda: store.update_flow("nope", {"ttl": 5}),
        lambda: store.get_flow("nope"),
        lambda: store.get_flow_history("ann", "nope"),
        lambda: store.clear_flow_state("ann", "nope"),
        lambda: store.set_flow_state("ann", {"flow": "nope", "step": "x"}),
    ):
        with pytest.raises(FlowNotFoundError, match="'nope'"):
            call()
    assert store.log_position() == position
    assert store.get_flow_state("ann", "nope") is None


# Transitions


def test_first_transition_starts_the_flow(store: FlowStore, clock: Clock) -> None:
    state = store.execute_transition("ann", FLOW, "start")
    assert (state.step, state.status, state.version, state.definition_version) == (
        "profile-setup",
        FlowStatus.ACTIVE,
        2,
        1,
    )
    assert state.started_at == clock.now
    history = store.get_flow_history("ann", FLOW)
    assert [(h.kind, h.from_step, h.to_step, h.transition) for h in history] == [
        (HistoryKind.START, "", "welcome", ""),
        (HistoryKind.TRANSITION, "welcome", "profile-setup", "start"),
    ]


def test_invalid_transition_is_recorded_and_raised(store: FlowStore) -> None:
    walk(store, "ann", "start")
    with pytest.raises(InvalidTransitionError) as caught:
        store.execute_transition("ann", FLOW, "complete", {"why": "impatient"})
    assert caught.value.details == {
        "from_step": "profile-setup",
        "transition": "complete",
        "flow_id": FLOW,
        "user_id": "ann",
    }
    state = store.get_flow_state("ann", FLOW)
    assert state is not None
    # As in the OwlMeans model, a refused transition leaves the state (ok included) as it was.
    assert (state.step, state.ok, state.version) == ("profile-setup", True, 3)
    last = store.get_flow_history("ann", FLOW)[-1]
    assert (last.success, last.transition, last.from_step, last.to_step) == (
        False,
        "complete",
        "profile-setup",
        "profile-setup",  # the step the user stayed on (the seed's toStep)
    )
    assert last.payload == {"why": "impatient"}
    assert last.error is not None
    assert "'complete'" in last.error
    assert store.execute_transition("ann", FLOW, "skip").ok is True


def test_payload_failing_its_schema_is_recorded_and_raised(store: FlowStore) -> None:
    steps = onboarding()["steps"]
    steps["welcome"]["transitions"]["start"]["payloadSchema"] = {
        "type": "object",
        "required": ["email"],
        "properties": {"email": {"type": "string"}},
    }
    store.update_flow(FLOW, {"steps": steps})
    with pytest.raises(PayloadValidationError, match="email"):
        store.execute_transition("ann", FLOW, "start", {"email": 42})
    history = store.get_flow_history("ann", FLOW)
    assert [h.success for h in history] == [True, False]
    assert history[-1].metadata["error_code"] == "PAYLOAD_INVALID"
    state = store.execute_transition("ann", FLOW, "start", {"email": "a@example.org"})
    assert state.payload == {"email": "a@example.org"}


@pytest.mark.parametrize(
    ("payload", "error"),
    [
        ({"blob": "x" * 2000}, PayloadTooLargeError),
        ({"when": {1, 2}}, PayloadValidationError),
        (["not", "an", "object"], PayloadValidationError),
        ({"n": float("inf")}, PayloadValidationError),
    ],
)
def test_unstorable_payloads_write_nothing(store: FlowStore, payload: Any, error: type) -> None:
    position = store.log_position()
    with pytest.raises(error):
        store.execute_transition("ann", FLOW, "start", payload)
    assert store.log_position() == position
    assert store.get_flow_state("ann", FLOW) is None


@pytest.mark.parametrize("user", ["", "   ", "x" * 300, 42])
def test_bad_user_ids_are_refused(store: FlowStore, user: Any) -> None:
    with pytest.raises(InvalidArgumentError, match="user_id"):
        store.execute_transition(user, FLOW, "start")
    assert store.log_position() == 2  # the flow's definition and catalog entry only


def test_reaching_a_terminal_step_completes_the_flow(store: FlowStore, clock: Clock) -> None:
    store.execute_transition("ann", FLOW, "start")
    clock.advance(30)
    state = walk(store, "ann", "skip", "complete")
    assert (state.step, state.status) == ("completed", FlowStatus.COMPLETED)
    assert state.completed_at == clock.now
    with pytest.raises(InvalidTransitionError):
        store.execute_transition("ann", FLOW, "start")
    completed = store.get_flow_state("ann", FLOW)
    assert completed is not None
    assert completed.status is FlowStatus.COMPLETED


# Reset, override, clear


def test_reset_restarts_at_the_initial_or_given_step(store: FlowStore) -> None:
    walk(store, "ann", "start", "continue")
    assert store.reset_flow("ann", FLOW).step == "welcome"
    assert store.reset_flow("ann", FLOW, "verification").step == "verification"
    kinds = [(h.kind, h.from_step, h.to_step) for h in store.get_flow_history("ann", FLOW)]
    assert kinds[-2:] == [
        (HistoryKind.RESET, "preferences", "welcome"),
        (HistoryKind.RESET, "welcome", "verification"),
    ]


def test_reset_to_an_unknown_step_writes_nothing(store: FlowStore) -> None:
    position = store.log_position()
    with pytest.raises(InvalidStepError, match="'limbo'"):
        store.reset_flow("ann", FLOW, "limbo")
    assert store.log_position() == position


def test_override_is_recorded(store: FlowStore) -> None:
    walk(store, "ann", "start")
    state = store.set_flow_state(
        "ann", FlowState(flow=FLOW, step="verification", payload={"by": "admin"}, ok=False)
    )
    assert (state.step, state.ok, state.payload, state.service) == (
        "verification",
        False,
        {"by": "admin"},
        "onboarding",
    )
    last = store.get_flow_history("ann", FLOW)[-1]
    assert (last.kind, last.from_step, last.to_step) == (
        HistoryKind.OVERRIDE,
        "profile-setup",
        "verification",
    )
    with pytest.raises(InvalidStepError):
        store.set_flow_state("ann", {"flow": FLOW, "step": "limbo"})
    with pytest.raises(InvalidArgumentError):
        store.set_flow_state("ann", {"flow": FLOW})


def test_clear_forgets_the_state_but_keeps_history(store: FlowStore) -> None:
    walk(store, "ann", "start")
    store.clear_flow_state("ann", FLOW)
    assert store.get_flow_state("ann", FLOW) is None
    assert store.get_user_flows("ann") == []
    history = store.get_flow_history("ann", FLOW)
    assert [h.kind for h in history] == [
        HistoryKind.START,
        HistoryKind.TRANSITION,
        HistoryKind.CLEAR,
    ]
    with pytest.raises(FlowStateNotFoundError):
        store.clear_flow_state("ann", FLOW)
    with pytest.raises(FlowStateNotFoundError):
        store.clear_flow_state("never", FLOW)
    # A new transition starts a fresh run.
    state = store.execute_transition("ann", FLOW, "start")
    assert state.step == "profile-setup"
    assert store.get_flow_history("ann", FLOW)[-2].kind is HistoryKind.START


def test_user_flows_lists_live_states_only(store: FlowStore) -> None:
    store.create_flow(linear("second"))
    store.create_flow(linear("third"))
    store.execute_transition("ann", FLOW, "start")
    store.reset_flow("ann", "second")
    store.reset_flow("ann", "third")
    store.clear_flow_state("ann", "third")
    store.reset_flow("bob", "third")
    assert sorted((s.flow, s.step) for s in store.get_user_flows("ann")) == [
        ("second", "s0"),
        (FLOW, "profile-setup"),
    ]
    assert store.get_user_flows("nobody") == []


# Expiry


def test_purge_expires_idle_instances_only(store: FlowStore, clock: Clock) -> None:
    store.update_flow(FLOW, {"ttl": 60})
    store.execute_transition("idle", FLOW, "start")
    store.execute_transition("busy", FLOW, "start")
    walk(store, "done", "start", "skip", "complete")
    clock.advance(50)
    store.execute_transition("busy", FLOW, "skip")  # activity pushes expiry back
    clock.advance(20)
    expires = store.get_flow_state("idle", FLOW)
    assert expires is not None
    assert expires.expires_at == clock.now - timedelta(seconds=10)
    assert store.purge_expired_flows() == 1
    assert store.get_flow_state("idle", FLOW) is None
    assert store.get_flow_state("busy", FLOW) is not None
    assert store.get_flow_state("done", FLOW) is not None
    assert store.get_flow_history("idle", FLOW)[-1].kind is HistoryKind.EXPIRY
    assert store.purge_expired_flows() == 0
    clock.advance(60)
    assert store.purge_expired_flows() == 1  # busy
    assert store.get_flow_statistics(FLOW).active_users == 0


# Statistics


def test_statistics_agree_with_the_history(store: FlowStore, clock: Clock) -> None:
    walk(store, "ann", "start", "skip", "complete")
    clock.advance(10)
    walk(store, "bob", "start", "continue", "save")
    with pytest.raises(InvalidTransitionError):
        store.execute_transition("bob", FLOW, "start")
    clock.advance(5)
    store.execute_transition("bob", FLOW, "complete")
    store.execute_transition("cat", FLOW, "start")
    store.create_flow(linear("other"))
    store.execute_transition("ann", "other", "next")

    histories = [store.get_flow_history(u, FLOW) for u in ("ann", "bob", "cat")]
    rows = [h for history in histories for h in history]
    attempts = [h for h in rows if h.kind is HistoryKind.TRANSITION]
    entries: dict[str, int] = {}
    for h in rows:
        if h.to_step and h.success:  # a rejected attempt enters nothing
            entries[h.to_step] = entries.get(h.to_step, 0) + 1
    completed = [h for h in attempts if h.to_step == "completed"]

    stats = store.get_flow_statistics(FLOW)
    assert stats.total_flows == sum(h.kind is HistoryKind.START for h in rows) == 3
    assert stats.active_users == 1  # cat
    assert stats.completion_rate == pytest.approx(len(completed) / 3)
    assert stats.error_rate == pytest.approx(sum(not h.success for h in attempts) / len(attempts))
    assert {s.step: s.count for s in stats.popular_steps} == entries
    assert [s.count for s in stats.popular_steps] == sorted(entries.values(), reverse=True)
    assert stats.average_flow_duration == pytest.approx((0 + 5_000) / 2)
    elapsed = [h.metadata["elapsed_ms"] for h in attempts]
    assert stats.performance_metrics.average_response_time == pytest.approx(
        sum(elapsed) / len(elapsed)
    )
    assert stats.performance_metrics.p95_response_time == pytest.approx(max(elapsed))
    # all attempts happened within the last minute of the test clock
    assert stats.performance_metrics.throughput_per_second == pytest.approx(len(attempts) / 60)

    overall = store.get_flow_statistics()
    assert overall.total_flows == 4
    assert overall.active_users == 2  # cat in onboarding, ann in other
    with pytest.raises(FlowNotFoundError):
        store.get_flow_statistics("nope")


# Durability


def test_reopening_the_store_gives_the_same_state_and_history(store_url: str) -> None:
    with FlowStore(store_url) as first:
        first.create_flow(onboarding())
        walk(first, "ann", "start", "skip")
        with pytest.raises(InvalidTransitionError):
            first.execute_transition("ann", FLOW, "save")
        state, history = first.get_flow_state("ann", FLOW), first.get_flow_history("ann", FLOW)
    with FlowStore(store_url) as second:
        assert second.get_flow_state("ann", FLOW) == state
        assert second.get_flow_history("ann", FLOW) == history
        assert second.get_flow(FLOW).to_seed() == {**onboarding(), "version": 1}


def test_models_serialise_to_camel_case_json(store: FlowStore) -> None:
    state = walk(store, "ann", "start")
    data = state.to_dict()
    assert data["userId"] == "ann"
    assert data["definitionVersion"] == 1
    assert data["startedAt"].endswith(("Z", "+00:00"))
    assert FlowState.model_validate(data) == state
    history = store.get_flow_history("ann", FLOW)[0].to_dict()
    assert {"fromStep", "toStep", "userId", "flowId", "kind"} <= set(history)


def test_the_log_can_be_read_in_pages_and_imported_into_an_empty_store(
    store: FlowStore, clock: Clock, tmp_path: Any
) -> None:
    walk(store, "ann", "start", "skip")
    with pytest.raises(InvalidTransitionError):
        store.execute_transition("ann", FLOW, "save")
    events, start = [], 1
    while page := store.read_events(start, 2):
        assert [n for n, _ in page] == sorted(n for n, _ in page)
        events.extend(e for _, e in page)
        start = page[-1][0] + 1
    assert len(events) == 6  # definition, catalog entry, start, two transitions, one rejection
    with FlowStore(f"sqlite:///{tmp_path / 'copy.db'}", clock=clock) as copy:
        assert copy.import_events(events, batch=3) == len(events)
        assert copy.get_flow_state("ann", FLOW) == store.get_flow_state("ann", FLOW)
        assert copy.get_flow_history("ann", FLOW) == store.get_flow_history("ann", FLOW)
        assert copy.get_flow_statistics(FLOW) == store.get_flow_statistics(FLOW)
        with pytest.raises(ConcurrencyConflictError):
            copy.import_events(events[-1:])


@pytest.mark.parametrize("user", ["a\x00b", "tab\there", "\ud800"])
def test_ids_with_control_characters_or_lone_surrogates_are_refused(
    store: FlowStore, user: str
) -> None:
    position = store.log_position()
    with pytest.raises(InvalidArgumentError, match="control character"):
        store.execute_transition(user, FLOW, "start")
    with pytest.raises(InvalidArgumentError):
        store.set_flow_state("ann", {"flow": FLOW, "step": "welcome", "service": user})
    assert store.log_position() == position


def test_a_clock_stepping_back_gives_no_negative_durations(store_url: str) -> None:
    clock = Clock()
    with FlowStore(store_url, clock=clock) as store:
        store.create_flow(linear("steps", 3))
        store.execute_transition("ann", "steps", "next")
        clock.advance(-3600)  # an NTP step back between two commands
        state = store.execute_transition("ann", "steps", "next")
        assert state.completed_at is not None
        assert state.started_at is not None
        assert state.completed_at >= state.started_at
        history = store.get_flow_history("ann", "steps")
        stamps = [row.timestamp for row in history]
        assert stamps == sorted(stamps)
        assert store.get_flow_statistics("steps").average_flow_duration >= 0
        assert store.verify_projections() == []
        store.rebuild_projections()
        assert store.get_flow_statistics("steps").average_flow_duration >= 0
