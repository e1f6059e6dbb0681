"""What each event does to the read-model tables, as plain data: a pure function of events.

`changes(event, previous, attempts)` returns the row operations for one event, given the instance's
current `flow_states` row and the flow's attempt count so far (both read from the tables being
built). The live path, a rebuild and verify all apply these same operations, so they cannot disagree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import timedelta
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
    "ACTIVITY_SPANS",
    "RESPONSE_BINS_PER_OCTAVE",
    "SAMPLE_SLOTS",
    "THROUGHPUT_RETENTION_SECONDS",
    "AddActivity",
    "AddCounters",
    "AddHistory",
    "AddResponseTime",
    "AddStepCounters",
    "AddThroughput",
    "AddTransition",
    "EraseInstance",
    "Op",
    "PutSample",
    "PutState",
    "bin_value",
    "changes",
    "response_bin",
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
    "completions",
)
"""What `flow_activity` counts per flow, time bucket and step (`flowstore.projections.tables`).

`completed` (and its duration) counts runs in the bucket they *started* in, so that a window's
completion rate is over its own runs; `completions` counts them in the bucket they completed in
(the console's activity charts)."""

ACTIVITY_SPANS = (60, 3600)
"""The bucket sizes `flow_activity` and `flow_response_times` keep, in seconds: every count is
added to its minute and to its hour, so a long window reads hours (a day is 24 of them) and only
its ragged ends read minutes."""

RESPONSE_BINS_PER_OCTAVE = 8
"""Response-time histogram resolution: bin `b` holds [2^(b/8), 2^((b+1)/8)) ms, so the value a
percentile reports (the bin's geometric middle) is within 2^(1/16) - 1 = 4.4% of the exact one."""
_LOWEST_BIN = -10 * RESPONSE_BINS_PER_OCTAVE  # 2^-10 ms, about a microsecond (and 0 ms)
_HIGHEST_BIN = 22 * RESPONSE_BINS_PER_OCTAVE  # 2^22 ms, about 70 minutes (and anything longer)


def response_bin(elapsed_ms: float) -> int:
    """The histogram bin of a response time (clamped to about 1 microsecond .. 70 minutes)."""
    if not elapsed_ms > 0:  # 0, negative or NaN: the lowest bin
        return _LOWEST_BIN
    found = math.floor(math.log2(elapsed_ms) * RESPONSE_BINS_PER_OCTAVE)
    return max(_LOWEST_BIN, min(_HIGHEST_BIN, found))


def bin_value(index: int) -> float:
    """What a histogram bin reports: its geometric middle, in ms."""
    return float(2 ** ((index + 0.5) / RESPONSE_BINS_PER_OCTAVE))


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
    """Add to one flow's counts in one time bucket (step "" for the flow's own counts)."""

    flow_id: str
    span: int
    """The bucket's size in seconds (one of `ACTIVITY_SPANS`)."""
    start: int
    """The bucket's first second (epoch seconds, a multiple of `span`)."""
    step: str
    deltas: dict[str, float]


@dataclass(frozen=True)
class AddResponseTime:
    """Count one attempt's response time in its histogram bin of one time bucket."""

    flow_id: str
    span: int
    start: int
    bin: int


@dataclass(frozen=True)
class AddTransition:
    """Count one accepted transition, by the step it left and its name (the diagram's labels)."""

    flow_id: str
    from_step: str
    transition: str


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
    | AddResponseTime
    | AddTransition
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
    "entered_at": None,
}


def _stay_ms(event: InstanceEvent, previous: dict[str, Any] | None) -> float | None:
    """For a transition taken: how long the run stayed on the step it leaves, in whole ms (since
    the accepted command that brought it there; None when the row does not say)."""
    if not isinstance(event, TransitionExecuted) or previous is None:
        return None
    entered = previous.get("entered_at")
    if entered is None or previous.get("step") != event.from_step:
        return None
    return float(max(0, round((event.timestamp - entered) / timedelta(milliseconds=1))))


def _history_row(event: DomainEvent, previous: dict[str, Any] | None) -> AddHistory | None:
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
            "stay_ms": _stay_ms(event, previous),
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
    timed = response_bin(event.elapsed_ms)
    return [
        PutSample(event.flow_id, attempts % SAMPLE_SLOTS, event.elapsed_ms, second),
        AddThroughput(event.flow_id, second, (second // hour - 1) * hour),
        *(AddResponseTime(event.flow_id, s, second - second % s, timed) for s in ACTIVITY_SPANS),
    ]


_RUN_COUNTS = frozenset({"completed", "completed_duration_ms"})
"""Counted in the bucket the run started, so a window's completion rate is over its own runs."""


def _activity(event: InstanceEvent, previous: dict[str, Any] | None, ops: list[Op]) -> list[Op]:
    """The counter and step-counter changes again, by minute and by hour: what windowed
    statistics and the activity charts read."""
    now = int(event.timestamp.timestamp())
    started = previous.get("started_at") if previous else None
    run = int(started.timestamp()) if started is not None else now
    changed: list[tuple[int, str, dict[str, float]]] = []  # (second, step, deltas)
    for op in ops:
        if isinstance(op, AddCounters):
            by_run = {k: v for k, v in op.deltas.items() if k in _RUN_COUNTS}
            by_now = {
                k: v for k, v in op.deltas.items() if k in ACTIVITY_COLUMNS and k not in by_run
            }
            if "completed" in by_run:
                by_now["completions"] = by_run["completed"]
            changed += [(at, "", d) for at, d in ((run, by_run), (now, by_now)) if d]
        elif isinstance(op, AddStepCounters):
            changed.append((now, op.step, dict(op.deltas)))
    return [
        AddActivity(event.flow_id, span, at - at % span, step, deltas)
        for at, step, deltas in changed
        for span in ACTIVITY_SPANS
    ]


def changes(event: DomainEvent, previous: dict[str, Any] | None, attempts: int) -> list[Op]:
    """The row operations for one event (none for definition and catalog events)."""
    if not isinstance(event, InstanceEvent):
        return []
    ops = _changes(event, previous, attempts)
    return ops + _activity(event, previous, ops)


def _changes(event: InstanceEvent, previous: dict[str, Any] | None, attempts: int) -> list[Op]:
    ops: list[Op] = []
    history = _history_row(event, previous)
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
                    entered_at=event.timestamp,
                )
            )
        case TransitionExecuted():
            counts = {"attempts": 1, "response_ms_total": event.elapsed_ms}
            ops.append(AddCounters(flow, counts if event.ok else {**counts, "failures": 1}))
            ops.append(AddStepCounters(flow, event.from_step, {"moved_on": 1}))
            ops.append(AddStepCounters(flow, event.to_step, {"entered": 1}))
            ops.append(AddTransition(flow, event.from_step, event.transition))
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
                    entered_at=event.timestamp,
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
                    entered_at=event.timestamp,
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
                    entered_at=event.timestamp,
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
                    entered_at=event.timestamp,
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
                    entered_at=None,
                )
            )
        case FlowErased():
            # The counters keep counting the erased user's steps (they say nothing about who).
            ops.extend(_dropped(previous, flow))
            ops.append(EraseInstance(str(event.originator_id)))
    return ops
