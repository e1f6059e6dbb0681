"""The caller's own endpoints: state, transitions, history and hand-over; reading a definition.

Users act on their own flows only: every `/api/flow/...` endpoint takes the user id from the token,
never from the request.
"""

from __future__ import annotations

from typing import Annotated

import orjson
from fastapi import Body, Depends, Query, Request
from fastapi.routing import APIRoute, APIRouter
from starlette.exceptions import HTTPException
from starlette.responses import Response

from flowstore import (
    FlowDefinition,
    FlowState,
    FlowStateHistory,
    FlowTransition,
    HistoryKind,
    StateTokenFlowError,
)
from flowstore.adapters.http.dependencies import Caller, no_nul
from flowstore.adapters.http.params import FlowId, TransitionName, error_responses, link_next
from flowstore.adapters.http.schemas import (
    HandoffRequest,
    NextRequest,
    ResetRequest,
    StateToken,
    TransitionRequest,
)
from flowstore.aio import AsyncFlowStore
from flowstore.paging import MAX_PAGE
from flowstore.tokens import token_flow_id

__all__ = ["MAX_HISTORY_RESPONSE_BYTES", "user_routes"]

MAX_HISTORY_RESPONSE_BYTES = 4 * 1024 * 1024
"""Most payload and error bytes one history response holds (1,500 rows of 60 KB grew the server by
333 MB); the oldest rows that fit are sent, with `X-History-Truncated: true`."""


def _row_bytes(row: FlowStateHistory) -> int:
    # As the store counts it (projections/queries.py): the payload's JSON and the error text.
    return len(orjson.dumps(row.payload)) + len(row.error or "")


def user_routes(astore: AsyncFlowStore, route_class: type[APIRoute]) -> APIRouter:
    """The caller's own endpoints under /api, served by `astore` (any authenticated caller)."""
    users = APIRouter(
        prefix="/api",
        tags=["flow state (the caller's own)"],
        dependencies=[Depends(no_nul)],
        route_class=route_class,
    )

    @users.get(
        "/flow/{flowId}/state",
        response_model=FlowState | None,
        responses=error_responses(401, 404, 422),
    )
    async def get_state(flow_id: FlowId, principal: Caller) -> FlowState | None:
        """The caller's state in the flow, or null when they have none (as the seed's module)."""
        state = await astore.get_flow_state(principal.user_id, flow_id)
        if state is None:
            await astore.get_flow(flow_id)  # an unknown flow is 404 FLOW_NOT_FOUND rather than null
        return state

    @users.post(
        "/flow/{flowId}/transition/{transition}",
        response_model=FlowState,
        responses=error_responses(401, 404, 409, 413, 422),
    )
    async def execute_transition(
        flow_id: FlowId,
        transition: TransitionName,
        principal: Caller,
        body: Annotated[TransitionRequest | None, Body()] = None,
    ) -> FlowState:
        """Take the transition from the caller's current step (starting the flow if needed).

        The payload merges into the state's; `ok: false` with a `message` records that the step was
        reached but its work failed.
        """
        body = body or TransitionRequest()
        return await astore.execute_transition(
            principal.user_id, flow_id, transition, body.payload, ok=body.ok, message=body.message
        )

    @users.get(
        "/flow/{flowId}/transitions",
        response_model=list[FlowTransition],
        response_model_exclude_none=True,
        responses=error_responses(401, 404, 422),
    )
    async def transitions(
        flow_id: FlowId,
        principal: Caller,
        explicit: Annotated[
            bool | None,
            Query(description="true: only those the user chooses; false: only the others"),
        ] = None,
    ) -> list[FlowTransition]:
        """The transitions the caller's current step offers."""
        return await astore.get_available_transitions(principal.user_id, flow_id, explicit=explicit)

    @users.post(
        "/flow/{flowId}/back",
        response_model=FlowState,
        responses=error_responses(401, 404, 409, 422),
    )
    async def back(flow_id: FlowId, principal: Caller) -> FlowState:
        """Return to the previous step (left by a reversible transition); 422 without one."""
        return await astore.go_back(principal.user_id, flow_id)

    @users.post(
        "/flow/{flowId}/next",
        response_model=FlowState,
        responses=error_responses(401, 404, 409, 413, 422),
    )
    async def next_step(
        flow_id: FlowId,
        principal: Caller,
        body: Annotated[NextRequest | None, Body()] = None,
    ) -> FlowState:
        """Take the current step's first transition that is not explicit (the model's next())."""
        return await astore.advance(principal.user_id, flow_id, body.payload if body else None)

    @users.get(
        "/flow/{flowId}/token", response_model=StateToken, responses=error_responses(401, 404, 422)
    )
    async def state_token(flow_id: FlowId, principal: Caller) -> StateToken:
        """The caller's state as an OwlMeans state token, to hand the flow to another service."""
        return StateToken(token=await astore.state_token(principal.user_id, flow_id))

    @users.post(
        "/flow/{flowId}/handoff",
        response_model=FlowState,
        responses=error_responses(401, 404, 409, 413, 422),
    )
    async def handoff(flow_id: FlowId, principal: Caller, body: HandoffRequest) -> FlowState:
        """Take over the caller's flow from a state token another service handed over."""
        named = token_flow_id(body.token)
        if named != flow_id:
            raise StateTokenFlowError(named, flow_id)
        return await astore.adopt_state_token(principal.user_id, body.token, sender=body.sender)

    @users.post(
        "/flow/{flowId}/reset",
        response_model=FlowState,
        responses=error_responses(401, 404, 409, 422),
    )
    async def reset(
        flow_id: FlowId,
        principal: Caller,
        body: Annotated[ResetRequest | None, Body()] = None,
    ) -> FlowState:
        """Start the caller's run again on the latest version, at `step` or the initial step.

        `service` makes it the run's target service; `entityId` names the entity it is about.
        """
        body = body or ResetRequest()
        return await astore.reset_flow(
            principal.user_id, flow_id, body.step, service=body.service, entity_id=body.entity_id
        )

    @users.delete(
        "/flow/{flowId}/state", status_code=204, responses=error_responses(401, 404, 409, 422)
    )
    async def clear_state(flow_id: FlowId, principal: Caller) -> Response:
        """Forget where the caller stands in the flow; the history stays."""
        await astore.clear_flow_state(principal.user_id, flow_id)
        return Response(status_code=204)

    @users.get(
        "/flow/{flowId}/history",
        response_model=list[FlowStateHistory],
        responses=error_responses(401, 404, 422),
    )
    async def history(
        flow_id: FlowId,
        principal: Caller,
        request: Request,
        response: Response,
        limit: Annotated[int, Query(ge=1, le=MAX_PAGE, description="Rows per page")] = MAX_PAGE,
        cursor: Annotated[
            str | None, Query(max_length=200, description="The `next` link's cursor")
        ] = None,
        kind: Annotated[list[HistoryKind] | None, Query(description="Only these kinds")] = None,
    ) -> list[FlowStateHistory]:
        """The commands on the caller's flow, oldest first, a page at a time: at most 1,000 rows
        and `MAX_HISTORY_RESPONSE_BYTES` of payloads (`X-History-Truncated` when that cut the
        page short); a `Link: <...>; rel="next"` header points at the next page while there is one."""
        rows = await astore.get_flow_history(
            principal.user_id,
            flow_id,
            limit=limit + 1,  # one more: is there a next page?
            after=cursor,
            kinds=kind,
            max_bytes=MAX_HISTORY_RESPONSE_BYTES,
        )
        more = len(rows) > limit
        if len(rows) > 1 and sum(_row_bytes(row) for row in rows) > MAX_HISTORY_RESPONSE_BYTES:
            rows.pop()  # the row that crossed the cap: it starts the next page
            response.headers["X-History-Truncated"] = "true"
            more = True
        page = rows[:limit]
        if more and page:
            link_next(request, response, page[-1].id)
        return page

    # Registered before /flows/{flowId} so that "mine" is not taken for a flow id.
    @users.get("/flows/mine", response_model=list[FlowState], responses=error_responses(401))
    async def my_flows(principal: Caller) -> list[FlowState]:
        """Every flow the caller has state in (active or completed)."""
        return await astore.get_user_flows(principal.user_id)

    @users.api_route(
        "/flows/mine", methods=["POST", "PUT", "PATCH", "DELETE"], include_in_schema=False
    )
    async def mine_is_read_only() -> None:
        # A concrete path owns all its methods (OpenAPI's rule): PATCH /api/flows/mine must not
        # fall through to /api/flows/{flowId} and change a flow called "mine".
        raise HTTPException(405)

    # Any caller may read a definition; changing one is administration.
    @users.get(
        "/flows/{flowId}",
        response_model=FlowDefinition,
        response_model_exclude_none=True,
        responses=error_responses(401, 404, 422),
    )
    async def get_flow(
        flow_id: FlowId,
        version: Annotated[int | None, Query(ge=1, description="A past version")] = None,
    ) -> FlowDefinition:
        """A flow's definition: the latest version or `version` (any authenticated caller, as the
        seed's module; changing it needs the admin role)."""
        return await astore.get_flow(flow_id, version)

    return users
