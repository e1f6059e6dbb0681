"""Flow definitions: the seed's JSON in and out, every problem reported at once, updates, payloads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from flowstore import (
    DefinitionError,
    FlowDefinition,
    FlowStore,
    PayloadTooLargeError,
    PayloadValidationError,
)
from flowstore.definitions import (
    MAX_DEFINITION_BYTES,
    MAX_TTL_SECONDS,
    parse_definition,
    reachable_steps,
    update_definition,
    validate_flow,
)
from flowstore.inputs import (
    MAX_JSON_DEPTH,
    MAX_NAME_LENGTH,
    check_payload,
    has_control_characters,
    json_nesting,
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


def test_unreachable_steps_are_warnings() -> None:
    flow = onboarding()
    flow["steps"]["welcome"]["transitions"]["start"]["step"] = "verification"
    assert validate_flow(flow) == [
        "step 'profile-setup' is not reachable from initialStep 'welcome'",
        "step 'preferences' is not reachable from initialStep 'welcome'",
    ]
    assert parse_definition(flow).steps["preferences"].index == 2  # legal, and stored as given


def test_a_flow_that_never_completes_is_legal_with_a_warning() -> None:
    # A subscription that loops forever: every run ends by clear, reset or expiry.
    flow = linear("f")
    flow["steps"]["s2"]["transitions"] = {"again": {"transition": "again", "step": "s0"}}
    assert validate_flow(flow) == [
        "no terminal step (one without transitions) is reachable from 's0'"
    ]
    with FlowStore("memory://") as store:
        store.create_flow(flow)
        assert store.execute_transition("ann", "f", "next").step == "s1"


def test_a_terminal_step_that_cannot_be_reached_does_not_count() -> None:
    flow = linear("f")
    flow["steps"]["s1"]["transitions"]["next"]["step"] = "s0"  # s0 <-> s1 loop; s2 unreachable
    assert validate_flow(flow) == [
        "step 's2' is not reachable from initialStep 's0'",
        "no terminal step (one without transitions) is reachable from 's0'",
    ]


def test_a_valid_flow_has_no_warnings() -> None:
    assert validate_flow(onboarding()) == []
    assert validate_flow(parse_definition(onboarding())) == []


def test_validate_flow_raises_every_problem() -> None:
    bad = onboarding()
    bad["ttl"] = -5
    with pytest.raises(DefinitionError, match="ttl must be a positive"):
        validate_flow(bad)


def test_a_shape_problem_hides_no_other_problem() -> None:
    # A non-integer index once stopped the checks at the shape: the dangling target and the
    # negative ttl went unreported until the index was fixed.
    bad = onboarding()
    bad["steps"]["preferences"]["index"] = "second"
    bad["steps"]["welcome"]["transitions"]["start"]["step"] = "missing-step"
    bad["steps"]["profile-setup"]["service"] = 7
    bad["ttl"] = -5
    bad["steps"]["verification"]["index"] = 1  # same index as profile-setup
    with pytest.raises(DefinitionError) as caught:
        parse_definition(bad)
    problems = caught.value.problems
    assert sorted(p.split(":")[0] for p in problems[:2]) == [
        "steps.preferences.index",
        "steps.profile-setup.service",
    ]
    assert problems[2:] == [
        "step index 1 is used 2 times",
        "transition 'start' of step 'welcome' targets unknown step 'missing-step'",
        "ttl must be a positive number of seconds, not -5",
    ]
    assert caught.value.flow_id == "user-onboarding"


def test_wrong_types_everywhere_are_listed_without_a_crash() -> None:
    for bad in (
        {"flow": 3, "initialStep": [], "steps": {"a": "b", 4: {}}, "ttl": True},
        {"flow": "f", "initialStep": "a", "steps": {"a": {"transitions": {"t": 5, "u": {}}}}},
        {"flow": "f", "steps": []},
    ):
        with pytest.raises(DefinitionError) as caught:
            parse_definition(bad)
        assert caught.value.problems


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


def nested(depth: int) -> dict[str, Any]:
    """An object `depth` levels deep: {"a": {"a": ... {"leaf": 1}}}."""
    value: dict[str, Any] = {"leaf": 1}
    for _ in range(depth - 1):
        value = {"a": value}
    return value


def with_blob(size: int) -> dict[str, Any]:
    return linear("f", config={"blob": "x" * size})


def encoded_size(definition: dict[str, Any]) -> int:
    """Bytes of the definition's JSON as its event stores it."""
    return len(orjson.dumps(parse_definition(definition).model_dump()))


def test_a_definition_of_the_size_limit_is_accepted_and_one_byte_more_is_refused() -> None:
    size = MAX_DEFINITION_BYTES - encoded_size(with_blob(0))
    assert encoded_size(with_blob(size)) == MAX_DEFINITION_BYTES
    with pytest.raises(DefinitionError) as caught:
        parse_definition(with_blob(size + 1))
    assert caught.value.problems == [
        f"the definition is {MAX_DEFINITION_BYTES + 1} bytes as JSON, over the limit of "
        f"{MAX_DEFINITION_BYTES} bytes"
    ]


def test_the_size_limit_leaves_room_under_kafkas_one_megabyte_messages() -> None:
    assert MAX_DEFINITION_BYTES <= 1024 * 1024 // 4


def test_a_10mb_definition_is_refused() -> None:
    with pytest.raises(DefinitionError, match="over the limit of"):
        parse_definition(with_blob(10_000_000))


def test_an_update_that_makes_the_definition_too_large_is_refused() -> None:
    current = parse_definition(linear("f"))
    with pytest.raises(DefinitionError, match="over the limit of"):
        update_definition(current, {"prefabs": {"blob": "x" * MAX_DEFINITION_BYTES}})


def long_names(name: str) -> list[tuple[str, dict[str, Any]]]:
    """(kind, definition) for each kind of name in a definition, set to `name`."""
    flow = linear("f")
    step = linear("f")
    step["steps"][name] = step["steps"].pop("s2") | {"step": name}
    step["steps"]["s1"]["transitions"]["next"]["step"] = name
    service, module, transition = linear("f"), linear("f"), linear("f")
    service["steps"]["s0"]["service"] = name
    module["steps"]["s0"]["module"] = name
    edges = transition["steps"]["s0"]["transitions"]
    edges[name] = edges.pop("next") | {"transition": name}
    return [
        ("flow id", flow | {"flow": name}),
        ("step name", step),
        ("service", service),
        ("module", module),
        ("transition name", transition),
    ]


@pytest.mark.parametrize(("kind", "definition"), long_names("n" * (MAX_NAME_LENGTH + 1)))
def test_names_longer_than_the_limit_are_refused(kind: str, definition: dict[str, Any]) -> None:
    with pytest.raises(DefinitionError) as caught:
        parse_definition(definition)
    assert caught.value.problems == [
        f"{kind} 'nnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnn...' is longer than {MAX_NAME_LENGTH} "
        f"characters ({MAX_NAME_LENGTH + 1})"
    ]


@pytest.mark.parametrize(("kind", "definition"), long_names("n" * MAX_NAME_LENGTH))
def test_names_as_long_as_the_limit_are_accepted(kind: str, definition: dict[str, Any]) -> None:
    assert parse_definition(definition).to_seed() == definition


def test_a_refused_long_flow_id_is_shortened_in_the_error() -> None:
    with pytest.raises(DefinitionError) as caught:
        parse_definition(linear("g" * 10_000))
    assert caught.value.flow_id == "g" * 40 + "..."
    assert len(caught.value.message) < 500


def test_an_empty_service_is_refused() -> None:
    definition = linear("f")
    definition["steps"]["s1"]["service"] = " "
    with pytest.raises(DefinitionError) as caught:
        parse_definition(definition)
    assert caught.value.problems == ["service of step 's1' must not be empty"]


@pytest.mark.parametrize(
    ("where", "value"),
    [
        ("config", {"n": 10**30}),
        ("config", {"n": 2**64}),
        ("config", {"n": -(2**63) - 1}),
        ("prefabs", {"list": [1, 2, 10**20]}),
    ],
)
def test_integers_beyond_64_bits_are_refused(where: str, value: dict[str, Any]) -> None:
    with pytest.raises(DefinitionError, match="Integer exceeds 64-bit range"):
        parse_definition(linear("f", **{where: value}))


def test_integers_within_64_bits_are_accepted() -> None:
    config = {"max": 2**64 - 1, "min": -(2**63)}
    assert parse_definition(linear("f", config=config)).config == config


def test_a_step_index_beyond_64_bits_is_refused() -> None:
    definition = linear("f")
    definition["steps"]["s0"]["index"] = 10**30
    with pytest.raises(DefinitionError, match="64-bit") as caught:
        parse_definition(definition)
    assert len(caught.value.problems) == 1


@pytest.mark.parametrize(
    "where",
    [
        lambda d: d.update(config={"x": "\udc80"}),
        lambda d: d.update(prefabs={"\ud800": 1}),
        lambda d: d["steps"]["s0"]["transitions"]["next"].update(
            payloadSchema={"type": "object", "description": "\udfff"}
        ),
    ],
    ids=["config-value", "prefabs-key", "payload-schema"],
)
def test_lone_surrogates_anywhere_are_refused(where: Any) -> None:
    definition = linear("f")
    where(definition)
    with pytest.raises(DefinitionError, match="surrogates not allowed"):
        parse_definition(definition)


def test_nesting_up_to_the_limit_is_accepted_and_one_level_more_is_refused() -> None:
    # The definition is level 1, so its config starts at level 2.
    fits = linear("f", config=nested(MAX_JSON_DEPTH - 1))
    assert parse_definition(fits).config == fits["config"]
    with pytest.raises(DefinitionError) as caught:
        parse_definition(linear("f", config=nested(MAX_JSON_DEPTH)))
    assert caught.value.problems == [
        f"the definition is nested {MAX_JSON_DEPTH + 1} levels deep, over the limit of "
        f"{MAX_JSON_DEPTH}"
    ]


@pytest.mark.parametrize("depth", [253, 254, 2000])
def test_configs_nested_past_what_orjson_encodes_are_refused(depth: int) -> None:
    with pytest.raises(DefinitionError, match="nest"):
        parse_definition(linear("f", config=nested(depth)))


def test_a_model_nested_too_deep_for_pydantic_is_refused() -> None:
    model = FlowDefinition.model_validate(linear("f", config=nested(2000)))
    with pytest.raises(DefinitionError, match="not JSON"):
        parse_definition(model)


def test_a_ttl_of_at_most_100_years_is_accepted() -> None:
    assert MAX_TTL_SECONDS == 100 * 365 * 24 * 3600
    assert parse_definition(linear("f", ttl=MAX_TTL_SECONDS)).ttl == MAX_TTL_SECONDS


@pytest.mark.parametrize("ttl", [MAX_TTL_SECONDS + 1, 10**12, 10**30])
def test_a_longer_ttl_is_refused(ttl: int) -> None:
    with pytest.raises(DefinitionError, match=f"ttl must be at most {MAX_TTL_SECONDS} seconds"):
        parse_definition(linear("f", ttl=ttl))


def test_the_longest_ttl_still_gives_an_expiry(tmp_path: Path) -> None:
    with FlowStore(f"sqlite:///{tmp_path / 'store.db'}") as store:
        store.create_flow(linear("f", ttl=MAX_TTL_SECONDS))
        state = store.execute_transition("ann", "f", "next")
        assert state.expires_at is not None
        assert (state.expires_at - state.updated_at).total_seconds() == MAX_TTL_SECONDS


def test_payloads_nested_up_to_the_limit_are_accepted_and_deeper_ones_refused() -> None:
    assert check_payload(nested(MAX_JSON_DEPTH)) == nested(MAX_JSON_DEPTH)
    with pytest.raises(PayloadValidationError, match=f"nested {MAX_JSON_DEPTH + 1} levels deep"):
        check_payload(nested(MAX_JSON_DEPTH + 1))


def test_payloads_nested_in_the_fewest_bytes_are_held_to_the_limit_too() -> None:
    # Arrays of arrays: two bytes a level, the least a level takes (the check counts brackets
    # only in payloads longer than twice the limit).
    def arrays(depth: int) -> dict[str, Any]:
        value: Any = []
        for _ in range(depth - 2):
            value = [value]
        return {"": value}

    assert check_payload(arrays(MAX_JSON_DEPTH)) == arrays(MAX_JSON_DEPTH)
    with pytest.raises(PayloadValidationError, match=f"nested {MAX_JSON_DEPTH + 1} levels deep"):
        check_payload(arrays(MAX_JSON_DEPTH + 1))


@pytest.mark.parametrize("depth", [253, 254, 255, 2000])
def test_payloads_nested_near_orjsons_limit_are_refused(depth: int) -> None:
    # 253 levels passed orjson alone but not inside its event (one level more): untyped TypeError.
    with pytest.raises(PayloadValidationError, match=r"nest|Recursion"):
        check_payload(nested(depth))


@pytest.mark.parametrize("flow_id", [".", "..", "a/b", "/"])
def test_flow_ids_that_break_urls_are_refused(flow_id: str) -> None:
    with pytest.raises(DefinitionError, match="must not be '\\.', '\\.\\.' or contain '/'"):
        parse_definition(linear(flow_id))


def test_a_transition_field_differing_from_its_key_is_kept_but_must_be_a_name() -> None:
    flow = onboarding()
    flow["steps"]["welcome"]["transitions"]["start"]["transition"] = "begin"
    assert parse_definition(flow).to_seed() == flow
    flow["steps"]["welcome"]["transitions"]["start"]["transition"] = "bad\nname"
    with pytest.raises(DefinitionError) as caught:
        parse_definition(flow)
    assert caught.value.problems == ["transition name 'bad\\nname' contains a control character"]


def test_steps_marked_initial_count_as_entry_points_for_reachability() -> None:
    flow = linear("entries", 3)
    flow["steps"]["s0"]["transitions"] = {}  # s1 and s2 are now unreachable from s0
    assert "step 's1' is not reachable from initialStep 's0'" in validate_flow(flow)
    flow["steps"]["s1"]["initial"] = True
    assert parse_definition(flow).entry_steps() == ["s0", "s1"]
    assert validate_flow(flow) == []


@given(st.text(alphabet=st.characters(codec=None, min_codepoint=0, max_codepoint=0xFFFF)))
def test_control_characters_are_exactly_the_c0_range_and_lone_surrogates(text: str) -> None:
    expected = any(ord(c) < 32 or 0xD800 <= ord(c) <= 0xDFFF for c in text)
    assert has_control_characters(text) is expected


_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**31), 2**31)
    | st.text(alphabet='{[]}ab"', max_size=6),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.text(alphabet="ab{[", max_size=3), inner, max_size=3)
    ),
    max_leaves=40,
)


@given(st.dictionaries(st.text(alphabet="ab{[", max_size=3), _json, max_size=4), st.integers(0, 60))
def test_payload_depth_is_checked_as_the_walk_measures_it(
    payload: dict[str, Any], wraps: int
) -> None:
    # The bracket count short-cuts the walk: whatever brackets strings hold, the verdict is the walk's.
    for _ in range(wraps):
        payload = {"x": [payload]}
    if json_nesting(payload) > MAX_JSON_DEPTH:
        with pytest.raises(PayloadValidationError, match="levels deep"):
            check_payload(payload, limit=10**9)
    else:
        assert check_payload(payload, limit=10**9) == payload
