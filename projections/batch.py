"""Applies row operations to an in-memory batch: the one place events become table rows.

A `RowBatch` answers the two questions `changes()` asks (the instance's current state row, the flow's
attempt count) from what it has applied so far, falling back to a loader (the database) for rows it
has not seen. It accumulates the result; `flowstore.projections.sql` writes a batch in a few statements. With
loaders that know nothing, a batch fed the whole log *is* the expected content of every table, which
is how `verify` replays the log in memory.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from typing import Any

from flowstore.domain import DomainEvent, InstanceEvent, TransitionExecuted, TransitionRejected
from flowstore.projections.ops import (
    ACTIVITY_COLUMNS,
    AddActivity,
    AddCounters,
    AddHistory,
    AddResponseTime,
    AddStepCounters,
    AddThroughput,
    AddTransition,
    EraseInstance,
    PutSample,
    PutState,
    changes,
)

__all__ = ["RowBatch", "StateKey"]

StateKey = tuple[str, str]
"""(user_id, flow_id)"""


def _no_state(_: StateKey) -> dict[str, Any] | None:
    return None


def _no_attempts(_: str) -> int:
    return 0


class RowBatch:
    """Row changes accumulated from a run of events."""

    def __init__(
        self,
        load_state: Callable[[StateKey], dict[str, Any] | None] = _no_state,
        load_attempts: Callable[[str], int] = _no_attempts,
    ) -> None:
        self._load_state = load_state
        self._load_attempts = load_attempts
        self.states: dict[StateKey, dict[str, Any] | None] = {}
        self.dirty: set[StateKey] = set()
        self.history: list[dict[str, Any]] = []
        self.erased: set[str] = set()
        """Ids of instances whose rows written before this batch must go (before its own rows)."""
        self.counters: defaultdict[str, defaultdict[str, float]] = defaultdict(
            lambda: defaultdict(float)
        )
        self.steps: defaultdict[tuple[str, str], Counter[str]] = defaultdict(Counter)
        self.samples: dict[tuple[str, int], tuple[float, int]] = {}
        """(flow_id, slot) -> (elapsed_ms, second)"""
        self.throughput: Counter[tuple[str, int]] = Counter()
        self.forget_before: dict[str, int] = {}
        self.activity: defaultdict[tuple[str, int, int, str], defaultdict[str, float]] = (
            defaultdict(lambda: defaultdict(float))
        )
        """(flow_id, span, start, step) -> counts"""
        self.response_times: Counter[tuple[str, int, int, int]] = Counter()
        """(flow_id, span, start, bin) -> attempts"""
        self.transitions: Counter[tuple[str, str, str]] = Counter()
        """(flow_id, from_step, transition) -> taken"""
        self._attempts: dict[str, int] = {}
        self.events = 0

    def state(self, key: StateKey) -> dict[str, Any] | None:
        """The current state row of an instance, as far as this batch knows."""
        if key not in self.states:
            self.states[key] = self._load_state(key)
        return self.states[key]

    def apply(self, event: DomainEvent) -> None:
        """Fold one event's row operations into the batch."""
        self.events += 1
        if not isinstance(event, InstanceEvent):
            return
        key = (event.user_id, event.flow_id)
        attempts = 0
        if isinstance(event, TransitionExecuted | TransitionRejected):
            if event.flow_id not in self._attempts:
                self._attempts[event.flow_id] = self._load_attempts(event.flow_id)
            attempts = self._attempts[event.flow_id]
        for op in changes(event, self.state(key), attempts):
            match op:
                case PutState(row):
                    self.states[key] = row
                    self.dirty.add(key)
                case AddHistory(row):
                    self.history.append(row)
                case EraseInstance(instance):
                    self.erased.add(instance)
                    for known, copy in self.states.items():
                        if known == key or (copy is not None and copy["instance_id"] == instance):
                            self.states[known] = None
                            self.dirty.add(known)
                    self.history = [h for h in self.history if h["instance_id"] != instance]
                case AddCounters(flow_id, deltas):
                    counters = self.counters[flow_id]
                    for name, delta in deltas.items():  # Counter.update is slower per call
                        counters[name] += delta
                    if "attempts" in deltas:
                        self._attempts[flow_id] += int(deltas["attempts"])
                case AddStepCounters(flow_id, step, deltas):
                    steps = self.steps[(flow_id, step)]
                    for name, delta in deltas.items():
                        steps[name] += delta
                case PutSample(flow_id, slot, elapsed_ms, second):
                    self.samples[(flow_id, slot)] = (elapsed_ms, second)
                case AddActivity(flow_id, span, start, step, deltas):
                    counts = self.activity[(flow_id, span, start, step)]
                    for name, delta in deltas.items():
                        counts[name] += delta
                case AddResponseTime(flow_id, span, start, index):
                    self.response_times[(flow_id, span, start, index)] += 1
                case AddTransition(flow_id, from_step, transition):
                    self.transitions[(flow_id, from_step, transition)] += 1
                case AddThroughput(flow_id, second, forget_before):
                    self.throughput[(flow_id, second)] += 1
                    self.forget_before[flow_id] = max(
                        forget_before, self.forget_before.get(flow_id, forget_before)
                    )

    def apply_all(self, events: Iterable[DomainEvent]) -> RowBatch:
        """Fold many events; returns self."""
        for event in events:
            self.apply(event)
        return self

    def forget_old_throughput(self) -> None:
        """Drop per-second counts that fell out of the retention window (in-memory replays)."""
        for key in [k for k in self.throughput if k[1] < self.forget_before.get(k[0], k[1])]:
            del self.throughput[key]

    def activity_rows(self) -> list[dict[str, Any]]:
        """The `flow_activity` rows of the batch (counts to add, or the whole table's in a replay)."""
        return [
            {
                "flow_id": f,
                "span": span,
                "start": start,
                "step": s,
                **{c: d.get(c, 0) for c in ACTIVITY_COLUMNS},
            }
            for (f, span, start, s), d in self.activity.items()
        ]

    def response_time_rows(self) -> list[dict[str, Any]]:
        """The `flow_response_times` rows of the batch."""
        return [
            {"flow_id": f, "span": span, "start": start, "bin": b, "attempts": n}
            for (f, span, start, b), n in self.response_times.items()
        ]

    def transition_rows(self) -> list[dict[str, Any]]:
        """The `flow_transitions` rows of the batch."""
        return [
            {"flow_id": f, "from_step": s, "transition": t, "taken": n}
            for (f, s, t), n in self.transitions.items()
        ]

    @property
    def attempts(self) -> dict[str, int]:
        """Each flow's attempt count after this batch (for the flows it touched)."""
        return self._attempts

    @property
    def empty(self) -> bool:
        """True when no event changed any row."""
        return not (
            self.dirty
            or self.erased
            or self.history
            or self.counters
            or self.steps
            or self.samples
            or self.activity
            or self.response_times
            or self.transitions
        )
