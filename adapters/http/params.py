"""What the endpoints take (ids in paths, time windows, a definition body) and their error answers."""

from __future__ import annotations

import json
from datetime import datetime
from http import HTTPStatus
from importlib import resources
from typing import Annotated, Any

from fastapi import Body, Path, Query, Request
from pydantic import WithJsonSchema
from starlette.convertors import Convertor, register_url_convertor
from starlette.responses import Response

from flowstore import InvalidArgumentError
from flowstore.adapters.http.problems import Problem

__all__ = [
    "ID_RULES",
    "DefinitionBody",
    "FlowId",
    "Since",
    "TransitionName",
    "Until",
    "UserId",
    "error_responses",
    "link_next",
    "moment",
]


class _ErasableUserConvertor(Convertor[str]):
    """A user id of any characters, slashes included, that does not end like the state route.

    `DELETE /api/admin/users/{userId}` takes the rest of the path as the user id; without this, a
    DELETE sent to `/api/admin/users/ann/flows/f/state` (a route that has no DELETE) would erase a
    user called "ann/flows/f/state" instead of answering 405.
    """

    regex = r"(?!.*/flows/[^/]+/state$).+"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("flowstore_erasable_user", _ErasableUserConvertor())

# Ids in paths: what the store accepts (non-empty, at most 256 characters), without control
# characters, which no real id has and PostgreSQL text columns refuse (NUL).
ID_RULES: dict[str, Any] = {"min_length": 1, "max_length": 256, "pattern": r"^[^\x00-\x1f\x7f]+$"}
"""The constraints on every id an endpoint takes (in a path or a query)."""
FlowId = Annotated[str, Path(alias="flowId", examples=["user-onboarding"], **ID_RULES)]
UserId = Annotated[str, Path(alias="userId", examples=["user-1"], **ID_RULES)]
TransitionName = Annotated[str, Path(alias="transition", examples=["start"], **ID_RULES)]

_ONBOARDING = json.loads(
    resources.files("flowstore").joinpath("data/user-onboarding.json").read_text(encoding="utf-8")
)

# Taken as a plain object so that every problem comes back as one DEFINITION_INVALID (as from the
# library and the CLI); the spec still says what a definition looks like.
DefinitionBody = Annotated[
    dict[str, Any],
    WithJsonSchema({"$ref": "#/components/schemas/FlowDefinition"}),
    Body(
        description="A flow definition in the seed's JSON shape.",
        openapi_examples={"onboarding": {"value": _ONBOARDING}},
    ),
]

# ISO 8601 with a zone, and nothing else: pydantic would also take a number as a Unix time,
# which the spec (format date-time) does not allow.
_MOMENT = r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}(:\d{2}(\.\d{1,6})?)?(Z|[+-]\d{2}:\d{2})$"


def _moment_query(description: str) -> Any:
    """A query parameter holding an ISO 8601 time with a zone."""
    return Query(
        description=description, pattern=_MOMENT, json_schema_extra={"format": "date-time"}
    )


Since = Annotated[str | None, _moment_query("Window start (ISO 8601 with a time zone), inclusive")]
Until = Annotated[str | None, _moment_query("Window end (ISO 8601 with a time zone), exclusive")]


def moment(value: str | None, name: str) -> datetime | None:
    """A `Since`/`Until` parameter as a datetime (the pattern has made sure it is one)."""
    if value is None:
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError:  # right shape, impossible date (2026-02-31)
        raise InvalidArgumentError(name, value, "must be an ISO 8601 time") from None


def link_next(request: Request, response: Response, cursor: str) -> None:
    """Point the `Link` header at the next page: the same request with `cursor` moved on."""
    url = request.url.include_query_params(cursor=cursor)
    response.headers["Link"] = f'<{url.path}?{url.query}>; rel="next"'


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for the problem responses an operation can return."""
    return {
        status: {"model": Problem, "description": HTTPStatus(status).phrase} for status in statuses
    }
