"""The console's flow pages: the list of flows, a flow's diagram, its funnel, activity and stuck users."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request
from starlette.responses import Response

from flowstore.adapters.http.console.common import (
    FlowId,
    PageAdmin,
    choice,
    console_of,
)
from flowstore.adapters.http.console.insights import (
    ACTIVITY_WINDOWS,
    IDLE_CHOICES,
    activity,
)
from flowstore.adapters.http.console.render import (
    activity_charts,
    flow_diagram,
    legend,
    stuck_report,
)
from flowstore.adapters.http.console.windows import WINDOWS, flow_summary
from flowstore.adapters.http.problems import RequestInvalidError

__all__ = ["add_flow_pages"]


def add_flow_pages(router: APIRouter) -> None:
    """Add the pages under `/ui/flows` to `router`."""

    @router.get("/flows")
    def flows(request: Request, principal: PageAdmin) -> Response:
        console = console_of(request)
        rows = []
        for definition in console.store.list_flows():
            stats = console.store.get_flow_statistics(definition.flow)
            rows.append({"definition": definition, "stats": stats})
        return console.render(
            request, "flows.html", principal=principal, section="flows", rows=rows
        )

    @router.get("/flows/{flowId}")
    def flow(
        request: Request,
        principal: PageAdmin,
        flow_id: FlowId,
        version: Annotated[int | None, Query(ge=1)] = None,
    ) -> Response:
        console = console_of(request)
        latest = console.store.get_flow(flow_id)
        definition = console.store.get_flow(flow_id, version)
        funnel = console.store.get_flow_funnel(flow_id)
        current = {step.step: step.current for step in funnel}
        most = max(current.values(), default=0)
        diagram = flow_diagram(console.store, flow_id, version, current)
        steps = sorted(definition.steps.values(), key=lambda step: (step.index, step.step))
        return console.render(
            request,
            "flow.html",
            principal=principal,
            section="flows",
            definition=definition,
            latest=latest,
            diagram=diagram,
            steps=steps,
            current=current,
            most=most,
            legend=legend(most),
            stats=console.store.get_flow_statistics(flow_id),
        )

    @router.get("/flows/{flowId}/funnel")
    def funnel(
        request: Request,
        principal: PageAdmin,
        flow_id: FlowId,
        window: Annotated[str, Query()] = "all",
    ) -> Response:
        console = console_of(request)
        chosen = next((w for w in WINDOWS if w.key == window), None)
        if chosen is None:
            keys = ", ".join(w.key for w in WINDOWS)
            error = {"loc": ["query", "window"], "msg": f"must be one of {keys}", "type": "enum"}
            raise RequestInvalidError([error])
        definition = console.store.get_flow(flow_id)
        summary = flow_summary(console.store, console.windows, flow_id, chosen)
        scale = max((s.entered for s in summary.steps), default=0)
        return console.render(
            request,
            "funnel.html",
            principal=principal,
            section="flows",
            definition=definition,
            summary=summary,
            scale=scale,
        )

    @router.get("/flows/{flowId}/activity")
    def activity_page(
        request: Request,
        principal: PageAdmin,
        flow_id: FlowId,
        window: Annotated[str, Query()] = ACTIVITY_WINDOWS[0].key,
    ) -> Response:
        console = console_of(request)
        chosen = choice(ACTIVITY_WINDOWS, window, "window")
        definition = console.store.get_flow(flow_id)
        figures = activity(console.store, flow_id, chosen)
        return console.render(
            request,
            "activity.html",
            principal=principal,
            section="flows",
            definition=definition,
            activity=figures,
            charts=activity_charts(figures),
        )

    @router.get("/flows/{flowId}/stuck")
    def stuck_page(
        request: Request,
        principal: PageAdmin,
        flow_id: FlowId,
        idle: Annotated[str, Query()] = "1h",
        step: Annotated[str | None, Query(max_length=256)] = None,
        cursor: Annotated[str | None, Query(max_length=1024)] = None,
    ) -> Response:
        console = console_of(request)
        chosen = choice(IDLE_CHOICES, idle, "idle")
        report = stuck_report(console.store, flow_id, chosen, step=step, cursor=cursor)
        return console.render(
            request, "stuck.html", principal=principal, section="flows", report=report
        )
