"""Random walks through OwlMeans-style flows against an in-memory model of the @owlmeans/flow rules.

The model knows the rules of `state.ts` (as described in the issue) and nothing of flowstore's domain
code: a transition is looked up by its key in the current step; `previous` is the step left when the
transition is reversible, else absent; `ok` and `message` are what the transition said (no message
clears it); the payload merges into the state's, top-level keys; a refused transition changes
nothing; `service` is the run's target when it has one, else the step's; the entity id stays for
the run. Beyond the model: `go_back`, `advance` (the model's `next()`), hand-over by token. After
every command the store's state, offered transitions and token must be what the model says.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)

from flowstore import (
    FlowDefinition,
    FlowState,
    FlowStateNotFoundError,
    FlowStatus,
    FlowStore,
    InvalidStepError,
    InvalidTransitionError,
    decode_state_token,
    encode_state_token,
)
from tests.strategies import TRANSITION_NAMES, flow_definitions

USERS = ["ann", "bob"]
KEYS = ["a", "b", "c"]


@st.composite
def owl_definitions(draw: st.DrawFn) -> dict[str, Any]:
    """A valid flow with the model's optional fields drawn at random on every step and edge."""
    definition = draw(flow_definitions())
    maybe_bool = st.sampled_from([None, True, False])
    if draw(st.booleans()):
        definition["config"] = {
            "queryParam": "flow",
            "services": {"auth": "svc-a"},
            "modules": {"auth.choice": "choice-module"},
            "pathes": {"choice": "/auth/choice"},
            "defaultFlow": definition["flow"],
        }
        definition["prefabs"] = {definition["initialStep"]: "eyJmIjoiX29hOjAiLCJzIjoiIiwibyI6MX0"}
    for step in definition["steps"].values():
        if draw(st.booleans()):
            step["path"] = f"/{step['step']}"
            step["module"] = f"${step['step']}.module"
        if (initial := draw(maybe_bool)) is not None:
            step["initial"] = initial
        if draw(st.booleans()):
            keys = draw(st.lists(st.sampled_from(KEYS), unique=True, max_size=3))
            step["payloadMap"] = {k: draw(st.integers(0, 3)) for k in keys}
        for key, edge in step["transitions"].items():
            for name in ("explicit", "reversible"):
                if (value := draw(maybe_bool)) is not None:
                    edge[name] = value
            if draw(st.integers(0, 5)) == 0:  # like `_oidp`'s "denied": {"transition": "link-id"}
                edge["transition"] = draw(
                    st.sampled_from([n for n in TRANSITION_NAMES if n != key])
                )
    return definition


_text = st.text(
    st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)), max_size=8
)
payloads = st.none() | st.dictionaries(
    st.sampled_from([*KEYS, "extra"]),
    st.none() | st.booleans() | st.integers(-50, 50) | _text,
    max_size=3,
)
messages = st.none() | _text
entities = st.none() | st.just("") | st.sampled_from(["ent-1", "Zoë 日本"])


@dataclass
class Run:
    """The model's state of one user in the flow."""

    step: str | None = None
    previous: str | None = None
    target: str | None = None
    service: str | None = None
    entity_id: str | None = None
    ok: bool = True
    message: str | None = None
    payload: dict[str, Any] | None = None
    completed: bool = False
    history: list[tuple[Any, ...]] = field(default_factory=list)

    def state(self, flow: str) -> FlowState:
        assert self.step is not None
        return FlowState(
            flow=flow,
            step=self.step,
            previous=self.previous,
            service=self.service,
            entity_id=self.entity_id,
            ok=self.ok,
            message=self.message,
            payload=self.payload,
        )


class OwlModel:
    """The @owlmeans/flow rules, plus flowstore's run lifecycle (start, complete, clear)."""

    def __init__(self, definition: dict[str, Any]) -> None:
        self.d = definition
        self.runs = {user: Run() for user in USERS}

    def steps(self) -> dict[str, Any]:
        return dict(self.d["steps"])

    def entry_allowed(self, step: str) -> bool:
        marked = [n for n, s in self.d["steps"].items() if s.get("initial")]
        return not marked or step == self.d["initialStep"] or step in marked

    def _at(self, run: Run, step: str) -> None:
        run.step = step
        run.service = run.target or self.d["steps"][step]["service"]
        run.completed = not self.d["steps"][step]["transitions"]

    def start(self, user: str, step: str | None, service: str | None, entity: str | None) -> None:
        run = self.runs[user]
        target = step or self.d["initialStep"]
        run.history.append(("reset", run.step, target))
        new = Run(target=service, entity_id=entity, history=run.history)
        self._at(new, target)
        self.runs[user] = new

    def transition(
        self, user: str, key: str, payload: dict[str, Any] | None, ok: bool, message: str | None
    ) -> bool:
        run = self.runs[user]
        if run.step is None:
            run.history.append(("start", run.step, self.d["initialStep"]))
            new = Run(history=run.history)
            self._at(new, self.d["initialStep"])
            run = self.runs[user] = new
        edge = self.d["steps"][run.step]["transitions"].get(key)
        if edge is None:
            # Refused: the user stays where they were (the row's to_step is that step).
            run.history.append(("transition", run.step, run.step, key, False, None, None))
            return False
        run.history.append(("transition", run.step, edge["step"], key, True, ok, message))
        run.previous = run.step if edge.get("reversible") is True else None
        self._at(run, edge["step"])
        run.ok, run.message = ok, message
        if payload is not None:
            run.payload = {**(run.payload or {}), **payload}
        return True

    def offered(self, user: str, explicit: bool | None) -> list[dict[str, Any]]:
        run = self.runs[user]
        assert run.step is not None
        edges = list(self.d["steps"][run.step]["transitions"].values())
        return [e for e in edges if explicit is None or bool(e.get("explicit")) == explicit]

    def next_key(self, user: str) -> str | None:
        run = self.runs[user]
        assert run.step is not None
        items = self.d["steps"][run.step]["transitions"].items()
        return next((k for k, e in items if not e.get("explicit")), None)

    def back(self, user: str) -> bool:
        run = self.runs[user]
        if run.previous is None or run.completed:
            return False
        run.history.append(("back", run.step, run.previous))
        self._at(run, run.previous)
        run.previous, run.ok, run.message = None, True, None
        return True

    def adopt(self, user: str, state: FlowState) -> None:
        run = self.runs[user]
        run.history.append(("handoff", run.step, state.step))
        new = Run(
            previous=state.previous,
            target=state.service or None,
            entity_id=state.entity_id,
            ok=state.ok,
            message=state.message,
            payload=state.payload,
            history=run.history,
        )
        self._at(new, state.step)
        self.runs[user] = new

    def clear(self, user: str) -> bool:
        run = self.runs[user]
        if run.step is None:
            return False
        run.history.append(("clear", run.step, None))
        self.runs[user] = Run(history=run.history)
        return True


def _history_row(kind: str, h: Any) -> tuple[Any, ...]:
    # History rows write "" where the model has no step (the seed's string type): read it as None.
    from_step, to_step = h.from_step or None, h.to_step or None
    if kind == "transition":
        ok, message = (h.ok, h.message) if h.success else (None, None)
        return (kind, from_step, to_step, h.transition, h.success, ok, message)
    return (kind, from_step, to_step)


class OwlMachine(RuleBasedStateMachine):
    """Drives a FlowStore and the model side by side, comparing everything after every command."""

    url: str = "memory://"

    def __init__(self) -> None:
        super().__init__()
        self.store = FlowStore(self.url)
        self.flow_id = f"_owl{uuid.uuid4().hex[:10]}"
        self.model: OwlModel
        self.definition: FlowDefinition

    @initialize(definition=owl_definitions())
    def define(self, definition: dict[str, Any]) -> None:
        definition = {**definition, "flow": self.flow_id}
        if "config" in definition:
            definition["config"] = {**definition["config"], "defaultFlow": self.flow_id}
        self.store.create_flow(definition)
        self.definition = self.store.get_flow(self.flow_id)
        assert self.definition.to_seed() == {**definition, "version": 1}
        self.model = OwlModel(definition)

    @rule(
        user=st.sampled_from(USERS),
        data=st.data(),
        service=st.none() | st.just("svc-target"),
        entity=entities,
    )
    def reset(
        self, user: str, data: st.DataObject, service: str | None, entity: str | None
    ) -> None:
        step = data.draw(st.none() | st.sampled_from(sorted(self.model.steps())))
        if step is not None and not self.model.entry_allowed(step):
            with pytest.raises(InvalidStepError):
                self.store.reset_flow(user, self.flow_id, step, service=service, entity_id=entity)
            return
        self.store.reset_flow(user, self.flow_id, step, service=service, entity_id=entity)
        self.model.start(user, step, service, entity)

    @rule(
        user=st.sampled_from(USERS),
        key=st.sampled_from([*TRANSITION_NAMES, "bogus"]),
        payload=payloads,
        ok=st.booleans(),
        message=messages,
    )
    def transition(
        self, user: str, key: str, payload: dict[str, Any] | None, ok: bool, message: str | None
    ) -> None:
        expected = self.model.transition(user, key, payload, ok, message)
        try:
            self.store.execute_transition(user, self.flow_id, key, payload, ok=ok, message=message)
        except InvalidTransitionError:
            assert not expected
        else:
            assert expected

    @rule(user=st.sampled_from(USERS), payload=payloads)
    def advance(self, user: str, payload: dict[str, Any] | None) -> None:
        if self.model.runs[user].step is None:
            with pytest.raises(FlowStateNotFoundError):
                self.store.advance(user, self.flow_id, payload)
            return
        key = self.model.next_key(user)
        if key is None:
            with pytest.raises(InvalidTransitionError):
                self.store.advance(user, self.flow_id, payload)
            return
        self.store.advance(user, self.flow_id, payload)
        assert self.model.transition(user, key, payload, True, None)

    @rule(user=st.sampled_from(USERS))
    def go_back(self, user: str) -> None:
        if self.model.runs[user].step is None:
            with pytest.raises(FlowStateNotFoundError):
                self.store.go_back(user, self.flow_id)
            return
        if not self.model.back(user):
            with pytest.raises(InvalidTransitionError):
                self.store.go_back(user, self.flow_id)
            return
        self.store.go_back(user, self.flow_id)

    @rule(sender=st.sampled_from(USERS), receiver=st.sampled_from(USERS))
    def hand_over(self, sender: str, receiver: str) -> None:
        if self.model.runs[sender].step is None:
            return
        token = self.store.state_token(sender, self.flow_id)
        state = self.store.adopt_state_token(receiver, token, sender="svc-sender")
        self.model.adopt(receiver, decode_state_token(token, self.definition))
        assert state.step == self.model.runs[receiver].step

    @rule(user=st.sampled_from(USERS))
    def clear(self, user: str) -> None:
        expected = self.model.clear(user)
        try:
            self.store.clear_flow_state(user, self.flow_id)
        except FlowStateNotFoundError:
            assert not expected
        else:
            assert expected

    def check(self, store: FlowStore) -> None:
        for user in USERS:
            run = self.model.runs[user]
            state = store.get_flow_state(user, self.flow_id)
            if run.step is None:
                assert state is None
            else:
                assert state is not None
                expected = run.state(self.flow_id)
                fields = ("step", "previous", "service", "entity_id", "ok", "message", "payload")
                assert {f: getattr(state, f) for f in fields} == {
                    f: getattr(expected, f) for f in fields
                }
                status = FlowStatus.COMPLETED if run.completed else FlowStatus.ACTIVE
                assert state.status is status
                for explicit in (None, True, False):
                    offered = store.get_available_transitions(user, self.flow_id, explicit=explicit)
                    assert [t.to_seed() for t in offered] == self.model.offered(user, explicit)
                token = store.state_token(user, self.flow_id)
                assert token == encode_state_token(self.definition, expected)
                decoded = decode_state_token(token, self.definition)
                assert (decoded.step, decoded.previous, decoded.ok, decoded.message) == (
                    run.step,
                    run.previous,
                    run.ok,
                    run.message,
                )
                assert decoded.entity_id == run.entity_id
                assert decoded.service == run.service
                # The token re-encodes to itself (no payload value here holds a comma).
                if not any("," in str(v) for v in (run.payload or {}).values()):
                    assert encode_state_token(self.definition, decoded) == token
            rows = store.get_flow_history(user, self.flow_id)
            assert [_history_row(h.kind.value, h) for h in rows] == run.history

    @invariant()
    def store_matches_model(self) -> None:
        if hasattr(self, "model"):
            self.check(self.store)

    def teardown(self) -> None:
        try:
            if hasattr(self, "model"):
                assert self.store.verify_projections() == []  # rebuild from the log == live
                if not self.url.startswith("memory:"):
                    with FlowStore(self.url) as reopened:  # cold cache: replayed from the log
                        self.check(reopened)
        finally:
            self.store.close()


def test_random_walks_match_the_owlmeans_model(store_url: str) -> None:
    machine = type("Machine", (OwlMachine,), {"url": store_url})
    run_state_machine_as_test(
        machine,
        settings=settings(
            max_examples=15 if "postgres" in store_url else 30,
            stateful_step_count=25,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )


def test_random_walks_match_the_owlmeans_model_in_memory() -> None:
    run_state_machine_as_test(
        OwlMachine,
        settings=settings(max_examples=60, stateful_step_count=30, deadline=None),
    )
