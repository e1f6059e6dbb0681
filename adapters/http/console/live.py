"""The console's WebSocket, `/ui/ws?user=ID`: one user's state changes, pushed to an admin's page.

The API's own socket (`/api/flow/ws`) pushes only the token holder's own flows, and the console's
token sits in an HttpOnly cookie its script cannot read. So this socket authenticates by the cookie,
watches the user named in the query, and forwards the same `flow-state-updated` messages from the
same `LogPusher`: changes made by any process on the database, as they reach the log.

Close codes: 4401 without a valid session (or when the token expires), 4403 for a non-admin, 1008
without a user, 1013 for a page that does not keep up; a page from another origin is refused at the
handshake.
"""

from __future__ import annotations

from datetime import UTC, datetime

import anyio
import orjson
from starlette.websockets import WebSocket, WebSocketDisconnect

from flowstore.adapters.http.auth import AuthenticationError
from flowstore.adapters.http.console.session import ConsoleSessions, CsrfError
from flowstore.adapters.http.push import LogPusher, Subscriber
from flowstore.adapters.http.websocket import CLOSE_TOO_SLOW, CLOSE_UNAUTHENTICATED

__all__ = ["CLOSE_FORBIDDEN", "watch"]

CLOSE_FORBIDDEN = 4403
"""Close code of a console socket whose session lacks the admin role."""


async def watch(websocket: WebSocket, sessions: ConsoleSessions, pusher: LogPusher) -> None:
    """Run one console socket until the page leaves, the token expires or the page falls behind."""
    try:
        sessions.check_origin(websocket)
    except CsrfError:
        await websocket.close()  # before accepting: the handshake is refused (HTTP 403)
        return
    await websocket.accept()  # accepted first, so that the close codes below reach the page
    try:
        principal = await anyio.to_thread.run_sync(sessions.principal, websocket)
    except AuthenticationError as err:
        await websocket.close(code=CLOSE_UNAUTHENTICATED, reason=err.message[:120])
        return
    if not principal.is_admin:
        await websocket.close(code=CLOSE_FORBIDDEN, reason="the console needs the admin role")
        return
    user_id = websocket.query_params.get("user", "")
    if not user_id or len(user_id) > 256:
        await websocket.close(code=1008, reason="name a user: ?user=ID")
        return

    session = anyio.CancelScope()
    closing: tuple[int, str] | None = None

    def overflow() -> None:
        nonlocal closing
        closing = (CLOSE_TOO_SLOW, "client too slow")
        session.cancel()

    remaining = float("inf")
    if principal.expires_at is not None:
        remaining = max(0.0, (principal.expires_at - datetime.now(UTC)).total_seconds())
    subscriber = pusher.subscribe(user_id, on_overflow=overflow)
    try:
        await _send(websocket, {"type": "watching", "userId": user_id})
        with session, anyio.move_on_after(remaining) as expiry:
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(_forward, websocket, subscriber, tasks.cancel_scope)
                await _until_gone(websocket)
                tasks.cancel_scope.cancel()
        if expiry.cancelled_caught:
            closing = (CLOSE_UNAUTHENTICATED, "session expired")
        if closing is not None:
            await websocket.close(code=closing[0], reason=closing[1])
    except (WebSocketDisconnect, RuntimeError):
        pass  # the page has gone
    finally:
        pusher.unsubscribe(subscriber)


async def _send(websocket: WebSocket, message: dict[str, object]) -> None:
    await websocket.send_text(orjson.dumps(message).decode())


async def _forward(
    websocket: WebSocket, subscriber: Subscriber, session: anyio.CancelScope
) -> None:
    try:
        async for message in subscriber.messages:
            await _send(websocket, message)
    except Exception:  # the page has gone (the exception depends on the server)
        session.cancel()


async def _until_gone(websocket: WebSocket) -> None:
    # The page sends nothing; reading is how the server learns that it has left.
    while (await websocket.receive())["type"] != "websocket.disconnect":
        pass
