"""State tokens against strings the real @owlmeans/flow produced (tests/fixtures/owlmeans)."""

from __future__ import annotations

import json
import sys
from typing import Any

import pytest

from flowstore import (
    FlowDefinition,
    FlowState,
    InvalidStepError,
    StateTokenError,
    StateTokenFlowError,
    StateTokenFormatError,
    StateTokenStepError,
    decode_state_token,
    encode_state_token,
)
from flowstore.definitions import parse_definition
from flowstore.tokens import _js_number, token_flow_id
from tests.owlmeans import FIXTURES

FLOWS = {
    name: parse_definition(json.loads((FIXTURES / f"{name}.json").read_text()))
    for name in ("_oa", "_oidc", "_oidp", "_stb")
}
TOKENS = json.loads((FIXTURES / "tokens.json").read_text())
EDGES = json.loads((FIXTURES / "decode_edge.json").read_text())


def provider(flow_id: str) -> FlowDefinition:
    """The fixtures' provider (client-flow's): the flow by id, else an unknown-flow error."""
    if flow_id not in FLOWS:
        raise StateTokenFlowError(flow_id)
    return FLOWS[flow_id]


def as_state(model_state: dict[str, Any]) -> FlowState:
    """A model state (camelCase JSON) as a FlowState; the model's null entity id is `""` here."""
    data = dict(model_state)
    if "entityId" in data and data["entityId"] is None:
        data["entityId"] = ""
    return FlowState.model_validate(data)


def model_fields(state: FlowState) -> dict[str, Any]:
    """The model's fields of a state, as the fixtures write a decoded state."""
    data = state.to_dict()
    names = ("flow", "step", "previous", "service", "ok", "message", "entityId", "payload")
    return {k: data[k] for k in names if data[k] is not None}


@pytest.mark.parametrize("case", TOKENS, ids=[c["id"] for c in TOKENS])
def test_encoding_gives_the_real_models_token(case: dict[str, Any]) -> None:
    token = encode_state_token(FLOWS[case["flow"]], as_state(case["state"]))
    assert token == case["token"]


@pytest.mark.parametrize("case", TOKENS, ids=[c["id"] for c in TOKENS])
def test_decoding_gives_the_real_models_state(case: dict[str, Any]) -> None:
    decoded = decode_state_token(case["token"], FLOWS[case["flow"]])
    expected = dict(case["decoded"])
    if "entityId" in expected and expected["entityId"] is None:
        expected["entityId"] = ""  # the model's null
    assert model_fields(decoded) == expected
    assert decode_state_token(case["token"], provider) == decoded
    reencoded = encode_state_token(FLOWS[case["flow"]], decoded)
    assert (reencoded == case["token"]) is case["reserialized_equals_token"]


_DECODED = [c for c in EDGES if "decoded" in c]
_REFUSED = [c for c in EDGES if "error" in c]


@pytest.mark.parametrize("case", _DECODED, ids=[c["id"] for c in _DECODED])
def test_edge_tokens_decode_as_the_real_model_decodes_them(case: dict[str, Any]) -> None:
    assert model_fields(decode_state_token(case["token"], provider)) == case["decoded"]


_ERRORS = {
    "UnknownFlowStep": StateTokenStepError,
    "UnknownFlow": StateTokenFlowError,
}


@pytest.mark.parametrize("case", _REFUSED, ids=[c["id"] for c in _REFUSED])
def test_edge_tokens_the_real_model_refuses_raise_a_typed_error(case: dict[str, Any]) -> None:
    expected = _ERRORS.get(case["error"]["name"], StateTokenFormatError)
    with pytest.raises(expected) as caught:
        decode_state_token(case["token"], provider)
    assert isinstance(caught.value, StateTokenError)
    assert isinstance(caught.value, ValueError)


def test_a_token_for_another_flow_names_both_flows() -> None:
    token = encode_state_token(FLOWS["_oa"], FlowState(flow="_oa", step="choice", service="s"))
    with pytest.raises(StateTokenFlowError) as caught:
        decode_state_token(token, FLOWS["_oidc"])
    assert caught.value.details == {"flow_id": "_oa", "expected": "_oidc"}
    assert token_flow_id(token) == "_oa"


@pytest.mark.parametrize(
    ("token", "reason"),
    [
        ("", "not JSON"),
        ("bnVsbA", "the JSON is a null, not an object"),  # null
        ("eyJmIjoxfQ", "`f` must be a string"),  # {"f":1}
        ("eyJmIjoiX29hOjAiLCJtIjo1fQ", "`m` must be a string, not number"),  # {"f":"_oa:0","m":5}
    ],
)
def test_malformed_tokens_say_what_is_wrong(token: str, reason: str) -> None:
    with pytest.raises(StateTokenFormatError) as caught:
        decode_state_token(token, provider)
    assert reason in caught.value.message


def test_encoding_a_state_whose_step_is_not_in_the_definition_is_refused() -> None:
    with pytest.raises(InvalidStepError):
        encode_state_token(FLOWS["_oa"], FlowState(flow="_oa", step="nowhere"))
    with pytest.raises(InvalidStepError):
        encode_state_token(FLOWS["_oa"], FlowState(flow="_oa", step="new", previous="nowhere"))


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (1.5, "1.5"),
        (1e21, "1e+21"),
        (1e16, "10000000000000000"),
        (1e-7, "1e-7"),
        (0.000001, "0.000001"),
        (-0.0, "0"),
        (123456789.125, "123456789.125"),
        (2.5e-10, "2.5e-10"),
        (sys.float_info.max, "1.7976931348623157e+308"),
    ],
)
def test_numbers_are_written_as_javascript_writes_them(value: float, text: str) -> None:
    assert _js_number(value) == text


def test_the_token_module_imports_no_infrastructure() -> None:
    import subprocess

    code = (
        "import sys, flowstore.tokens; "
        "print(sorted(m for m in ('eventsourcing', 'sqlalchemy', 'cryptography') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
