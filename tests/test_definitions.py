"""Flow definitions: the seed's JSON in and out, every problem reported at once, updates, payloads."""

from __future__ import annotations

from typing import Any

import pytest

from flowstore import DefinitionError, FlowDefinition, PayloadTooLargeError, PayloadValidationError
from flowstore.definitions import (
    check_payload,
    parse_definition,
    reachable_steps,
    update_definition,
)
from tests.flows import linear, onboarding


def test_seed_json_round_trips_exactly() -> None:
    seed = onboarding()
    assert parse_definition(seed).to_seed() == seed


def test_model_uses_snake_case_in_python() -> None:
    definition = parse_definition(onboarding())
    assert definition.initial_step == "welcome"
    assert definition.steps["profile-setup"].transitions["skip"].step == "verification"
    assert definition.steps["completed"].is_terminal
    assert not definition.steps["welcome"].is_terminal


def test_every_problem_is_listed_at_once() -> None:
    bad = onboarding()
    bad["initialStep"] = "nowhere"
    bad["steps"]["welcome"]["transitions"]["start"]["step"] = "missing-step"
    bad["steps"]["preferences"]["index"] = 1  # same index as profile-setup
    bad["steps"]["verification"]["step"] = "verify"  # disagrees with its key
    with pytest.raises(DefinitionError) as caught:
        parse_definition(bad)
    problems = caught.value.problems
    assert any("initialStep 'nowhere'" in p for p in problems)
    assert any("'missing-step'" in p for p in problems)
    assert any("index 1 is used 2 times" in p for p in problems)
    assert any("'verification' says its name is 'verify'" in p for p in problems)
    assert len(problems) == 4
    assert caught.value.flow_id == "user-onboarding"


@pytest.mark.parametrize(
    ("mutate", "needle"),
    [
        (lambda d: d.pop("initialStep"), "initialStep"),
        (lambda d: d.update(steps={}), "steps must not be empty"),
        (lambda d: d.update(flow=""), "flow id must not be empty"),
        (lambda d: d.update(ttl=0), "ttl must be a positive"),
        (lambda d: d.update(intialStep="x"), "intialStep"),
        (lambda d: d["steps"]["s0"].update(index="first"), "index"),
        (
            lambda d: d["steps"]["s0"]["transitions"]["next"].update(
                payloadSchema={"type": "no-such-type"}
            ),
            "not a valid JSON Schema",
        ),
    ],
)
def test_malformed_definitions_name_the_problem(mutate: Any, needle: str) -> None:
    definition = linear("f")
    mutate(definition)
    with pytest.raises(DefinitionError, match=needle):
        parse_definition(definition)


def test_unreachable_steps_are_named() -> None:
    flow = onboarding()
    flow["steps"]["welcome"]["transitions"]["start"]["step"] = "verification"
    with pytest.raises(DefinitionError) as caught:
        parse_definition(flow)
    assert caught.value.problems == [
        "step 'profile-setup' is not reachable from initialStep 'welcome'",
        "step 'preferences' is not reachable from initialStep 'welcome'",
    ]


def test_a_flow_that_can_never_complete_is_refused() -> None:
    flow = linear("f")
    flow["steps"]["s2"]["transitions"] = {"again": {"transition": "again", "step": "s0"}}
    with pytest.raises(DefinitionError) as caught:
        parse_definition(flow)
    assert caught.value.problems == [
        "no terminal step (one without transitions) is reachable from 's0'"
    ]


def test_a_terminal_step_that_cannot_be_reached_does_not_count() -> None:
    flow = linear("f")
    flow["steps"]["s1"]["transitions"]["next"]["step"] = "s0"  # s0 <-> s1 loop; s2 unreachable
    with pytest.raises(DefinitionError) as caught:
        parse_definition(flow)
    assert caught.value.problems == [
        "step 's2' is not reachable from initialStep 's0'",
        "no terminal step (one without transitions) is reachable from 's0'",
    ]


def test_reachability_problems_come_with_all_the_others() -> None:
    bad = onboarding()
    bad["steps"]["welcome"]["transitions"]["start"]["step"] = "missing-step"
    bad["steps"]["preferences"]["index"] = 1  # same index as profile-setup
    bad["ttl"] = -5
    with pytest.raises(DefinitionError) as caught:
        parse_definition(bad)
    problems = caught.value.problems
    assert "transition 'start' of step 'welcome' targets unknown step 'missing-step'" in problems
    assert "step index 1 is used 2 times" in problems
    assert "ttl must be a positive number of seconds, not -5" in problems
    # Only the initial step is reachable, and it has a transition: nothing can complete.
    unreachable = [p for p in problems if "is not reachable" in p]
    assert len(unreachable) == 4
    assert "no terminal step (one without transitions) is reachable from 'welcome'" in problems
    assert len(problems) == 8


def test_reachable_steps_walk_breadth_first_from_the_initial_step() -> None:
    definition = parse_definition(onboarding())
    assert reachable_steps(definition) == [
        "welcome",
        "profile-setup",
        "preferences",
        "verification",
        "completed",
    ]


def test_non_object_definition_is_rejected() -> None:
    with pytest.raises(DefinitionError, match="JSON object"):
        parse_definition(["not", "a", "flow"])  # type: ignore[arg-type]


def test_update_replaces_top_level_keys_whole() -> None:
    current = parse_definition(onboarding())
    updated = update_definition(current, {"config": {"only": "this"}, "ttl": 60})
    assert updated.config == {"only": "this"}
    assert updated.ttl == 60
    assert updated.steps == current.steps


def test_update_accepts_snake_and_camel_keys() -> None:
    # s0 -> s1 -> s2 with a way back from s1, so starting at s1 still reaches every step.
    flow = linear("f")
    flow["steps"]["s1"]["transitions"]["back"] = {"transition": "back", "step": "s0"}
    current = parse_definition(flow)
    assert update_definition(current, {"initialStep": "s1"}).initial_step == "s1"
    assert update_definition(current, {"initial_step": "s1"}).initial_step == "s1"


def test_update_cannot_rename_the_flow_or_add_unknown_keys() -> None:
    current = parse_definition(onboarding())
    with pytest.raises(DefinitionError) as caught:
        update_definition(current, {"flow": "other", "colour": "blue"})
    assert len(caught.value.problems) == 2


def test_update_result_is_validated() -> None:
    current = parse_definition(onboarding())
    with pytest.raises(DefinitionError, match="initialStep 'gone'"):
        update_definition(current, {"initialStep": "gone"})


def test_payload_schema_is_enforced_per_transition() -> None:
    definition = linear("f")
    definition["steps"]["s0"]["transitions"]["next"]["payloadSchema"] = {
        "type": "object",
        "properties": {"age": {"type": "integer", "minimum": 18}},
        "required": ["age"],
    }
    edge = parse_definition(definition).steps["s0"].transitions["next"]
    assert edge.payload_problem({"age": 30}) is None
    problem = edge.payload_problem({"age": 3})
    assert problem is not None
    assert "age" in problem
    assert "required" in (edge.payload_problem({}) or "")


@pytest.mark.parametrize(
    "payload",
    [
        [1, 2],
        "text",
        3,
        {"n": float("nan")},
        {"t": (1, 2)},
        {"b": b"bytes"},
        {"s": {1, 2}},
        {1: "x"},
    ],
)
def test_non_json_payloads_are_refused(payload: Any) -> None:
    with pytest.raises(PayloadValidationError):
        check_payload(payload)


def test_payload_size_limit_names_size_and_limit() -> None:
    with pytest.raises(PayloadTooLargeError) as caught:
        check_payload({"blob": "x" * 200}, limit=100)
    assert caught.value.details["limit"] == 100
    assert caught.value.details["size"] > 100
    assert check_payload({"ok": True}, limit=100) == {"ok": True}
    assert check_payload(None) is None


def test_definition_models_are_frozen() -> None:
    definition = parse_definition(onboarding())
    with pytest.raises(ValueError, match="frozen"):
        definition.flow = "other"  # type: ignore[misc]
    assert isinstance(definition, FlowDefinition)


@pytest.mark.parametrize("payload", [{"note": "a\x00b"}, {"k\x00": 1}, {"deep": [{"x": ["\x00"]}]}])
def test_payloads_with_nul_are_refused(payload: Any) -> None:
    with pytest.raises(PayloadValidationError, match="NUL"):
        check_payload(payload)


def test_the_text_backslash_u0000_is_not_a_nul() -> None:
    assert check_payload({"note": "\\u0000"}) == {"note": "\\u0000"}


def test_names_with_control_characters_are_problems() -> None:
    definition = linear("f")
    definition["steps"]["s0"]["service"] = "svc\x00"
    with pytest.raises(DefinitionError, match="service 'svc\\\\x00' contains a control character"):
        parse_definition(definition)
