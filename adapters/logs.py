"""Logging for the long-running commands (`serve`, `worker`, `projections run`, `publish`).

`--log-level` sets the root level; `--log-format json` writes one JSON object per line (time,
level, logger, message, and the exception when there is one), for log collectors.
"""

from __future__ import annotations

import contextvars
import logging
import sys
from datetime import UTC, datetime

__all__ = ["LOG_FORMATS", "LOG_LEVELS", "JsonFormatter", "configure_logging", "request_id"]

LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")


class JsonFormatter(logging.Formatter):
    """One JSON object per record."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as a JSON line."""
        data = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "process": record.process,
        }
        request_id = getattr(record, "request_id", None)
        if request_id:
            data["request_id"] = request_id
        if record.exc_info:
            data["exception"] = self.formatException(record.exc_info)
        import orjson  # here: the CLI imports this module, and only the standard library, at start

        return orjson.dumps(data).decode()


request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "flowstore_request_id", default=None
)
"""The id of the HTTP request being served in this context (set by adapters/http/observe.py)."""


class _RequestId(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        rid = getattr(record, "request_id", None) or request_id.get()
        record.request_id = rid
        record.request_tag = f" [{rid}]" if rid else ""
        return True


def configure_logging(level: str = "info", fmt: str = "text") -> None:
    """Send every logger's records at `level` and above to stderr, as text or JSON lines."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonFormatter()
        if fmt == "json"
        else logging.Formatter("%(asctime)s %(levelname)s %(name)s%(request_tag)s: %(message)s")
    )
    # Records made while an HTTP request is served carry its id (adapters/http/observe.py).
    handler.addFilter(_RequestId())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
