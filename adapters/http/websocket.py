"""The WebSocket session at `/api/flow/ws`: authenticate, then push state changes and run transitions.

Protocol (JSON text frames):

- Authenticate with the `token` query parameter, or with a first message
  `{"type": "authenticate", "token": "..."}`. The server answers `{"type": "authenticated", "userId",
  "roles"}`; a bad, missing or expired token gets a `flow-error` and close code 4401.
- The server pushes `{"type": "flow-state-updated", "flowId", "position", "state"}` whenever one of
  the caller's flows changes (`state` is null once cleared or expired), whoever changed it.
- `{"type": "flow-transition", "flowId", "transition", "payload", "ok", "message", "requestId"}`
  (`ok` and `message` optional) is answered with
  `{"type": "flow-transition-result", "requestId", "state"}` or `{"type": "flow-error", "requestId",
  "code", "error", "problem"}`, where `error` is the message (as the seed sends it) and `problem`
  the same problem details REST returns.
- The session is closed with 4401 when the token expires, and with 1013 if the client reads too
  slowly to keep up with its pushes.
"""

from __future__ import annotations

import functools
import logging
from datetime import UTC, datetime
from typing import Any

import anyio
import orjson
from pydantic import ValidationError
from starlette.websockets import WebSocket, WebSocketDisconnect

from flowstore import FlowError, FlowStore
from flowstore.adapters.http.auth import AuthenticationError, Principal, TokenVerifier
from flowstore.adapters.http.problems import RequestInvalidError, problem, problem_for
from flowstore.adapters.http.push import LogPusher, Subscriber
from flowstore.adapters.http.schemas import TransitionMessage, nul_errors

__all__ = ["CLOSE_TOO_SLOW", "CLOSE_UNAUTHENTICATED", "FlowSocket"]

log = logging.getLogger(__name__)

CLOSE_UNAUTHENTICATED = 4401
"""Close code for a missing, invalid or expired token (4000-4999: application codes; 401 as in HTTP)."""
CLOSE_TOO_SLOW = 1013
"""Close code (RFC 6455 "try again later") for a client that does not read its pushes."""


def _error(error: FlowError | dict[str, Any], request_id: Any = None) -> dict[str, Any]:
    details = problem_for(error) if isinstance(error, FlowError) else error
    return {
        "type": "flow-error",
        "requestId": request_id,
        "code": details["code"],
        # The seed's clients read `error` (the message, `{ error: error.message }`).
        "error": details["detail"],
        "problem": details,
    }


def _validation_errors(exc: ValidationError) -> list[dict[str, Any]]:
    return [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in exc.errors()]


class FlowSocket:
    """Runs WebSocket sessions against one store, verifier and pusher."""

    def __init__(
        self,
        store: FlowStore,
        verifier: TokenVerifier,
        pusher: LogPusher,
        *,
        auth_timeout: float = 10.0,
    ) -> None:
        self._store = store
        self._verifier = verifier
        self._pusher = pusher
        self._auth_timeout = auth_timeout

    async def serve(self, websocket: WebSocket) -> None:
        """Run one session until the client leaves, the token expires or the client falls behind."""
        await websocket.accept()
        try:
            principal = await self._authenticate(websocket)
        except AuthenticationError as err:
            await self._refuse(websocket, err)
            return
        except WebSocketDisconnect:
            return
        session = anyio.CancelScope()
        close_code: int | None = None

        def overflow() -> None:
            nonlocal close_code
            close_code = CLOSE_TOO_SLOW
            session.cancel()

        subscriber = self._pusher.subscribe(principal.user_id, on_overflow=overflow)
        try:
            await self._send(
                websocket,
                {
                    "type": "authenticated",
                    "userId": principal.user_id,
                    "roles": sorted(principal.roles),
                },
            )
            with session, anyio.move_on_after(self._remaining(principal)) as expiry:
                async with anyio.create_task_group() as tasks:
                    tasks.start_soon(self._write, websocket, subscriber, tasks.cancel_scope)
                    await self._read(websocket, principal, subscriber)
                    tasks.cancel_scope.cancel()  # the client has left
            if expiry.cancelled_caught:
                await self._refuse(
                    websocket, AuthenticationError("Token has expired", reason="expired")
                )
            elif close_code is not None:
                await websocket.close(code=close_code, reason="client too slow")
        except WebSocketDisconnect:
            pass
        finally:
            self._pusher.unsubscribe(subscriber)

    async def _authenticate(self, websocket: WebSocket) -> Principal:
        token = websocket.query_params.get("token")
        if token is None:
            with anyio.move_on_after(self._auth_timeout):
                message = await self._receive(websocket)
                if isinstance(message, dict) and message.get("type") == "authenticate":
                    token = message.get("token")
                if not isinstance(token, str):
                    raise AuthenticationError(
                        'Expected {"type": "authenticate", "token": "..."} first', reason="missing"
                    )
        if token is None:
            raise AuthenticationError(
                "No token within the authentication timeout", reason="missing"
            )
        return await anyio.to_thread.run_sync(self._verifier.verify, token)

    @staticmethod
    def _remaining(principal: Principal) -> float:
        if principal.expires_at is None:
            return float("inf")
        return max(0.0, (principal.expires_at - datetime.now(UTC)).total_seconds())

    async def _read(
        self, websocket: WebSocket, principal: Principal, subscriber: Subscriber
    ) -> None:
        # Requests are handled one at a time, so a client's answers come in the order it asked.
        try:
            while True:
                message = await self._receive(websocket)
                await subscriber.put(await self._answer(principal, message))
        except WebSocketDisconnect:
            return

    async def _answer(self, principal: Principal, message: Any) -> dict[str, Any]:
        request_id = message.get("requestId") if isinstance(message, dict) else None
        if not isinstance(request_id, str | int) or isinstance(request_id, bool):
            request_id = None
        if message is None:
            errors = [{"loc": ["message"], "msg": "not a JSON text frame", "type": "json_invalid"}]
            return _error(RequestInvalidError(errors))
        try:
            request = TransitionMessage.model_validate(message)
            if errors := nul_errors(message, ()):
                raise RequestInvalidError(errors)
            state = await anyio.to_thread.run_sync(
                functools.partial(
                    self._store.execute_transition,
                    principal.user_id,
                    request.flow_id,
                    request.transition,
                    request.payload,
                    ok=request.ok,
                    message=request.message,
                )
            )
        except ValidationError as exc:
            return _error(RequestInvalidError(_validation_errors(exc)), request_id)
        except FlowError as err:
            return _error(err, request_id)
        except Exception:
            log.exception("WebSocket flow-transition failed")
            return _error(problem(500, "INTERNAL_ERROR", "Internal server error"), request_id)
        return {"type": "flow-transition-result", "requestId": request_id, "state": state.to_dict()}

    @staticmethod
    async def _receive(websocket: WebSocket) -> Any:
        """The next message decoded from JSON, or None if it is not JSON."""
        message = await websocket.receive()
        if message["type"] == "websocket.disconnect":
            raise WebSocketDisconnect(message.get("code", 1000), message.get("reason"))
        data = message.get("text")
        if data is None:
            data = message.get("bytes") or b""
        try:
            return orjson.loads(data)
        except orjson.JSONDecodeError:
            return None

    async def _write(
        self, websocket: WebSocket, subscriber: Subscriber, session: anyio.CancelScope
    ) -> None:
        try:
            async for message in subscriber.messages:
                await self._send(websocket, message)
        except WebSocketDisconnect:
            session.cancel()  # the client has gone: stop reading too

    @staticmethod
    async def _send(websocket: WebSocket, message: dict[str, Any]) -> None:
        await websocket.send_text(orjson.dumps(message).decode())

    async def _refuse(self, websocket: WebSocket, err: AuthenticationError) -> None:
        try:
            await self._send(websocket, _error(err))
            await websocket.close(code=CLOSE_UNAUTHENTICATED, reason=err.message[:120])
        except (WebSocketDisconnect, RuntimeError):
            pass  # the client has gone already
