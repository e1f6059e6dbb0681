"""The console's operations page and the JSON endpoints its script polls (jobs, positions)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, Request
from starlette.responses import JSONResponse, RedirectResponse, Response

from flowstore import FlowNotFoundError
from flowstore.adapters.http.console.common import (
    SECURITY_HEADERS,
    ApiAdmin,
    Console,
    PageAdmin,
    api_admin,
    console_of,
    page_admin,
    read_form,
    seg,
    wants_json,
)
from flowstore.adapters.http.console.jobs import ACTIONS
from flowstore.adapters.http.console.session import CSRF_FIELD

__all__ = ["add_operation_pages"]


def add_operation_pages(router: APIRouter) -> None:
    """Add the operations page and its JSON endpoints (jobs, positions) to `router`."""

    @router.get("/operations")
    def operations(
        request: Request,
        principal: PageAdmin,
        job: Annotated[str | None, Query()] = None,
    ) -> Response:
        console = console_of(request)
        return console.render(
            request,
            "operations.html",
            principal=principal,
            section="operations",
            positions=console.positions(),
            actions=ACTIONS,
            jobs=console.operations.recent(),
            highlighted=job,
        )

    @router.post("/operations/{action}")
    async def start_operation(request: Request, action: Annotated[str, Path()]) -> Response:
        console, ui = console_of(request), Console.ui(request)
        form = await read_form(request)
        principal = api_admin(request) if wants_json(request) else page_admin(request)
        console.sessions.check_csrf(request, form.get(CSRF_FIELD))
        if action not in ACTIONS:
            raise FlowNotFoundError(action, f"No operation called {action!r}")
        job = console.operations.start(action, principal.user_id)
        location = f"{ui}/api/jobs/{seg(job.id)}"
        if wants_json(request):
            return JSONResponse(job.to_dict(), status_code=202, headers={"Location": location})
        return RedirectResponse(
            f"{ui}/operations?job={seg(job.id)}#job-{seg(job.id)}",
            status_code=303,
            headers=SECURITY_HEADERS,
        )

    @router.get("/api/jobs/{jobId}")
    def job_status(
        request: Request, principal: ApiAdmin, job_id: Annotated[str, Path(alias="jobId")]
    ) -> Response:
        job = console_of(request).operations.get(job_id)
        if job is None:
            raise FlowNotFoundError(job_id, f"No job {job_id!r} (the console keeps the last 20)")
        return JSONResponse(job.to_dict(), headers={"Cache-Control": "no-store"})

    @router.get("/api/positions")
    def positions(request: Request, principal: ApiAdmin) -> Response:
        return JSONResponse(console_of(request).positions(), headers={"Cache-Control": "no-store"})
