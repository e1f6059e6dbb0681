"""Request and response bodies of the HTTP API that are not flowstore models (camelCase on the wire).

Responses that are flowstore models (`FlowState`, `FlowStateHistory`, `FlowStatistics`, `FunnelStep`,
`FlowDefinition`) are declared as those models, so the OpenAPI document describes what is sent.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from flowstore.inputs import MAX_JSON_DEPTH

__all__ = [
    "ErasureResult",
    "HandoffRequest",
    "Health",
    "PurgeResult",
    "Readiness",
    "ResetRequest",
    "StateOverride",
    "StateToken",
    "TransitionMessage",
    "TransitionRequest",
    "nul_errors",
]


class _Camel(BaseModel):
    # Unknown keys are refused: a misspelt "paylod" must not silently run a transition without one.
    # Strict: "false" is not a boolean and "2" not a version, as the published JSON Schema says.
    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", strict=True
    )


class TransitionRequest(_Camel):
    """Body of `POST /api/flow/{flowId}/transition/{transition}`."""

    model_config = ConfigDict(json_schema_extra={"examples": [{"payload": {"name": "Ada"}}]})

    payload: dict[str, Any] | None = Field(
        default=None,
        description="JSON object merged into the state's payload (checked by its schema).",
    )
    ok: bool = Field(
        default=True,
        description="False: the step was reached but its work failed (the model's transit(ok)).",
    )
    message: str | None = Field(
        default=None, description="Recorded on the state and in the history; cleared by the next."
    )


class NextRequest(_Camel):
    """Body of `POST /api/flow/{flowId}/next`."""

    payload: dict[str, Any] | None = Field(
        default=None, description="JSON object merged into the state's payload."
    )


class StateToken(_Camel):
    """The caller's state as an OwlMeans state token (`GET /api/flow/{flowId}/token`)."""

    token: str = Field(description="base64url JSON, as @owlmeans/flow's serializeState writes it")


class HandoffRequest(_Camel):
    """Body of `POST /api/flow/{flowId}/handoff`: a state token another service handed over."""

    model_config = ConfigDict(
        json_schema_extra={"examples": [{"token": "eyJmIjoiX29hOjAiLCJzIjoiIiwibyI6MX0"}]}
    )

    token: str = Field(min_length=1, max_length=65536)
    sender: str | None = Field(
        default=None, min_length=1, max_length=256, description="The service that sent it."
    )


class ResetRequest(_Camel):
    """Body of `POST /api/flow/{flowId}/reset`."""

    model_config = ConfigDict(json_schema_extra={"examples": [{"step": "profile-setup"}]})

    step: str | None = Field(
        default=None,
        min_length=1,
        max_length=256,
        description="Where to restart (default: the initial step; only `initial` steps if marked).",
    )
    service: str | None = Field(
        default=None, min_length=1, max_length=256, description="The run's target service."
    )
    entity_id: str | None = Field(
        default=None, max_length=256, description="The entity the run is about."
    )


class StateOverride(_Camel):
    """Body of `PUT /api/admin/users/{userId}/flows/{flowId}/state`: where to put the user."""

    model_config = ConfigDict(
        json_schema_extra={"examples": [{"step": "verification", "ok": True, "payload": {}}]}
    )

    step: str = Field(min_length=1, max_length=256)
    service: str | None = None
    ok: bool = True
    payload: dict[str, Any] | None = None
    definition_version: int | None = Field(default=None, ge=1)
    previous: str | None = Field(default=None, min_length=1, max_length=256)
    entity_id: str | None = Field(default=None, max_length=256)
    message: str | None = None


class PurgeResult(_Camel):
    """How many instances `POST /api/admin/purge-expired` expired."""

    purged: int


class ErasureResult(_Camel):
    """What `DELETE /api/admin/users/{userId}` erased."""

    user_id: str
    erased_instances: int


class Health(_Camel):
    """The process answers."""

    status: Literal["ok"] = "ok"


class Readiness(_Camel):
    """The database answers (nothing else: the probe is unauthenticated, so it tells no log position)."""

    status: Literal["ready"] = "ready"


class TransitionMessage(_Camel):
    """WebSocket message asking for a transition; answered by `flow-transition-result` or `flow-error`."""

    type: Literal["flow-transition"]
    flow_id: str = Field(min_length=1, max_length=256)
    transition: str = Field(min_length=1, max_length=256)
    payload: dict[str, Any] | None = None
    ok: bool = True
    message: str | None = None
    request_id: str | int | None = Field(
        default=None, description="Echoed in the answer, to match answers to requests."
    )


def nul_errors(value: Any, loc: tuple[str | int, ...] = ("body",)) -> list[dict[str, Any]]:
    """Validation errors for every NUL character in the strings (and keys) of a parsed JSON value.

    PostgreSQL text and JSON columns cannot hold NUL: the store would append such an event to its
    log and then fail to project it. JSON can carry it (as \\u0000), so requests are checked here.
    A value nested deeper than the store accepts is one error too (walked without recursion: a
    message nested 1,000 deep must not end in a RecursionError).
    """
    errors: list[dict[str, Any]] = []
    stack: list[tuple[Any, tuple[str | int, ...]]] = [(value, loc)]
    while stack:
        item, where = stack.pop()
        if len(where) - len(loc) > _MAX_REQUEST_DEPTH:
            return [
                {
                    "loc": list(loc),
                    "msg": f"must not be nested more than {MAX_JSON_DEPTH} levels deep",
                    "type": "too_deep",
                }
            ]
        if isinstance(item, str):
            if "\x00" in item:
                errors.append({"loc": list(where), "msg": _NUL, "type": "string_nul"})
        elif isinstance(item, dict):
            for key, child in reversed(item.items()):
                if isinstance(key, str) and "\x00" in key:
                    errors.append({"loc": [*where, key], "msg": _NUL, "type": "string_nul"})
                stack.append((child, (*where, key)))
        elif isinstance(item, list):
            stack.extend((child, (*where, i)) for i, child in reversed(list(enumerate(item))))
    return errors


_NUL = "must not contain NUL characters"
# A message wraps the payload in a few levels of its own (body, payload): room for them.
_MAX_REQUEST_DEPTH = MAX_JSON_DEPTH + 4
