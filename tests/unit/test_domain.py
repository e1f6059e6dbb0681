"""Folding events into aggregates, and models built from values that are valid by construction."""

from __future__ import annotations

import copy
import pickle
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import BaseModel

from flowstore.decisions import end_flow, execute_transition, override_state, start_flow
from flowstore.definitions import FlowTransition, parse_definition
from flowstore.domain import (
    FlowInstance,
    InstanceEvent,
    TransitionExecuted,
    evolve,
    id_text,
    known_good,
    project,
)
from flowstore.errors import FlowError
from flowstore.models import FlowState
from flowstore.testing import ring_flow
from flowstore.views import instance_state
from tests.strategies import payloads

START = datetime(2026, 1, 1, tzinfo=UTC)
RING = parse_definition(ring_flow("ring")).model_copy(update={"version": 1})

# One command on a user's instance: a transition (with a payload), a reset, an override, a clear.
_commands = st.one_of(
    st.tuples(
        st.just("transition"), st.sampled_from(["tick", "flip", "flop", "finish", "no"]), payloads
    ),
    st.tuples(st.just("reset"), st.sampled_from(["a", "b"]), st.none()),
    st.tuples(st.just("override"), st.sampled_from(["a", "b", "done"]), payloads),
    st.tuples(st.just("clear"), st.none(), st.none()),
)


def _decide(instance: FlowInstance | None, command: tuple[str, Any, Any], now: datetime) -> Any:
    kind, arg, payload = command
    live = instance is not None and instance.is_live
    if kind == "transition" and live:
        assert instance is not None
        return execute_transition(
            instance, RING, transition=arg, payload=payload, now=now, elapsed_ms=1.0
        ).events
    if kind == "transition":
        return start_flow(instance, RING, user_id="ann", now=now, reason="start")
    if kind == "reset":
        return start_flow(instance, RING, user_id="ann", now=now, step=arg)
    if kind == "override":
        return override_state(
            instance, RING, user_id="ann", step=arg, service=None, ok=True, payload=payload, now=now
        )
    return end_flow(instance, now=now, kind="clear") if live and instance else []


@given(st.lists(_commands, min_size=1, max_size=12))
def test_folding_a_commands_events_at_once_equals_one_at_a_time(
    commands: list[tuple[str, Any, Any]],
) -> None:
    instance: FlowInstance | None = None
    for i, command in enumerate(commands):
        try:
            events: list[InstanceEvent] = _decide(instance, command, START + timedelta(seconds=i))
        except FlowError:
            continue
        folded = project(instance, events)
        stepwise = instance
        for event in events:
            stepwise = evolve(stepwise, event)
        assert folded == stepwise
        if folded is not None:
            # Every field of the type pydantic would have made it (validating changes nothing).
            assert FlowInstance.model_validate(folded.model_dump()) == folded
            if folded.is_live:
                assert FlowState.model_validate(instance_state(folded).model_dump()) == (
                    instance_state(folded)
                )
        if instance is not None and events:
            assert folded is not instance  # a new aggregate; the old one is unchanged
        instance = folded


def test_no_events_leave_the_aggregate_as_it_is() -> None:
    [started] = start_flow(None, RING, user_id="ann", now=START, reason="start")
    instance = project(None, [started])
    assert project(instance, []) is instance
    assert project(None, []) is None


def test_known_good_holds_what_validation_would_and_wants_every_field() -> None:
    [started] = start_flow(None, RING, user_id="ann", now=START, reason="start")
    instance = project(None, [started])
    assert isinstance(instance, FlowInstance)
    decision = execute_transition(
        instance, RING, transition="tick", payload={"n": 1}, now=START, elapsed_ms=2.0
    )
    [built] = decision.events
    fields = built.model_dump()
    validated = TransitionExecuted.model_validate(fields)
    assert built == validated
    assert built.model_fields_set == validated.model_fields_set
    assert known_good(TransitionExecuted, dict(fields)) == validated
    del fields["rules"]  # one with a default, missed: refused rather than left unset
    with pytest.raises(AssertionError):
        known_good(TransitionExecuted, fields)


def _state() -> FlowState:
    [started] = start_flow(None, RING, user_id="ann", now=START, reason="start")
    instance = project(None, [started])
    assert instance is not None
    return instance_state(instance)


def test_models_built_known_good_share_one_read_only_set_of_field_names() -> None:
    one, other = _state(), _state()
    # One set for all: a set of each model's own was a third of the cost of building one.
    assert one.model_fields_set is other.model_fields_set
    assert one.model_fields_set == set(FlowState.model_fields)
    for change in (
        lambda names: names.add("x"),
        lambda names: names.discard("step"),
        lambda names: names.update({"x"}),
        lambda names: names.clear(),
        lambda names: names.__ior__({"x"}),
    ):
        with pytest.raises(TypeError):
            change(one.model_fields_set)
    assert other.model_fields_set == set(FlowState.model_fields)


def test_copies_of_models_built_known_good_get_field_names_of_their_own() -> None:
    state = _state()
    for copied in (
        state.model_copy(update={"step": "b"}),  # pydantic adds the updated names to the copy's
        state.model_copy(update={"extra": 1}),
        copy.copy(state),
        copy.deepcopy(state),
        pickle.loads(pickle.dumps(state)),
    ):
        assert type(copied.model_fields_set) is set
        assert copied.model_fields_set >= set(FlowState.model_fields)
        copied.model_fields_set.add("mine")  # its own: the originals' stay as they were
    assert state.model_fields_set == set(FlowState.model_fields)
    assert _state().model_fields_set == set(FlowState.model_fields)


def test_known_good_refuses_mutable_models() -> None:
    class Mutable(BaseModel):
        name: str

    # pydantic adds an assigned field's name to the model's set: the shared one would change.
    with pytest.raises(AssertionError):
        known_good(Mutable, {"name": "x"})


def test_known_good_refuses_models_with_private_attributes() -> None:
    # FlowTransition keeps its compiled schema privately: `known_good` would leave it unset.
    with pytest.raises(AssertionError):
        known_good(FlowTransition, dict.fromkeys(FlowTransition.model_fields))


@given(st.uuids(), st.text(max_size=40))
def test_an_id_s_text_is_its_str_for_uuids_and_text(uuid: UUID, text: str) -> None:
    assert id_text(uuid) == str(uuid)
    assert id_text(UUID(int=uuid.int)) == str(uuid)  # an equal UUID decoded again: the same text
    assert id_text(text) == text
