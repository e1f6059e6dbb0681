"""What every endpoint depends on: the authenticated caller, the admin role, bodies without NUL."""

from __future__ import annotations

import json
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from flowstore.adapters.http.auth import (
    ADMIN_ROLE,
    AuthenticationError,
    PermissionDeniedError,
    Principal,
)
from flowstore.adapters.http.problems import RequestInvalidError
from flowstore.adapters.http.routing import FlowRoute
from flowstore.adapters.http.schemas import nul_errors

__all__ = ["Caller", "caller", "no_nul", "require_admin"]

_bearer = HTTPBearer(auto_error=False, description="A JWT: `sub` = user id, `roles` may hold admin")


def caller(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    """The authenticated caller, by the app's verifier (401 UNAUTHENTICATED otherwise)."""
    if credentials is None:
        raise AuthenticationError("A bearer token is required", reason="missing")
    # The route knows its router's verifier; `request.app` may be an application of the user's.
    route = request.scope.get("route")
    if not isinstance(route, FlowRoute):
        raise RuntimeError("flowstore endpoints are served by a FlowRouter (create_router)")
    return route.verifier.verify(credentials.credentials)


Caller = Annotated[Principal, Depends(caller)]


async def no_nul(request: Request, principal: Caller) -> None:
    """Refuses JSON bodies with a NUL character in any string (see `nul_errors`); after auth."""
    body = await request.body()
    if b"\\u0000" not in body:  # JSON can carry NUL only as this escape
        return
    try:
        data = json.loads(body)
    except ValueError:
        return  # not JSON: the body's own validation says so
    errors = nul_errors(data)
    if errors:
        raise RequestInvalidError(errors)


def require_admin(principal: Caller) -> Principal:
    """The caller, if they hold the admin role (403 FORBIDDEN otherwise)."""
    if not principal.is_admin:
        raise PermissionDeniedError(ADMIN_ROLE)
    return principal
