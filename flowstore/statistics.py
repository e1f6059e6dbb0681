"""Flow statistics as a fold over instance events: how each event changes the counters.

`StatisticsFold` holds, per flow, the counters the seed's `FlowStatistics` is computed from, plus the
per-instance facts some events need (when the current run started, whether it is active). It is pure:
give it the same events and it reaches the same numbers. The only clock is the `now` passed to
`statistics()` for the throughput window.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from uuid import UUID

from flowstore.domain import (
    DomainEvent,
    FlowCleared,
    FlowCompleted,
    FlowExpired,
    FlowStarted,
    InstanceEvent,
    StateOverridden,
    TransitionExecuted,
    TransitionRejected,
)
from flowstore.models import FlowStatistics, FlowStatus, PerformanceMetrics, StepCount

__all__ = ["FlowCounters", "StatisticsFold", "percentile"]


def percentile(samples: list[float], q: float) -> float:
    """The nearest-rank q-th percentile (0 < q <= 100) of the samples; 0.0 when there are none."""
    if not samples:
        return 0.0
    ordered = sorted(samples)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


@dataclass
class FlowCounters:
    """Counters for one flow."""

    started: int = 0
    completed: int = 0
    expired: int = 0
    attempts: int = 0
    rejections: int = 0
    completed_duration_ms: float = 0.0
    entries: Counter[str] = field(default_factory=Counter)
    response_ms: list[float] = field(default_factory=list)
    attempt_times: list[datetime] = field(default_factory=list)


@dataclass
class _Run:
    user_id: str
    flow_id: str
    status: FlowStatus
    started_at: datetime


class StatisticsFold:
    """Accumulates statistics from instance events, in log order."""

    def __init__(self) -> None:
        self.flows: dict[str, FlowCounters] = {}
        self._runs: dict[UUID, _Run] = {}

    def apply(self, event: DomainEvent) -> None:
        """Fold one event in (events of other kinds are ignored)."""
        if not isinstance(event, InstanceEvent):
            return
        counters = self.flows.setdefault(event.flow_id, FlowCounters())
        run = self._runs.get(event.originator_id)
        ts = event.timestamp
        match event:
            case FlowStarted():
                counters.started += 1
                counters.entries[event.step] += 1
                self._runs[event.originator_id] = _Run(
                    event.user_id, event.flow_id, FlowStatus.ACTIVE, ts
                )
            case StateOverridden():
                counters.entries[event.step] += 1
                if run is None or run.status in (FlowStatus.CLEARED, FlowStatus.EXPIRED):
                    # An override of an instance without state starts a run.
                    counters.started += 1
                    self._runs[event.originator_id] = _Run(
                        event.user_id, event.flow_id, FlowStatus.ACTIVE, ts
                    )
                else:
                    run.status = FlowStatus.ACTIVE
            case TransitionExecuted():
                counters.attempts += 1
                counters.entries[event.to_step] += 1
                counters.response_ms.append(event.elapsed_ms)
                counters.attempt_times.append(ts)
            case TransitionRejected():
                counters.attempts += 1
                counters.rejections += 1
                counters.response_ms.append(event.elapsed_ms)
                counters.attempt_times.append(ts)
            case FlowCompleted():
                counters.completed += 1
                if run is not None:
                    counters.completed_duration_ms += (ts - run.started_at) / timedelta(
                        milliseconds=1
                    )
                    run.status = FlowStatus.COMPLETED
            case FlowCleared():
                if run is not None:
                    run.status = FlowStatus.CLEARED
            case FlowExpired():
                counters.expired += 1
                if run is not None:
                    run.status = FlowStatus.EXPIRED

    def statistics(
        self, flow_id: str | None = None, *, now: datetime, window_seconds: float = 60.0
    ) -> FlowStatistics:
        """The seed's statistics for one flow, or for all flows when `flow_id` is None."""
        chosen = [c for f, c in self.flows.items() if flow_id is None or f == flow_id]
        started = sum(c.started for c in chosen)
        completed = sum(c.completed for c in chosen)
        attempts = sum(c.attempts for c in chosen)
        rejections = sum(c.rejections for c in chosen)
        entries: Counter[str] = Counter()
        for c in chosen:
            entries.update(c.entries)
        samples = [ms for c in chosen for ms in c.response_ms]
        since = now - timedelta(seconds=window_seconds)
        recent = sum(1 for c in chosen for t in c.attempt_times if since < t <= now)
        active_users = {
            run.user_id
            for run in self._runs.values()
            if run.status is FlowStatus.ACTIVE and (flow_id is None or run.flow_id == flow_id)
        }
        return FlowStatistics(
            total_flows=started,
            active_users=len(active_users),
            completion_rate=completed / started if started else 0.0,
            average_flow_duration=(
                sum(c.completed_duration_ms for c in chosen) / completed if completed else 0.0
            ),
            popular_steps=[
                StepCount(step=s, count=n)
                for s, n in sorted(entries.items(), key=lambda item: (-item[1], item[0]))
            ],
            error_rate=rejections / attempts if attempts else 0.0,
            performance_metrics=PerformanceMetrics(
                average_response_time=sum(samples) / len(samples) if samples else 0.0,
                p95_response_time=percentile(samples, 95),
                throughput_per_second=recent / window_seconds,
            ),
        )
