"""The history row each instance event stands for: what `get_flow_history` and the tables show.

Pure (the domain's events and models only), so the projections and anything else reading the log
agree on what a command looked like.
"""

from __future__ import annotations

from typing import Any

from flowstore.domain import (
    DomainEvent,
    FlowCleared,
    FlowCompleted,
    FlowExpired,
    FlowHandedOver,
    FlowMigrated,
    FlowStarted,
    FlowWentBack,
    InstanceEvent,
    StateOverridden,
    TransitionExecuted,
    TransitionRejected,
)
from flowstore.models import FlowStateHistory, HistoryKind

__all__ = ["history_entry"]


def history_entry(event: DomainEvent) -> FlowStateHistory | None:
    """The history row an instance event stands for (None for events that are not commands)."""
    if not isinstance(event, InstanceEvent) or isinstance(event, FlowCompleted):
        return None
    common: dict[str, Any] = {
        "id": f"{event.originator_id}:{event.originator_version}",
        "user_id": event.user_id,
        "flow_id": event.flow_id,
        "timestamp": event.timestamp,
        "metadata": {"definition_version": event.definition_version},
    }
    match event:
        case FlowStarted():
            kind = HistoryKind.START if event.reason == "start" else HistoryKind.RESET
            return FlowStateHistory(
                **common,
                kind=kind,
                from_step=event.from_step,
                to_step=event.step,
                transition=None,
                success=True,
            )
        case TransitionExecuted():
            common["metadata"] |= {"elapsed_ms": event.elapsed_ms, "service": event.service}
            if event.previous is not None:
                common["metadata"]["previous"] = event.previous
            return FlowStateHistory(
                **common,
                kind=HistoryKind.TRANSITION,
                from_step=event.from_step,
                to_step=event.to_step,
                transition=event.transition,
                payload=event.payload,
                success=True,
                ok=event.ok,
                message=event.message,
            )
        case TransitionRejected():
            common["metadata"] |= {"elapsed_ms": event.elapsed_ms, "error_code": event.error_code}
            return FlowStateHistory(
                **common,
                kind=HistoryKind.TRANSITION,
                from_step=event.from_step,
                to_step=event.from_step,  # rejected: the user stays where they were
                transition=event.transition,
                payload=event.payload,
                success=False,
                error=event.error,
            )
        case StateOverridden():
            common["metadata"] |= {"service": event.service, "ok": event.ok}
            return FlowStateHistory(
                **common,
                kind=HistoryKind.OVERRIDE,
                from_step=event.from_step,
                to_step=event.step,
                transition=None,
                payload=event.payload,
                success=True,
                ok=event.ok,
                message=event.message,
            )
        case FlowWentBack():
            common["metadata"] |= {"service": event.service}
            return FlowStateHistory(
                **common,
                kind=HistoryKind.BACK,
                from_step=event.from_step,
                to_step=event.step,
                transition=None,
                success=True,
                ok=True,
            )
        case FlowHandedOver():
            common["metadata"] |= {"service": event.service, "sender": event.sender}
            if event.previous is not None:
                common["metadata"]["previous"] = event.previous
            return FlowStateHistory(
                **common,
                kind=HistoryKind.HANDOFF,
                from_step=event.from_step,
                to_step=event.step,
                transition=None,
                payload=event.payload,
                success=True,
                ok=event.ok,
                message=event.message,
            )
        case FlowMigrated():
            common["metadata"] |= {"from_version": event.from_version, "service": event.service}
            return FlowStateHistory(
                **common,
                kind=HistoryKind.MIGRATION,
                from_step=event.from_step,
                to_step=event.to_step,
                transition=None,
                success=True,
            )
        case FlowCleared() | FlowExpired():
            return FlowStateHistory(
                **common,
                kind=HistoryKind.CLEAR if isinstance(event, FlowCleared) else HistoryKind.EXPIRY,
                from_step=event.from_step,
                to_step=None,
                transition=None,
                success=True,
            )
    return None
