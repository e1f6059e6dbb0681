"""The OwlMeans model in the store, on SQLite and PostgreSQL: its standard flows, its state fields,
going back, `advance`, hand-over between services by state token, statistics, erasure, old logs."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from uuid import uuid4

import orjson
import pytest
from eventsourcing.persistence import StoredEvent

from flowstore import (
    FlowStore,
    HistoryKind,
    InvalidArgumentError,
    InvalidStepError,
    InvalidTransitionError,
    StateTokenFlowError,
    StateTokenFormatError,
    decode_state_token,
)
from flowstore.codec import OrjsonTranscoder, PydanticMapper
from flowstore.domain import (
    FlowStarted,
    TransitionExecuted,
    TransitionRejected,
    project,
)
from tests.flows import linear
from tests.integration.test_encryption import raw_event_states
from tests.owlmeans import owl_flow


@pytest.fixture
def owl(store_url: str) -> Any:
    with FlowStore(store_url) as store:
        for name in ("_oa", "_oidc", "_oidp", "_stb"):
            store.create_flow(owl_flow(name))
        yield store


@pytest.mark.parametrize("name", ["_oa", "_oidc", "_oidp", "_stb"])
def test_the_standard_flows_are_stored_and_given_back_exactly(store_url: str, name: str) -> None:
    with FlowStore(store_url) as store:
        assert store.create_flow(owl_flow(name)) == name
        assert store.get_flow(name).to_seed() == {**owl_flow(name), "version": 1}
        denied = store.get_flow("_oidp").steps["unknown"].transitions if name == "_oidp" else None
    if denied is not None:
        # The key names the transition; its differing `transition` field is kept as given.
        assert denied["denied"].transition == "link-id"


def test_only_initial_steps_may_be_entered_when_some_are_marked(owl: FlowStore) -> None:
    state = owl.reset_flow("ann", "_oa", "signin", service="portal", entity_id="org-7")
    assert (state.step, state.service, state.entity_id) == ("signin", "portal", "org-7")
    with pytest.raises(InvalidStepError) as caught:
        owl.reset_flow("ann", "_oa", "payment")
    assert caught.value.details["entry_steps"] == ["choice", "signup", "signin", "new"]
    assert owl.get_flow_state("ann", "_oa") == state  # refused: nothing changed
    # A flow that marks no step keeps the old rule: any step may be entered.
    owl.create_flow(linear("plain"))
    assert owl.reset_flow("ann", "plain", "s1").step == "s1"


def test_a_target_service_and_entity_stay_for_the_whole_run(owl: FlowStore) -> None:
    owl.reset_flow("ann", "_oidp", service="shop", entity_id="cart-1")
    state = owl.execute_transition("ann", "_oidp", "denied")  # the key, whose field says link-id
    assert (state.step, state.service, state.entity_id) == ("link-id", "shop", "cart-1")
    # Without a target the service is the step's, as before.
    assert owl.reset_flow("bob", "_oidp").service == "$auth"
    assert owl.execute_transition("bob", "_oidp", "dispatch").service == "$auth"
    assert owl.execute_transition("bob", "_oidp", "target").service == "-"


def test_ok_message_payload_and_previous_follow_the_model(owl: FlowStore) -> None:
    owl.reset_flow("ann", "_oa", service="portal")
    state = owl.execute_transition("ann", "_oa", "signup", {"email": "a@x"})
    assert (state.step, state.previous, state.payload) == ("signup", "choice", {"email": "a@x"})
    state = owl.execute_transition("ann", "_oa", "new", {"org": "Acme"}, message="Welcome")
    assert (state.previous, state.message) == ("signup", "Welcome")
    assert state.payload == {"email": "a@x", "org": "Acme"}  # merged, top-level keys
    state = owl.execute_transition("ann", "_oa", "payment", ok=False, message="card declined")
    assert (state.step, state.previous, state.ok, state.message) == (
        "payment",
        None,  # not reversible
        False,
        "card declined",
    )
    with pytest.raises(InvalidTransitionError):
        owl.execute_transition("ann", "_oa", "signup", {"email": "other"})
    after = owl.get_flow_state("ann", "_oa")
    assert after is not None  # refused: the state is as it was (only its version moved on)
    assert after.model_dump(exclude={"version", "updated_at"}) == state.model_dump(
        exclude={"version", "updated_at"}
    )
    state = owl.execute_transition("ann", "_oa", "success")
    assert (state.ok, state.message) == (True, None)  # no message: cleared
    history = owl.get_flow_history("ann", "_oa")
    assert [(h.kind, h.to_step, h.ok, h.message, h.payload) for h in history] == [
        (HistoryKind.RESET, "choice", None, None, None),
        (HistoryKind.TRANSITION, "signup", True, None, {"email": "a@x"}),
        (HistoryKind.TRANSITION, "new", True, "Welcome", {"org": "Acme"}),
        (HistoryKind.TRANSITION, "payment", False, "card declined", None),
        (HistoryKind.TRANSITION, "payment", None, None, {"email": "other"}),  # stayed there
        (HistoryKind.TRANSITION, "success", True, None, None),
    ]
    # Five attempts: one refused, one taken with ok=False: both are errors.
    assert owl.get_flow_statistics("_oa").error_rate == pytest.approx(2 / 5)


def test_going_back_returns_to_previous_and_is_recorded(owl: FlowStore) -> None:
    owl.reset_flow("ann", "_oa")
    with pytest.raises(InvalidTransitionError, match="no previous step"):
        owl.go_back("ann", "_oa")
    owl.execute_transition("ann", "_oa", "signup")
    owl.execute_transition("ann", "_oa", "new", message="hi")
    state = owl.go_back("ann", "_oa")
    assert (state.step, state.previous, state.ok, state.message) == ("signup", None, True, None)
    assert owl.get_flow_history("ann", "_oa")[-1].kind is HistoryKind.BACK
    with pytest.raises(InvalidTransitionError):
        owl.go_back("ann", "_oa")  # once: previous is gone
    funnel = {f.step: f for f in owl.get_flow_funnel("_oa")}
    assert (funnel["new"].entered, funnel["new"].moved_on) == (1, 1)
    assert (funnel["signup"].entered, funnel["signup"].current) == (2, 1)
    assert owl.verify_projections() == []


def test_transitions_on_offer_and_advance(owl: FlowStore) -> None:
    owl.reset_flow("ann", "_oa")
    names = [t.step for t in owl.get_available_transitions("ann", "_oa", explicit=True)]
    assert names == ["signup", "signin"]
    assert owl.get_available_transitions("ann", "_oa", explicit=False) == []
    with pytest.raises(InvalidTransitionError, match="not explicit"):
        owl.advance("ann", "_oa")  # every choice is the user's
    owl.reset_flow("bob", "_oidc")
    assert owl.advance("bob", "_oidc", {"simplified": True}).step == "authen"
    assert owl.get_flow_history("bob", "_oidc")[-1].transition == "authen"


def test_a_flow_handed_over_between_two_services_by_token(store_url: str, tmp_path: Path) -> None:
    other = f"sqlite:///{tmp_path / 'other-service.db'}"
    with FlowStore(store_url) as idp, FlowStore(other) as shop:
        for store in (idp, shop):
            store.create_flow(owl_flow("_oidc"))
        idp.reset_flow("ann", "_oidc", service="shop", entity_id="ユーザー42")
        idp.execute_transition("ann", "_oidc", "authen")
        idp.execute_transition(
            "ann", "_oidc", "post-authen", {"purpose": "login", "simplified": False}, message="ok"
        )
        token = idp.state_token("ann", "_oidc")
        # The same string the real model gives for this state (tokens.json#oidc-post-authen-...).
        assert decode_state_token(token, idp.get_flow("_oidc")).payload == {
            "purpose": "login",
            "simplified": "false",
        }
        adopted = shop.adopt_state_token("ann", token, sender="idp")
        assert (adopted.step, adopted.service, adopted.entity_id, adopted.message) == (
            "post-authen",
            "shop",
            "ユーザー42",
            "ok",
        )
        assert shop.state_token("ann", "_oidc") == token
        last = shop.get_flow_history("ann", "_oidc")[-1]
        assert (last.kind, last.metadata["sender"], last.to_step) == (
            HistoryKind.HANDOFF,
            "idp",
            "post-authen",
        )
        assert shop.execute_transition("ann", "_oidc", "payment").service == "shop"
        assert shop.verify_projections() == []


def test_bad_tokens_are_refused_and_change_nothing(owl: FlowStore) -> None:
    before = owl.log_position()
    with pytest.raises(StateTokenFormatError):
        owl.adopt_state_token("ann", "not a token")
    with pytest.raises(StateTokenFlowError):
        owl.adopt_state_token("ann", "eyJmIjoiX25vcGU6MCIsInMiOiJ4IiwibyI6MX0")  # flow _nope
    with pytest.raises(InvalidArgumentError):
        owl.execute_transition("ann", "_oa", "signup", message="nul \x00 here")
    assert owl.log_position() == before


def test_messages_and_entity_ids_are_sealed_and_erased(store_url: str) -> None:
    secret_message, secret_entity = "msg-7f3a-secret", "entity-5b2c-secret"
    with FlowStore(store_url) as store:
        store.create_flow(owl_flow("_oa"))
        store.reset_flow("ann", "_oa", entity_id=secret_entity)
        store.execute_transition("ann", "_oa", "signup", message=secret_message)
        store.adopt_state_token("bob", store.state_token("ann", "_oa"))
        states = raw_event_states(store_url)
        assert not any(s for s in states if secret_message.encode() in s)
        assert not any(s for s in states if secret_entity.encode() in s)
        store.erase_user("ann")
        store.erase_user("bob")
        assert store.get_flow_history("ann", "_oa") == []
        for _, event in store.read_events(1, 1000):
            assert getattr(event, "message", None) is None
            assert getattr(event, "entity_id", None) is None


def test_old_events_replay_as_they_did() -> None:
    """Events written before the model's fields decode with defaults and fold by the old rules."""
    mapper = PydanticMapper(transcoder=OrjsonTranscoder())
    iid = uuid4()
    at = datetime(2026, 1, 1, tzinfo=UTC).isoformat()
    common = {"timestamp": at, "user_id": "ann", "flow_id": "f", "definition_version": 1}
    old = [  # stored states exactly as the previous release wrote them
        (FlowStarted, {"reason": "start", "from_step": None, "step": "a", "service": "s"}),
        (
            TransitionExecuted,
            {"transition": "go", "from_step": "a", "to_step": "b", "service": "s"},
        ),
        (
            TransitionExecuted,
            {"transition": "go", "from_step": "b", "to_step": "a", "service": "s"},
        ),
        (
            TransitionRejected,
            {"transition": "x", "from_step": "a", "error": "no", "error_code": "E"},
        ),
    ]
    payloads = [None, {"k": 1}, {"j": 2}, {"bad": True}]
    events = []
    for version, ((cls, fields), payload) in enumerate(zip(old, payloads, strict=True), start=1):
        state = {**common, **fields, "expires_at": None, "elapsed_ms": 1.0}
        if cls is not FlowStarted:
            state["payload"] = payload
        if cls is FlowStarted or cls is TransitionRejected:
            state.pop("expires_at" if cls is TransitionRejected else "elapsed_ms")
        stored = StoredEvent(
            originator_id=iid,
            originator_version=version,
            topic=f"{cls.__module__}:{cls.__qualname__}",
            state=orjson.dumps(state),
        )
        events.append(mapper.to_domain_event(stored))
    assert [getattr(e, "rules", None) for e in events] == [None, 1, 1, 1]
    instance = project(None, events)
    assert instance is not None
    # Old rules: the payload was replaced, and a refusal set ok to false.
    assert (instance.step, instance.payload, instance.ok) == ("a", {"j": 2}, False)
    assert (instance.previous, instance.message, instance.entity_id) == (None, None, None)


def test_a_migration_keeps_the_runs_target_entity_and_previous_where_it_can(owl: FlowStore) -> None:
    owl.reset_flow("ann", "_oa", service="portal", entity_id="org-1")
    owl.execute_transition("ann", "_oa", "signup", {"k": 1}, message="hi")
    owl.reset_flow("bob", "_oa")
    owl.execute_transition("bob", "_oa", "signup")
    steps = owl_flow("_oa")["steps"]
    steps["signup"]["service"] = "$signup-v2"
    del steps["choice"]  # bob's previous step is gone in version 2
    for step in steps.values():
        step["transitions"] = {
            k: t for k, t in step["transitions"].items() if t["step"] != "choice"
        }
    owl.update_flow("_oa", {"initialStep": "signup", "steps": steps})
    report = owl.migrate_flows("_oa", 2)
    assert {m.user_id for m in report.migrated} == {"ann", "bob"}
    ann = owl.get_flow_state("ann", "_oa")
    bob = owl.get_flow_state("bob", "_oa")
    assert ann is not None
    assert bob is not None
    # Ann's run targets the portal: the step's new service does not change it; her previous step
    # does not exist in version 2 either, so it is gone (no `back` into a step that is not there).
    assert (ann.step, ann.service, ann.entity_id, ann.message, ann.payload) == (
        "signup",
        "portal",
        "org-1",
        "hi",
        {"k": 1},
    )
    assert (ann.previous, bob.previous, bob.service) == (None, None, "$signup-v2")
    assert owl.verify_projections() == []


def test_a_rebuild_from_the_log_gives_what_the_live_tables_hold(owl: FlowStore) -> None:
    owl.reset_flow("ann", "_oa", service="portal", entity_id="org-1")
    owl.execute_transition("ann", "_oa", "signup", {"a": 1}, ok=False, message="m1")
    with pytest.raises(InvalidTransitionError):
        owl.execute_transition("ann", "_oa", "nowhere")
    owl.go_back("ann", "_oa")
    owl.execute_transition("ann", "_oa", "signin", {"b": 2})
    owl.adopt_state_token("bob", owl.state_token("ann", "_oa"), sender="idp")
    owl.execute_transition("bob", "_oa", "target", message="m2")  # completes the run

    def read() -> Any:
        return (
            [owl.get_user_flows(u) for u in ("ann", "bob")],
            [owl.get_flow_history(u, "_oa") for u in ("ann", "bob")],
            owl.get_flow_statistics("_oa").model_dump(exclude={"performance_metrics"}),
            owl.get_flow_funnel("_oa"),
        )

    live = read()
    owl.rebuild_projections()
    assert read() == live
    assert owl.verify_projections() == []
