"""Flow definitions: the seed's JSON in and out, every problem reported at once, updates, payloads."""

from __future__ import annotations

from typing import Any

import pytest

from flowstore import DefinitionError, FlowDefinition, PayloadTooLargeError, PayloadValidationError
from flowstore.definitions import check_payload, parse_definition, update_definition
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
    current = parse_definition(onboarding())
    assert update_definition(current, {"initialStep": "preferences"}).initial_step == "preferences"
    assert update_definition(current, {"initial_step": "preferences"}).initial_step == "preferences"


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
