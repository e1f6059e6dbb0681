"""Payload schemas: no retrieval, linear-time regexes, bounded uniqueItems and a validation budget."""

from __future__ import annotations

import urllib.request
from typing import Any

import pytest

from flowstore import DefinitionError, schemas
from flowstore.definitions import parse_definition
from flowstore.schemas import MAX_VALIDATION_STEPS, PayloadSchema, schema_problems
from tests.flows import linear


def _with_schema(schema: dict[str, Any]) -> dict[str, Any]:
    flow = linear("f")
    flow["steps"]["s0"]["transitions"]["next"]["payloadSchema"] = schema
    return flow


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every attempt to open a URL is recorded and fails."""
    opened: list[str] = []

    def refuse(url: Any, *args: Any, **kwargs: Any) -> Any:
        opened.append(str(getattr(url, "full_url", url)))
        raise OSError("no network in this test")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    return opened


@pytest.mark.parametrize(
    "ref",
    [
        "http://127.0.0.1:1/internal.json",
        "file:///etc/hostname",
        "other.json#/x",
        "urn:example:thing",
    ],
)
def test_non_local_refs_are_refused_when_the_flow_is_defined(
    ref: str, no_network: list[str]
) -> None:
    schema = {"type": "object", "properties": {"a": {"$ref": ref}}}
    with pytest.raises(DefinitionError, match="refers outside the schema"):
        parse_definition(_with_schema(schema))
    assert no_network == []


def test_local_refs_still_work() -> None:
    schema = {
        "$defs": {"name": {"type": "string", "minLength": 1}},
        "type": "object",
        "properties": {"name": {"$ref": "#/$defs/name"}},
    }
    edge = parse_definition(_with_schema(schema)).steps["s0"].transitions["next"]
    assert edge.payload_problem({"name": "ann"}) is None
    assert "should be non-empty" in (edge.payload_problem({"name": ""}) or "")


def test_validation_never_retrieves_a_reference(no_network: list[str]) -> None:
    # Bypassing the definition check: even then the registry behind validation fetches nothing.
    schema = {"properties": {"a": {"$ref": "http://127.0.0.1:1/x.json"}}}
    problem = PayloadSchema(schema).problem({"a": 1})
    assert problem is not None
    assert "cannot be resolved" in problem
    assert no_network == []


def test_an_unresolvable_local_ref_is_a_payload_problem_not_a_crash() -> None:
    schema = {"properties": {"a": {"$ref": "#/$defs/missing"}}}
    edge = parse_definition(_with_schema(schema)).steps["s0"].transitions["next"]
    assert "cannot be resolved" in (edge.payload_problem({"a": 1}) or "")


@pytest.mark.parametrize("pattern", [r"^(a)\1$", r"^(?=a).*", r"(?<!x)y", "(x{1000}){1000}"])
def test_patterns_re2_cannot_run_are_refused(pattern: str) -> None:
    with pytest.raises(DefinitionError, match="is not supported"):
        parse_definition(_with_schema({"type": "string", "pattern": pattern}))
    with pytest.raises(DefinitionError, match="is not supported"):
        parse_definition(_with_schema({"patternProperties": {pattern: {}}}))


def test_a_backtracking_pattern_runs_in_linear_time() -> None:
    # Python's re needs ~2**n steps here (28 characters held the GIL for 12 s); RE2 is linear.
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string", "pattern": r"^(\w+\s?)*$"}},
    }
    edge = parse_definition(_with_schema(schema)).steps["s0"].transitions["next"]
    assert "does not match" in (edge.payload_problem({"name": "a" * 5000 + "!"}) or "")
    assert edge.payload_problem({"name": "ann lee"}) is None


def test_pattern_properties_and_additional_properties_use_re2() -> None:
    schema = {
        "type": "object",
        "patternProperties": {r"^(\w+\s?)*$": {"type": "integer"}},
        "additionalProperties": False,
    }
    edge = parse_definition(_with_schema(schema)).steps["s0"].transitions["next"]
    assert edge.payload_problem({"ok": 1}) is None
    assert "is not of type 'integer'" in (edge.payload_problem({"ok": "x"}) or "")
    assert "not allowed" in (edge.payload_problem({"a" * 5000 + "!": 1}) or "")


def test_unevaluated_properties_with_pattern_properties_is_refused() -> None:
    schema = {"patternProperties": {"^a": {}}, "unevaluatedProperties": False}
    with pytest.raises(DefinitionError, match="unevaluatedProperties"):
        parse_definition(_with_schema(schema))


def test_a_pattern_inside_data_keywords_is_not_a_regex() -> None:
    assert schema_problems({"const": {"pattern": r"(a)\1"}, "properties": {"pattern": {}}}) == []


def test_unique_items_is_one_pass() -> None:
    # 3,000 small distinct objects took 47 s of CPU with pairwise comparison.
    edge = (
        parse_definition(_with_schema({"type": "array", "uniqueItems": True}))
        .steps["s0"]
        .transitions["next"]
    )
    many = [{"k": i, "v": [i, str(i)]} for i in range(3000)]
    assert edge.payload_problem(many) is None
    assert "non-unique" in (edge.payload_problem([*many, {"v": [5, "5"], "k": 5}]) or "")


@pytest.mark.parametrize(
    ("items", "unique"),
    [
        ([1, 1.0], False),
        ([True, 1], True),
        ([False, 0, None, ""], True),
        ([{"a": 1, "b": [1]}, {"b": [1.0], "a": 1}], False),
        ([[1, 2], [2, 1]], True),
        (["1", 1], True),
    ],
)
def test_unique_items_follows_json_schema_equality(items: list[Any], unique: bool) -> None:
    problem = PayloadSchema({"uniqueItems": True}).problem(items)
    assert (problem is None) is unique


def test_a_schema_whose_work_multiplies_is_cut_off_by_the_budget() -> None:
    # Every level evaluates the next one twice: 2**40 keyword evaluations without a budget.
    schema = {
        "$defs": {
            "a": {"allOf": [{"items": {"$ref": "#/$defs/a"}}, {"items": {"$ref": "#/$defs/a"}}]}
        },
        "$ref": "#/$defs/a",
    }
    edge = parse_definition(_with_schema(schema)).steps["s0"].transitions["next"]
    nested: Any = []
    for _ in range(40):
        nested = [nested]
    assert f"more than {MAX_VALIDATION_STEPS}" in (edge.payload_problem(nested) or "")
    assert edge.payload_problem([[[]]]) is None  # the budget is per payload


def test_a_schema_that_refers_to_itself_without_end_is_a_payload_problem() -> None:
    edge = parse_definition(_with_schema({"$ref": "#"})).steps["s0"].transitions["next"]
    assert edge.payload_problem({}) is not None


def test_a_stored_schema_with_a_pattern_re2_refuses_fails_payloads_not_the_server() -> None:
    # Definitions saved before patterns were checked are still in logs: validation says no.
    problem = PayloadSchema({"properties": {"a": {"pattern": r"(a)\1"}}}).problem({"a": "aa"})
    assert problem is not None
    assert "RE2" in problem


def test_validation_also_stops_at_its_cpu_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(schemas, "MAX_VALIDATION_CPU_SECONDS", 0.0)
    problem = PayloadSchema({"items": {"type": "integer"}}).problem(list(range(1000)))
    assert problem is not None
    assert "CPU" in problem
