"""A flow's funnel and statistics, for all time or over a recent time window.

All time is what the store answers (`get_flow_statistics`, `get_flow_funnel`: counter tables). The
store keeps no counts by time, so for "the last hour/day/week" the console folds the event log itself
(`read_events`) through `flowstore.projections.ops.changes`, the function the projections apply, so the two
count alike. Counts go into one-minute buckets; each flow's fold is built on first use (one pass over
the log) and then only reads events it has not seen.

In a window, per step, *entered*, *moved on* and *dropped* count what happened in the window; runs
are counted by when they started: the completion rate is the share of runs started in the window that
have completed, the average duration is over those completed runs. Error rate, response times and
throughput are over the transition attempts made in the window. *Now* (users on a step, active users)
is always the present.
"""

from __future__ import annotations

import random
import threading
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from flowstore import FlowStore
from flowstore.domain import DomainEvent, InstanceEvent
from flowstore.projections.ops import (
    AddCounters,
    AddStepCounters,
    EraseInstance,
    PutSample,
    PutState,
    changes,
)
from flowstore.projections.sql import percentile

__all__ = ["WINDOWS", "FunnelSummary", "LogWindows", "StepFigures", "Window", "flow_summary"]

_PAGE = 1000
_SAMPLES_PER_MINUTE = 1000
"""Response times kept per minute and flow; above it a uniform sample (reservoir) stands in."""


@dataclass(frozen=True)
class Window:
    """A time window the console offers: its name in URLs, its label, and its length."""

    key: str
    label: str
    seconds: int | None
    """None for all time."""


WINDOWS: tuple[Window, ...] = (
    Window("all", "All time", None),
    Window("1h", "Last hour", 3600),
    Window("24h", "Last 24 hours", 86_400),
    Window("7d", "Last 7 days", 7 * 86_400),
)
"""The windows offered, all time first."""

_LONGEST = max(w.seconds for w in WINDOWS if w.seconds is not None)


@dataclass(frozen=True)
class StepFigures:
    """One step of the funnel."""

    step: str
    entered: int
    moved_on: int
    dropped: int
    current: int


@dataclass(frozen=True)
class FunnelSummary:
    """What the funnel page shows for one flow and window."""

    flow_id: str
    window: Window
    steps: list[StepFigures]
    runs_started: int
    active_users: int
    completion_rate: float
    average_duration_ms: float
    error_rate: float
    average_response_ms: float
    p95_response_ms: float
    throughput_per_second: float
    throughput_seconds: float
    """The span throughput is averaged over (the store's `statistics_window` for all time)."""
    since: datetime | None = None


@dataclass
class _Bucket:
    attempts: defaultdict[str, float] = field(default_factory=lambda: defaultdict(float))
    """By attempt time: attempts, rejections, failures, response_ms_total."""
    runs: defaultdict[str, float] = field(default_factory=lambda: defaultdict(float))
    """By run start: started, completed, completed_duration_ms."""
    steps: Counter[tuple[str, str]] = field(default_factory=Counter)
    samples: list[float] = field(default_factory=list)
    sampled: int = 0


def _minute(moment: datetime) -> int:
    return int(moment.timestamp()) // 60


class _FlowFold:
    """One flow's events folded into minute buckets, up to a log position."""

    def __init__(self, flow_id: str) -> None:
        self.flow_id = flow_id
        self.position = 0
        self.lock = threading.Lock()
        self._states: dict[str, dict[str, Any]] = {}
        self.buckets: dict[int, _Bucket] = {}
        self._random = random.Random(0)

    def _bucket(self, minute: int) -> _Bucket:
        bucket = self.buckets.get(minute)
        if bucket is None:
            bucket = self.buckets[minute] = _Bucket()
        return bucket

    def apply(self, event: DomainEvent) -> None:
        if not isinstance(event, InstanceEvent) or event.flow_id != self.flow_id:
            return
        # Keyed by instance, not user id: a user's id must not outlive their erasure here, and an
        # erased instance's later events read with a stand-in id anyway.
        instance = str(event.originator_id)
        previous = self._states.get(instance)
        now = self._bucket(_minute(event.timestamp))
        started = previous.get("started_at") if previous else None
        for op in changes(event, previous, 0):
            match op:
                case EraseInstance():
                    self._states.pop(instance, None)
                case PutState(row):
                    self._states[instance] = {
                        "status": row.get("status"),
                        "step": row.get("step"),
                        "started_at": row.get("started_at"),
                    }
                case AddCounters(_, deltas):
                    for name, delta in deltas.items():
                        if name == "started":
                            now.runs[name] += delta
                        elif name.startswith("completed"):
                            run = self._bucket(_minute(started)) if started else now
                            run.runs[name] += delta
                        else:
                            now.attempts[name] += delta
                case AddStepCounters(_, step, deltas):
                    for name, count in deltas.items():
                        now.steps[(step, name)] += count
                case PutSample(_, _, elapsed_ms):
                    now.sampled += 1
                    if len(now.samples) < _SAMPLES_PER_MINUTE:
                        now.samples.append(elapsed_ms)
                    else:
                        slot = self._random.randrange(now.sampled)
                        if slot < _SAMPLES_PER_MINUTE:
                            now.samples[slot] = elapsed_ms
                case _:
                    pass

    def forget_before(self, minute: int) -> None:
        for key in [k for k in self.buckets if k < minute]:
            del self.buckets[key]


class LogWindows:
    """Windowed funnels of flows, folded from the store's event log (see the module docstring)."""

    def __init__(self, store: FlowStore, *, clock: Callable[[], datetime] | None = None) -> None:
        self._store = store
        self._clock = clock or (lambda: datetime.now(UTC))
        self._folds: dict[str, _FlowFold] = {}
        self._lock = threading.Lock()

    def _fold(self, flow_id: str) -> _FlowFold:
        with self._lock:
            fold = self._folds.get(flow_id)
            if fold is None:
                fold = self._folds[flow_id] = _FlowFold(flow_id)
            return fold

    def _catch_up(self, fold: _FlowFold) -> None:
        while True:
            page = self._store.read_events(fold.position + 1, _PAGE)
            for _, event in page:
                fold.apply(event)
            if page:
                fold.position = page[-1][0]
            if len(page) < _PAGE:
                return

    def summary(self, flow_id: str, window: Window) -> FunnelSummary:
        """The flow's funnel and statistics over the last `window.seconds` (not for all time)."""
        assert window.seconds is not None, "all time is the store's own (flow_summary)"
        funnel = self._store.get_flow_funnel(flow_id)  # FlowNotFoundError for unknown flows
        active = self._store.get_flow_statistics(flow_id).active_users
        now = self._clock()
        since = datetime.fromtimestamp(now.timestamp() - window.seconds, UTC)
        first = _minute(since)
        fold = self._fold(flow_id)
        with fold.lock:
            self._catch_up(fold)
            fold.forget_before(_minute(now) - _LONGEST // 60 - 1)
            buckets = [b for minute, b in fold.buckets.items() if minute >= first]
            attempts: defaultdict[str, float] = defaultdict(float)
            runs: defaultdict[str, float] = defaultdict(float)
            steps: Counter[tuple[str, str]] = Counter()
            samples: list[float] = []
            for bucket in buckets:
                for name, value in bucket.attempts.items():
                    attempts[name] += value
                for name, value in bucket.runs.items():
                    runs[name] += value
                steps.update(bucket.steps)
                samples.extend(bucket.samples)
        names = [step.step for step in funnel]
        names += sorted({step for step, _ in steps} - set(names))
        current = {step.step: step.current for step in funnel}
        tried, started, completed = attempts["attempts"], runs["started"], runs["completed"]
        return FunnelSummary(
            flow_id=flow_id,
            window=window,
            steps=[
                StepFigures(
                    step=name,
                    entered=int(steps[(name, "entered")]),
                    moved_on=int(steps[(name, "moved_on")]),
                    dropped=int(steps[(name, "dropped")]),
                    current=current.get(name, 0),
                )
                for name in names
            ],
            runs_started=round(started),
            active_users=active,
            completion_rate=completed / started if started else 0.0,
            average_duration_ms=runs["completed_duration_ms"] / completed if completed else 0.0,
            # Like the store's errorRate: refusals and transitions taken with ok=False.
            error_rate=(attempts["rejections"] + attempts["failures"]) / tried if tried else 0.0,
            average_response_ms=attempts["response_ms_total"] / tried if tried else 0.0,
            p95_response_ms=percentile(samples, 95),
            throughput_per_second=tried / window.seconds,
            throughput_seconds=window.seconds,
            since=since,
        )


def flow_summary(
    store: FlowStore, windows: LogWindows, flow_id: str, window: Window
) -> FunnelSummary:
    """The funnel page's figures: the store's own for all time, else folded from the log."""
    if window.seconds is not None:
        return windows.summary(flow_id, window)
    stats = store.get_flow_statistics(flow_id)
    return FunnelSummary(
        flow_id=flow_id,
        window=window,
        steps=[
            StepFigures(s.step, s.entered, s.moved_on, s.dropped, s.current)
            for s in store.get_flow_funnel(flow_id)
        ],
        runs_started=stats.total_flows,
        active_users=stats.active_users,
        completion_rate=stats.completion_rate,
        average_duration_ms=stats.average_flow_duration,
        error_rate=stats.error_rate,
        average_response_ms=stats.performance_metrics.average_response_time,
        p95_response_ms=stats.performance_metrics.p95_response_time,
        throughput_per_second=stats.performance_metrics.throughput_per_second,
        throughput_seconds=store.statistics_window,
    )
