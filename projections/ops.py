"""What each event does to the read-model tables, as plain data: a pure function of events.

`changes(event, previous, attempts)` returns the row operations for one event, given the instance's
current `flow_states` row and the flow's attempt count so far (both read from the tables being
built). The live path, a rebuild and verify all apply these same operations, so they cannot disagree.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from flowstore.domain import (
    DomainEvent,
    FlowCleared,
    FlowCompleted,
    FlowErased,
    FlowExpired,
    FlowHandedOver,
    FlowMigrated,
    FlowStarted,
    FlowWentBack,
    InstanceEvent,
    StateOverridden,
    TransitionExecuted,
    TransitionRejected,
    merge_payload,
)
from flowstore.models import FlowStatus
from flowstore.projections.history import history_entry

__all__ = [
    "ACTIVITY_COLUMNS",
    "SAMPLE_SLOTS",
    "THROUGHPUT_RETENTION_SECONDS",
    "AddActivity",
    "AddCounters",
    "AddHistory",
    "AddStepCounters",
    "AddThroughput",
    "EraseInstance",
    "Op",
    "PutSample",
    "PutState",
    "changes",
]

ACTIVITY_COLUMNS = (
    "started",
    "completed",
    "attempts",
    "rejections",
    "failures",
    "completed_duration_ms",
    "response_ms_total",
    "entered",
    "moved_on",
    "dropped",
)
"""What `flow_activity` counts per flow, minute and step (`flowstore.projections.tables`)."""

SAMPLE_SLOTS = 1000
"""Response-time samples kept per flow (the p95 is over the most recent ones)."""
THROUGHPUT_RETENTION_SECONDS = 3600
"""Per-second attempt counts are kept for the current and the previous hour (of event time)."""


@dataclass(frozen=True)
class PutState:
    """Replace the `flow_states` row of (user_id, flow_id)."""

    row: dict[str, Any]


@dataclass(frozen=True)
class AddHistory:
    """Insert one `flow_history` row."""

    row: dict[str, Any]


@dataclass(frozen=True)
class AddCounters:
    """Add to the counters of one flow."""

    flow_id: str
    deltas: dict[str, float]


@dataclass(frozen=True)
class AddStepCounters:
    """Add to the funnel counters of one step."""

    flow_id: str
    step: str
    deltas: dict[str, int]


@dataclass(frozen=True)
class PutSample:
    """Write a response-time sample into its ring slot."""

    flow_id: str
    slot: int
    elapsed_ms: float
    second: int
    """When the attempt was made (epoch second of event time)."""


@dataclass(frozen=True)
class AddThroughput:
    """Count an attempt in its second; forget seconds older than `forget_before`."""

    flow_id: str
    second: int
    forget_before: int


@dataclass(frozen=True)
class AddActivity:
    """Add to one flow's counts in one minute of event time (step "" for the flow's own counts)."""

    flow_id: str
    minute: int
    step: str
    deltas: dict[str, float]


@dataclass(frozen=True)
class EraseInstance:
    """Delete the `flow_states` row and every `flow_history` row of one instance (by its id).

    By id, not by user id: an instance's events read with the user's id while their key exists and
    with a stand-in once it is shredded, and the rows to delete may carry either.
    """

    instance_id: str


Op = (
    EraseInstance
    | PutState
    | AddHistory
    | AddCounters
    | AddStepCounters
    | PutSample
    | AddThroughput
    | AddActivity
)


def _state_row(event: InstanceEvent, current: dict[str, Any] | None, **fields: Any) -> PutState:
    # Without a current row (only when one run's events were sealed under two keys, a write
    # racing an erasure), the row starts from neutral values rather than failing the projection.
    base: dict[str, Any] = dict(current) if current else dict(_NEW_ROW)
    base.update(
        instance_id=str(event.originator_id),
        user_id=event.user_id,
        flow_id=event.flow_id,
        definition_version=event.definition_version,
        version=event.originator_version,
        updated_at=event.timestamp,
    )
    base.update(fields)
    return PutState(base)


_NEW_ROW: dict[str, Any] = {
    "step": None,
    "service": None,
    "ok": True,
    "payload": None,
    "status": FlowStatus.ACTIVE.value,
    "started_at": None,
    "completed_at": None,
    "expires_at": None,
    "previous": None,
    "entity_id": None,
    "message": None,
}


def _history_row(event: DomainEvent) -> AddHistory | None:
    entry = history_entry(event)
    if entry is None:
        return None
    assert isinstance(event, InstanceEvent)
    data = entry.model_dump()
    return AddHistory(
        {
            "user_id": data["user_id"],
            "flow_id": data["flow_id"],
            "version": event.originator_version,
            "instance_id": str(event.originator_id),
            "id": data["id"],
            "kind": str(data["kind"]),
            "from_step": data["from_step"],
            "to_step": data["to_step"],
            "transition": data["transition"],
            "payload": data["payload"],
            "timestamp": data["timestamp"],
            "success": data["success"],
            "error": data["error"],
            "meta": data["metadata"],
            "ok": data["ok"],
            "message": data["message"],
        }
    )


def _dropped(previous: dict[str, Any] | None, flow_id: str) -> list[Op]:
    """An active run that ends or is moved away from its step without moving on drops out there."""
    if previous is None or previous["status"] != FlowStatus.ACTIVE:
        return []
    return [AddStepCounters(flow_id, previous["step"], {"dropped": 1})]


def _attempt(event: TransitionExecuted | TransitionRejected, attempts: int) -> list[Op]:
    second = int(event.timestamp.timestamp())
    # Whole hours are forgotten at once, so the bound (and the delete behind it) moves rarely.
    hour = THROUGHPUT_RETENTION_SECONDS
    return [
        PutSample(event.flow_id, attempts % SAMPLE_SLOTS, event.elapsed_ms, second),
        AddThroughput(event.flow_id, second, (second // hour - 1) * hour),
    ]


_RUN_COUNTS = frozenset({"completed", "completed_duration_ms"})
"""Counted in the minute the run started, so a window's completion rate is over its own runs."""


def _minute(moment: datetime) -> int:
    return int(moment.timestamp()) // 60


def _activity(event: InstanceEvent, previous: dict[str, Any] | None, ops: list[Op]) -> list[Op]:
    """The counter and step-counter changes again, by minute: what windowed statistics read."""
    now = _minute(event.timestamp)
    started = previous.get("started_at") if previous else None
    run = _minute(started) if started is not None else now
    activity: list[Op] = []
    for op in ops:
        if isinstance(op, AddCounters):
            by_run = {k: v for k, v in op.deltas.items() if k in _RUN_COUNTS}
            by_now = {
                k: v for k, v in op.deltas.items() if k in ACTIVITY_COLUMNS and k not in by_run
            }
            activity += [
                AddActivity(op.flow_id, m, "", d) for m, d in ((run, by_run), (now, by_now)) if d
            ]
        elif isinstance(op, AddStepCounters):
            activity.append(AddActivity(op.flow_id, now, op.step, dict(op.deltas)))
    return activity


def changes(event: DomainEvent, previous: dict[str, Any] | None, attempts: int) -> list[Op]:
    """The row operations for one event (none for definition and catalog events)."""
    if not isinstance(event, InstanceEvent):
        return []
    ops = _changes(event, previous, attempts)
    return ops + _activity(event, previous, ops)


def _changes(event: InstanceEvent, previous: dict[str, Any] | None, attempts: int) -> list[Op]:
    ops: list[Op] = []
    history = _history_row(event)
    if history is not None:
        ops.append(history)
    flow = event.flow_id
    match event:
        case FlowStarted():
            ops.extend(_dropped(previous, flow))
            ops.append(AddCounters(flow, {"started": 1}))
            ops.append(AddStepCounters(flow, event.step, {"entered": 1}))
            ops.append(
                _state_row(
                    event,
                    previous,
                    step=event.step,
                    service=event.service,
                    ok=True,
                    payload=None,
                    status=FlowStatus.ACTIVE.value,
                    started_at=event.timestamp,
                    completed_at=None,
                    expires_at=event.expires_at,
                    previous=None,
                    entity_id=event.entity_id,
                    message=None,
                )
            )
        case TransitionExecuted():
            counts = {"attempts": 1, "response_ms_total": event.elapsed_ms}
            ops.append(AddCounters(flow, counts if event.ok else {**counts, "failures": 1}))
            ops.append(AddStepCounters(flow, event.from_step, {"moved_on": 1}))
            ops.append(AddStepCounters(flow, event.to_step, {"entered": 1}))
            ops.extend(_attempt(event, attempts))
            before = previous.get("payload") if previous else None
            ops.append(
                _state_row(
                    event,
                    previous,
                    step=event.to_step,
                    service=event.service,
                    ok=event.ok,
                    message=event.message,
                    previous=event.previous,
                    payload=merge_payload(before, event.payload)
                    if event.rules == 2
                    else event.payload,
                    expires_at=event.expires_at,
                )
            )
        case TransitionRejected():
            ops.append(
                AddCounters(
                    flow, {"attempts": 1, "rejections": 1, "response_ms_total": event.elapsed_ms}
                )
            )
            ops.extend(_attempt(event, attempts))
            # Rules 2 (the model): a refusal leaves the state as it was; rules 1 set ok to false.
            ops.append(_state_row(event, previous, **({} if event.rules == 2 else {"ok": False})))
        case FlowCompleted():
            started = previous["started_at"] if previous else None
            duration = (event.timestamp - started) / timedelta(milliseconds=1) if started else 0.0
            # Logs written before events were stamped in order may run backwards: never negative.
            duration = max(duration, 0.0)
            ops.append(AddCounters(flow, {"completed": 1, "completed_duration_ms": duration}))
            ops.append(
                _state_row(
                    event,
                    previous,
                    status=FlowStatus.COMPLETED.value,
                    completed_at=event.timestamp,
                    expires_at=None,
                )
            )
        case StateOverridden() | FlowHandedOver():
            restarted = previous is None or previous["status"] in (
                FlowStatus.CLEARED,
                FlowStatus.EXPIRED,
            )
            ops.extend(_dropped(previous, flow))
            if restarted:
                ops.append(AddCounters(flow, {"started": 1}))
            ops.append(AddStepCounters(flow, event.step, {"entered": 1}))
            ops.append(
                _state_row(
                    event,
                    previous,
                    step=event.step,
                    service=event.service,
                    ok=event.ok,
                    payload=event.payload,
                    status=FlowStatus.ACTIVE.value,
                    started_at=event.timestamp
                    if restarted
                    else previous and previous["started_at"],
                    completed_at=None,
                    expires_at=event.expires_at,
                    previous=event.previous,
                    entity_id=event.entity_id,
                    message=event.message,
                )
            )
        case FlowWentBack():
            # Going back is moving on from the step left and entering the previous one again.
            ops.append(AddStepCounters(flow, event.from_step, {"moved_on": 1}))
            ops.append(AddStepCounters(flow, event.step, {"entered": 1}))
            ops.append(
                _state_row(
                    event,
                    previous,
                    step=event.step,
                    service=event.service,
                    ok=True,
                    message=None,
                    previous=None,
                    expires_at=event.expires_at,
                )
            )
        case FlowMigrated():
            # A migration is not a drop-out: the run goes on. When it lands on another step, the
            # funnel counts that as moving on from the old step and entering the new one, which
            # keeps entered == moved_on + dropped + current for every non-terminal step.
            if event.to_step != event.from_step:
                ops.append(AddStepCounters(flow, event.from_step, {"moved_on": 1}))
                ops.append(AddStepCounters(flow, event.to_step, {"entered": 1}))
            ops.append(
                _state_row(
                    event,
                    previous,
                    step=event.to_step,
                    service=event.service,
                    previous=event.previous,
                )
            )
        case FlowCleared() | FlowExpired():
            ops.extend(_dropped(previous, flow))
            expired = isinstance(event, FlowExpired)
            if expired:
                ops.append(AddCounters(flow, {"expired": 1}))
            ops.append(
                _state_row(
                    event,
                    previous,
                    step=None,
                    service=None,
                    payload=None,
                    status=(FlowStatus.EXPIRED if expired else FlowStatus.CLEARED).value,
                    expires_at=None,
                    previous=None,
                    entity_id=None,
                    message=None,
                )
            )
        case FlowErased():
            # The counters keep counting the erased user's steps (they say nothing about who).
            ops.extend(_dropped(previous, flow))
            ops.append(EraseInstance(str(event.originator_id)))
    return ops
