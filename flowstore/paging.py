"""Checking the arguments of the store's paged and filtered queries, and their cursors.

A history cursor is a history row's `id` (`<instance id>:<event version>`): stable, because rows are
only ever appended after it. An instance cursor is the last user id of a page, base64url-encoded
(opaque to callers, safe in a URL). Every bad argument is an `InvalidArgumentError`.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable
from datetime import datetime, timedelta
from uuid import UUID

from flowstore.errors import InvalidArgumentError
from flowstore.models import FlowStatus, HistoryKind

__all__ = [
    "MAX_PAGE",
    "check_aware",
    "check_kinds",
    "check_limit",
    "check_listed_status",
    "decode_instance_cursor",
    "encode_instance_cursor",
    "history_bound",
    "idle_seconds",
]

MAX_PAGE = 1000
"""Most instances one `list_instances` page holds (and the HTTP API's cap on a history page)."""


def check_limit(limit: object, *, maximum: int | None = None) -> int | None:
    """`limit` if it is None or a positive integer (at most `maximum`)."""
    if limit is None:
        return None
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise InvalidArgumentError("limit", limit, "must be a positive integer")
    if maximum is not None and limit > maximum:
        raise InvalidArgumentError("limit", limit, f"must be at most {maximum}")
    return limit


def check_aware(value: object, name: str) -> datetime | None:
    """`value` if it is None or a datetime with a time zone (naive times are ambiguous)."""
    if value is None:
        return None
    if not isinstance(value, datetime):
        raise InvalidArgumentError(name, value, "must be a datetime")
    if value.tzinfo is None or value.utcoffset() is None:
        raise InvalidArgumentError(name, value, "must carry a time zone (e.g. datetime.UTC)")
    return value


def history_bound(value: object, name: str, instance: UUID) -> tuple[int | None, datetime | None]:
    """`after`/`before` of a history query: a cursor (a row id of this instance) or a time."""
    if value is None:
        return None, None
    if isinstance(value, datetime):
        return None, check_aware(value, name)
    if isinstance(value, str):
        prefix, colon, version = value.rpartition(":")
        if colon and prefix == str(instance) and version.isdigit() and version.isascii():
            return int(version), None
        raise InvalidArgumentError(
            name, value, "must be the id of one of this history's rows, or a datetime"
        )
    raise InvalidArgumentError(name, value, "must be a history row id (str) or a datetime")


def check_kinds(kinds: Iterable[str] | str | None) -> list[str] | None:
    """The history kinds asked for, each one a `HistoryKind`."""
    if kinds is None:
        return None
    if isinstance(kinds, str):
        kinds = [kinds]
    try:
        return sorted({HistoryKind(kind).value for kind in kinds})
    except (ValueError, TypeError):
        known = [kind.value for kind in HistoryKind]
        raise InvalidArgumentError("kinds", kinds, f"must be among {known}") from None


def check_listed_status(status: object, *, default: FlowStatus | None) -> FlowStatus | None:
    """A status whose instances have a step (active or completed), or the default."""
    if status is None:
        return default
    try:
        found = FlowStatus(status) if isinstance(status, str) else None
    except ValueError:
        found = None
    if found not in (FlowStatus.ACTIVE, FlowStatus.COMPLETED):
        raise InvalidArgumentError("status", status, "must be 'active' or 'completed'")
    return found


def idle_seconds(idle_for: object) -> float | None:
    """`idle_for` (a timedelta or seconds) in seconds; None when not given."""
    if idle_for is None:
        return None
    if isinstance(idle_for, timedelta):
        seconds = idle_for.total_seconds()
    elif isinstance(idle_for, int | float) and not isinstance(idle_for, bool):
        seconds = float(idle_for)
    else:
        raise InvalidArgumentError("idle_for", idle_for, "must be a timedelta or seconds")
    if not seconds >= 0 or seconds == float("inf"):  # also refuses NaN
        raise InvalidArgumentError("idle_for", idle_for, "must be a finite, non-negative duration")
    return seconds


def encode_instance_cursor(user_id: str) -> str:
    """The cursor of the page after the one ending at `user_id`."""
    return base64.urlsafe_b64encode(user_id.encode()).decode().rstrip("=")


def decode_instance_cursor(cursor: object) -> str | None:
    """The user id a `list_instances` cursor stands for (None: the first page)."""
    if cursor is None:
        return None
    if not isinstance(cursor, str) or not cursor:
        raise InvalidArgumentError("cursor", cursor, "must be a cursor from an earlier page")
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        user_id = base64.b64decode(padded, altchars=b"-_", validate=True).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        user_id = ""
    if not user_id:
        raise InvalidArgumentError("cursor", cursor, "must be a cursor from an earlier page")
    return user_id
