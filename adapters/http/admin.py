"""The administrative endpoints: flow definitions, statistics, instances, overrides and erasure.

Each needs the `admin` role.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Body, Depends, Query, Request
from fastapi.routing import APIRoute, APIRouter
from starlette.responses import Response

from flowstore import FlowDefinition, FlowState, FlowStatistics, FunnelStep
from flowstore.adapters.http.dependencies import no_nul, require_admin
from flowstore.adapters.http.params import (
    ID_RULES,
    DefinitionBody,
    FlowId,
    Since,
    Until,
    UserId,
    error_responses,
    link_next,
    moment,
)
from flowstore.adapters.http.problems import RequestInvalidError
from flowstore.adapters.http.schemas import ErasureResult, PurgeResult, StateOverride
from flowstore.aio import AsyncFlowStore
from flowstore.models import FlowStatus, InstancePage
from flowstore.paging import MAX_PAGE

__all__ = ["admin_routes"]


def admin_routes(astore: AsyncFlowStore, route_class: type[APIRoute]) -> APIRouter:
    """The administrative endpoints under /api, served by `astore` (403 without the admin role)."""
    admins = APIRouter(
        prefix="/api",
        tags=["administration"],
        dependencies=[Depends(require_admin), Depends(no_nul)],
        route_class=route_class,
    )

    @admins.get(
        "/flows",
        response_model=list[FlowDefinition],
        response_model_exclude_none=True,  # definitions in the seed's shape, as POST takes them
        responses=error_responses(401, 403),
    )
    async def list_flows() -> list[FlowDefinition]:
        """The latest version of every flow."""
        return await astore.list_flows()

    @admins.post(
        "/flows",
        status_code=201,
        response_model=FlowDefinition,
        response_model_exclude_none=True,
        responses=error_responses(401, 403, 409, 413, 422),
    )
    async def create_flow(definition: DefinitionBody) -> FlowDefinition:
        """Define a new flow (version 1); 422 DEFINITION_INVALID lists every problem."""
        # `version` is set by the store and ignored on input (so a fetched definition can be posted
        # back), but the spec says it is an integer: hold the request to that.
        version = definition.get("version")
        if version is not None and (not isinstance(version, int) or isinstance(version, bool)):
            error = {"loc": ["body", "version"], "msg": "must be an integer", "type": "int_type"}
            raise RequestInvalidError([error])
        return await astore.get_flow(await astore.create_flow(definition))

    @admins.patch(
        "/flows/{flowId}",
        response_model=FlowDefinition,
        response_model_exclude_none=True,
        responses=error_responses(401, 403, 404, 409, 413, 422),
    )
    async def update_flow(
        flow_id: FlowId,
        changes: Annotated[
            dict[str, Any],
            Body(description="Top-level definition keys; each replaces the old one whole."),
        ],
    ) -> FlowDefinition:
        """Make a new version of the flow."""
        return await astore.update_flow(flow_id, changes)

    @admins.delete(
        "/flows/{flowId}", status_code=204, responses=error_responses(401, 403, 404, 409, 422)
    )
    async def delete_flow(flow_id: FlowId) -> Response:
        """Delete the flow: later transitions and resets on it are FLOW_NOT_FOUND."""
        await astore.delete_flow(flow_id)
        return Response(status_code=204)

    @admins.get(
        "/flows/{flowId}/statistics",
        response_model=FlowStatistics,
        responses=error_responses(401, 403, 404, 422),
    )
    async def flow_statistics(
        flow_id: FlowId, since: Since = None, until: Until = None
    ) -> FlowStatistics:
        """Usage and performance of one flow (over [since, until) when given)."""
        window = {"since": moment(since, "since"), "until": moment(until, "until")}
        return await astore.get_flow_statistics(flow_id, **window)

    @admins.get(
        "/statistics", response_model=FlowStatistics, responses=error_responses(401, 403, 422)
    )
    async def statistics(since: Since = None, until: Until = None) -> FlowStatistics:
        """Usage and performance of all flows (over [since, until) when given)."""
        return await astore.get_flow_statistics(
            since=moment(since, "since"), until=moment(until, "until")
        )

    @admins.get(
        "/flows/{flowId}/instances",
        response_model=InstancePage,
        responses=error_responses(401, 403, 404, 422),
    )
    async def instances(
        flow_id: FlowId,
        request: Request,
        response: Response,
        step: Annotated[
            str | None, Query(description="Only those at this step", **ID_RULES)
        ] = None,
        status: Annotated[FlowStatus, Query(description="active or completed")] = (
            FlowStatus.ACTIVE
        ),
        idle_for: Annotated[
            float | None,
            Query(alias="idleFor", ge=0, le=1e10, description="Untouched for this many seconds"),
        ] = None,
        limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 100,
        cursor: Annotated[str | None, Query(max_length=1400)] = None,
    ) -> InstancePage:
        """The flow's instances by user id, a page at a time ("who is stuck at verification for
        more than a day": `?step=verification&idleFor=86400`)."""
        page = await astore.list_instances(
            flow_id, step=step, status=status, idle_for=idle_for, limit=limit, cursor=cursor
        )
        if page.next_cursor is not None:
            link_next(request, response, page.next_cursor)
        return page

    @admins.get(
        "/flows/{flowId}/funnel",
        response_model=list[FunnelStep],
        responses=error_responses(401, 403, 404, 422),
    )
    async def funnel(flow_id: FlowId, since: Since = None, until: Until = None) -> list[FunnelStep]:
        """Per step: how many entered, moved on, dropped (in [since, until) when given), and are
        there now."""
        window = {"since": moment(since, "since"), "until": moment(until, "until")}
        return await astore.get_flow_funnel(flow_id, **window)

    @admins.post(
        "/admin/purge-expired", response_model=PurgeResult, responses=error_responses(401, 403, 409)
    )
    async def purge_expired() -> PurgeResult:
        """Expire every instance idle past its flow's ttl."""
        return PurgeResult(purged=await astore.purge_expired_flows())

    @admins.put(
        "/admin/users/{userId:path}/flows/{flowId}/state",
        response_model=FlowState,
        responses=error_responses(401, 403, 404, 409, 413, 422),
    )
    async def override_state(user_id: UserId, flow_id: FlowId, body: StateOverride) -> FlowState:
        """Put a user at a step (administrative override, recorded as an event)."""
        state = FlowState(
            flow=flow_id,
            step=body.step,
            service=body.service,
            ok=body.ok,
            payload=body.payload,
            definition_version=body.definition_version,
            previous=body.previous,
            entity_id=body.entity_id,
            message=body.message,
        )
        return await astore.set_flow_state(user_id, state)

    @admins.delete(
        "/admin/users/{userId:flowstore_erasable_user}",
        response_model=ErasureResult,
        responses=error_responses(401, 403, 409, 422),
    )
    async def erase_user(user_id: UserId) -> ErasureResult:
        """Erase the user for good (crypto-shredding): state, history and payloads, every flow."""
        return ErasureResult(user_id=user_id, erased_instances=await astore.erase_user(user_id))

    return admins
