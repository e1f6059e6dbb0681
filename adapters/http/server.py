"""Running the API with uvicorn: what `flowstore serve` does."""

from __future__ import annotations

import logging
import re
import signal
import threading
from urllib.parse import unquote_plus

import uvicorn

from flowstore import FlowStore
from flowstore.adapters.http.app import DEFAULT_MAX_BODY_BYTES, create_app
from flowstore.adapters.http.auth import JwtVerifier, TokenVerifier

__all__ = ["serve"]

# Any query parameter: its name is compared after percent-decoding (`?%74oken=` is `?token=` to
# the server, so it must be to the filter too).
_QUERY_PARAMETER = re.compile(r"([?&])([^=&\s\"#]+)=([^&\s\"#]*)")


class _RedactTokens(logging.Filter):
    """Keeps WebSocket tokens passed as `?token=` out of the server's logs."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(_redact(a) if isinstance(a, str) else a for a in record.args)
        record.msg = _redact(str(record.msg))
        return True


def _redact(text: str) -> str:
    return _QUERY_PARAMETER.sub(_redact_token, text)


def _redact_token(match: re.Match[str]) -> str:
    name = unquote_plus(match.group(2))
    if name.strip().lower() != "token":
        return match.group(0)
    return f"{match.group(1)}{match.group(2)}=[redacted]"


def serve(
    store: FlowStore,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    verifier: TokenVerifier | None = None,
    log_level: str = "info",
) -> None:
    """Serve the API on host:port until SIGINT/SIGTERM (tokens from `JwtVerifier.from_env()`)."""
    app = create_app(store, verifier or JwtVerifier.from_env())
    # WebSocket messages are held to the same cap as request bodies (uvicorn's default is 16 MiB).
    config = uvicorn.Config(
        app, host=host, port=port, log_level=log_level, ws_max_size=DEFAULT_MAX_BODY_BYTES
    )
    redact = _RedactTokens()
    for name in ("uvicorn.access", "uvicorn.error"):
        logging.getLogger(name).addFilter(redact)
    server = uvicorn.Server(config)
    if threading.current_thread() is not threading.main_thread():
        server.run()
        return
    # uvicorn shuts down gracefully on SIGTERM, then raises the signal again for the previous
    # handler; the default one would end the process before the store is closed. This one lets
    # `serve` return (and asks the server to stop, should SIGTERM come before uvicorn listens).
    previous = signal.signal(signal.SIGTERM, lambda *_: setattr(server, "should_exit", True))
    try:
        server.run()
    finally:
        signal.signal(signal.SIGTERM, previous)
