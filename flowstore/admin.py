"""Administering the log and the tables: quarantining an event the projections cannot read.

The other administrative calls of `FlowStore` (rebuild, migrate, verify, repair, catch up, read
the log, import) are one call each into `flowstore.projections` or `flowstore.importing`, made by
the facade itself.
"""

from __future__ import annotations

import logging
from typing import Any
from uuid import UUID

from flowstore.errors import InvalidArgumentError
from flowstore.opening import Parts

__all__ = ["quarantine_event"]

logger = logging.getLogger(__name__)


def quarantine_event(parts: Parts, position: int, reason: str) -> dict[str, Any]:
    """`FlowStore.quarantine_event`: move an unreadable event aside; return the audit record."""
    if not isinstance(position, int) or isinstance(position, bool) or position < 1:
        raise InvalidArgumentError("position", position, "must be a positive event position")
    if not isinstance(reason, str) or not reason.strip():
        raise InvalidArgumentError("reason", reason, "must say why (it is the audit record)")
    known = {row["position"] for row in parts.projections.unreadable()}
    if position not in known:
        raise InvalidArgumentError(
            "position", position, f"is not an unreadable event (unreadable: {sorted(known)})"
        )
    with parts.log.errors("quarantining an event"):
        record = parts.projections.quarantine(position, reason, parts.clock())
    if record is None:
        raise InvalidArgumentError("position", position, "no such event in this store's log")
    logger.warning(
        "event %s (%s v%s) quarantined: %s",
        position,
        record["originator_id"],
        record["originator_version"],
        reason,
    )
    parts.commands.forget_instance(UUID(record["originator_id"]))
    return {k: v for k, v in record.items() if k != "state"}
