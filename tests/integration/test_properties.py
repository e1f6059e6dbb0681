"""Property tests: random commands on random flows leave the store where an in-memory model says.

The model below is written independently of flowstore's domain code: it knows only the seed's rules
(a transition moves along an edge of the instance's definition version, a step without transitions
completes the flow, a reset starts over on the latest version, clear forgets the state).
"""

from __future__ import annotations

import json
import subprocess
import sys
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
    FlowError,
    FlowStateNotFoundError,
    FlowStatus,
    FlowStore,
    InvalidStepError,
    InvalidTransitionError,
)
from tests.strategies import TRANSITION_NAMES, flow_definitions, payloads

USERS = ["ann", "bob", "cat"]


@dataclass
class ModelInstance:
    step: str | None = None
    version: int = 0
    definition_version: int = 0
    ok: bool = True
    payload: dict[str, Any] | None = None
    completed: bool = False
    # (kind, from_step, to_step, transition, success) as the seed's strings: "" for none.
    history: list[tuple[str, str, str, str, bool]] = field(default_factory=list)


class FlowModel:
    """What the store should hold, computed from the rules alone."""

    def __init__(self, definition: dict[str, Any]) -> None:
        self.versions = [definition]
        self.instances: dict[str, ModelInstance] = {}
        self.erased: set[str] = set()
        """Users erased since their last event (erasing again changes nothing)."""

    def _enter(self, inst: ModelInstance, definition: dict[str, Any], step: str) -> None:
        inst.step = step
        inst.version += 1
        inst.completed = not definition["steps"][step]["transitions"]
        if inst.completed:
            inst.version += 1  # the completion is an event of its own

    def start(self, user: str, step: str | None, kind: str) -> None:
        inst = self.instances.setdefault(user, ModelInstance())
        self.erased.discard(user)
        definition = self.versions[-1]
        target = step or definition["initialStep"]
        inst.history.append((kind, inst.step or "", target, "", True))
        inst.definition_version = len(self.versions)
        inst.ok, inst.payload = True, None
        self._enter(inst, definition, target)

    def transition(self, user: str, name: str, payload: dict[str, Any] | None) -> bool:
        inst = self.instances.setdefault(user, ModelInstance())
        if inst.step is None:
            self.start(user, None, "start")
        definition = self.versions[inst.definition_version - 1]
        edge = definition["steps"][inst.step]["transitions"].get(name)
        if edge is None:
            inst.history.append(("transition", inst.step, inst.step, name, False))
            inst.version += 1  # refused: recorded, the state stays as it was
            return False
        inst.history.append(("transition", inst.step, edge["step"], name, True))
        # The payload merges into the state's, top-level keys (the OwlMeans model's updatePayload).
        inst.ok = True
        inst.payload = inst.payload if payload is None else {**(inst.payload or {}), **payload}
        self._enter(inst, definition, edge["step"])
        return True

    def migrate(self) -> None:
        """Every active instance whose step the latest version has moves there (no step map)."""
        latest = self.versions[-1]
        for inst in self.instances.values():
            if inst.step is None or inst.completed or inst.definition_version == len(self.versions):
                continue
            if inst.step not in latest["steps"]:
                continue  # unmappable: left alone
            inst.history.append(("migration", inst.step, inst.step, "", True))
            inst.definition_version = len(self.versions)
            self._enter(inst, latest, inst.step)

    def clear(self, user: str) -> bool:
        inst = self.instances.get(user)
        if inst is None or inst.step is None:
            return False
        inst.history.append(("clear", inst.step, "", "", True))
        inst.step, inst.payload, inst.completed = None, None, False
        inst.version += 1
        return True

    def erase(self, user: str) -> bool:
        """`erase_user`: no state, no history; the instance's version goes on (one event more)."""
        inst = self.instances.get(user)
        if inst is None or user in self.erased:
            return False
        inst.history.clear()
        inst.step, inst.payload, inst.completed = None, None, False
        inst.version += 1
        self.erased.add(user)
        return True


class FlowMachine(RuleBasedStateMachine):
    """Drives a FlowStore and the model side by side."""

    url: str = "memory://"

    def __init__(self) -> None:
        super().__init__()
        self.store = FlowStore(self.url)
        self.flow_id = f"flow-{uuid.uuid4().hex[:12]}"
        self.model: FlowModel

    @initialize(definition=flow_definitions())
    def define(self, definition: dict[str, Any]) -> None:
        definition = {**definition, "flow": self.flow_id}
        self.store.create_flow(definition)
        self.model = FlowModel(definition)

    @rule(
        user=st.sampled_from(USERS),
        name=st.sampled_from([*TRANSITION_NAMES, "bogus"]),
        payload=payloads,
    )
    def transition(self, user: str, name: str, payload: dict[str, Any] | None) -> None:
        expected = self.model.transition(user, name, payload)
        try:
            self.store.execute_transition(user, self.flow_id, name, payload)
        except InvalidTransitionError:
            assert not expected
        else:
            assert expected

    @rule(user=st.sampled_from(USERS), data=st.data())
    def reset(self, user: str, data: st.DataObject) -> None:
        steps = list(self.model.versions[-1]["steps"])
        step = data.draw(st.none() | st.sampled_from([*steps, "no-such-step"]))
        if step == "no-such-step":
            with pytest.raises(InvalidStepError):
                self.store.reset_flow(user, self.flow_id, step)
            return
        self.store.reset_flow(user, self.flow_id, step)
        self.model.start(user, step, "reset")

    @rule(user=st.sampled_from(USERS))
    def clear(self, user: str) -> None:
        expected = self.model.clear(user)
        try:
            self.store.clear_flow_state(user, self.flow_id)
        except FlowStateNotFoundError:
            assert not expected
        else:
            assert expected

    @rule(user=st.sampled_from(USERS))
    def erase(self, user: str) -> None:
        # At least this flow's instance: the examples share one database, so the user may have
        # instances in earlier examples' flows too (the invariant checks this flow's side).
        assert self.store.erase_user(user) >= self.model.erase(user)

    @rule(definition=flow_definitions())
    def update(self, definition: dict[str, Any]) -> None:
        definition = {**definition, "flow": self.flow_id}
        self.store.update_flow(self.flow_id, definition)
        self.model.versions.append(definition)

    @rule()
    def migrate(self) -> None:
        self.store.migrate_flows(self.flow_id, len(self.model.versions))
        self.model.migrate()

    def check(self, store: FlowStore) -> None:
        for user in USERS:
            inst = self.model.instances.get(user)
            state = store.get_flow_state(user, self.flow_id)
            if inst is None or inst.step is None:
                assert state is None
            else:
                assert state is not None
                assert (state.step, state.version, state.definition_version, state.ok) == (
                    inst.step,
                    inst.version,
                    inst.definition_version,
                    inst.ok,
                )
                assert state.payload == inst.payload
                expected_status = FlowStatus.COMPLETED if inst.completed else FlowStatus.ACTIVE
                assert state.status is expected_status
            history = [
                (h.kind.value, h.from_step, h.to_step, h.transition, h.success)
                for h in store.get_flow_history(user, self.flow_id)
            ]
            assert history == (inst.history if inst else [])

    @invariant()
    def store_matches_model(self) -> None:
        if hasattr(self, "model"):
            self.check(self.store)

    def teardown(self) -> None:
        try:
            if hasattr(self, "model") and not self.url.startswith("memory:"):
                # A second store on the same database has a cold cache: it rebuilds from the log.
                with FlowStore(self.url) as reopened:
                    self.check(reopened)
        finally:
            self.store.close()


def test_random_commands_match_the_model(store_url: str) -> None:
    machine = type("Machine", (FlowMachine,), {"url": store_url})
    run_state_machine_as_test(
        machine,
        settings=settings(
            max_examples=20 if "postgres" in store_url else 40,
            stateful_step_count=20,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )


def test_random_commands_match_the_model_in_memory() -> None:
    run_state_machine_as_test(
        FlowMachine,
        settings=settings(max_examples=100, stateful_step_count=30, deadline=None),
    )


_READER = """
import json, sys
from flowstore import FlowStore
with FlowStore(sys.argv[1]) as store:
    users = sys.argv[3:]
    out = {u: {"state": (s.to_dict() if (s := store.get_flow_state(u, sys.argv[2])) else None),
               "history": [h.to_dict() for h in store.get_flow_history(u, sys.argv[2])]}
           for u in users}
print(json.dumps(out))
"""


def test_a_new_process_reads_the_same_state_and_history(store_url: str) -> None:
    flow = "reopen"
    with FlowStore(store_url) as store:
        store.create_flow(
            {
                "flow": flow,
                "initialStep": "a",
                "steps": {
                    "a": {
                        "index": 0,
                        "step": "a",
                        "service": "s",
                        "transitions": {"go": {"transition": "go", "step": "b"}},
                    },
                    "b": {"index": 1, "step": "b", "service": "s", "transitions": {}},
                },
            }
        )
        store.execute_transition("ann", flow, "go", {"k": "v"})
        with pytest.raises(FlowError):
            store.execute_transition("bob", flow, "nope")
        expected = {
            u: {
                "state": (s.to_dict() if (s := store.get_flow_state(u, flow)) else None),
                "history": [h.to_dict() for h in store.get_flow_history(u, flow)],
            }
            for u in ("ann", "bob")
        }
    result = subprocess.run(
        [sys.executable, "-c", _READER, store_url, flow, "ann", "bob"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(result.stdout) == json.loads(json.dumps(expected))
