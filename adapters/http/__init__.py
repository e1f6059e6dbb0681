"""The HTTP and WebSocket API (FastAPI): `create_router` for an app of yours, `create_app` to serve it.

Needs the `http` extra (`pip install 'flowstore[http]'`).
"""

from flowstore.adapters.http.app import (
    DEFAULT_MAX_BODY_BYTES,
    FlowRouter,
    create_app,
    create_router,
)
from flowstore.adapters.http.auth import (
    ADMIN_ROLE,
    AuthConfigError,
    AuthenticationError,
    JwtVerifier,
    PermissionDeniedError,
    Principal,
    TokenVerifier,
)
from flowstore.adapters.http.problems import Problem
from flowstore.adapters.http.server import serve

__all__ = [
    "ADMIN_ROLE",
    "DEFAULT_MAX_BODY_BYTES",
    "AuthConfigError",
    "AuthenticationError",
    "FlowRouter",
    "JwtVerifier",
    "PermissionDeniedError",
    "Principal",
    "Problem",
    "TokenVerifier",
    "create_app",
    "create_router",
    "serve",
]
