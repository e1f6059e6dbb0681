"""The console's user pages: a user's journeys, one card per flow."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from starlette.responses import Response

from flowstore import FlowStore
from flowstore.adapters.http.console.common import (
    ApiAdmin,
    FlowId,
    PageAdmin,
    UserId,
    console_of,
)

__all__ = ["add_user_pages"]


def add_user_pages(router: APIRouter) -> None:
    """Add the pages under `/ui/users` to `router`."""

    @router.get("/users")
    def users(
        request: Request,
        principal: PageAdmin,
        user: Annotated[str | None, Query(max_length=256)] = None,
    ) -> Response:
        console = console_of(request)
        user = (user or "").strip() or None
        cards = _user_cards(console.store, user) if user else []
        return console.render(
            request,
            "users.html",
            principal=principal,
            section="users",
            user=user,
            cards=cards,
            position=console.store.projection_position(),
        )

    @router.get("/users/{userId:path}/flows/{flowId}")
    def user_flow_card(
        request: Request, principal: ApiAdmin, user_id: UserId, flow_id: FlowId
    ) -> Response:
        console = console_of(request)
        # Read first, so the history below reflects at least this position.
        position = console.store.projection_position()
        card = _card(console.store, user_id, flow_id)
        response = console.render(request, "_flow_card.html", principal=principal, card=card)
        response.headers["X-Projection-Position"] = str(position)
        return response


def _card(store: FlowStore, user_id: str, flow_id: str) -> dict[str, Any]:
    history = store.get_flow_history(user_id, flow_id)
    return {
        "user_id": user_id,
        "flow_id": flow_id,
        "state": store.get_flow_state(user_id, flow_id),
        "history": list(reversed(history)),  # newest first
    }


def _user_cards(store: FlowStore, user_id: str) -> list[dict[str, Any]]:
    """One card per flow the user has state or history in, active ones first."""
    flow_ids = [state.flow for state in store.get_user_flows(user_id)]
    for definition in store.list_flows():
        if definition.flow not in flow_ids and store.get_flow_history(user_id, definition.flow):
            flow_ids.append(definition.flow)
    return [_card(store, user_id, flow_id) for flow_id in flow_ids]
