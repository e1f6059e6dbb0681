"""A flow's funnel and statistics, for all time or over a recent time window.

All time is what the store answers from its counter tables; a window ("the last hour/day/week") is
what it answers from its activity table of minute and hour rows (`get_flow_statistics(flow,
since=, until=)`, `get_flow_funnel(...)`): no fold of the event log in the web process.

In a window, per step, *entered*, *moved on* and *dropped* count what happened in the window; runs
are counted by when they started: the completion rate is the share of runs started in the window that
have completed, the average duration is over those completed runs. Error rate, response times and
throughput are over the transition attempts made in the window. *Now* (users on a step, active users)
is always the present.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from flowstore import FlowStore

__all__ = ["WINDOWS", "FunnelSummary", "LogWindows", "StepFigures", "Window", "flow_summary"]


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


class LogWindows:
    """Windowed funnels of flows, read from the store's activity table (minute and hour rows)."""

    def __init__(self, store: FlowStore, *, clock: Callable[[], datetime] | None = None) -> None:
        self._store = store
        self._clock = clock or (lambda: datetime.now(UTC))

    def summary(self, flow_id: str, window: Window) -> FunnelSummary:
        """The flow's funnel and statistics over the last `window.seconds` (not for all time)."""
        assert window.seconds is not None, "all time is the store's own (flow_summary)"
        now = self._clock()
        since = now - timedelta(seconds=window.seconds)
        # No `until`: up to the store's now, the events it just stamped included.
        funnel = self._store.get_flow_funnel(flow_id, since=since)
        stats = self._store.get_flow_statistics(flow_id, since=since)
        performance = stats.performance_metrics
        return FunnelSummary(
            flow_id=flow_id,
            window=window,
            steps=[
                StepFigures(s.step, s.entered, s.moved_on, s.dropped, s.current) for s in funnel
            ],
            runs_started=stats.total_flows,
            active_users=stats.active_users,
            completion_rate=stats.completion_rate,
            average_duration_ms=stats.average_flow_duration,
            error_rate=stats.error_rate,
            average_response_ms=performance.average_response_time,
            p95_response_ms=performance.p95_response_time,
            throughput_per_second=performance.throughput_per_second,
            throughput_seconds=window.seconds,
            since=since,
        )


def flow_summary(
    store: FlowStore, windows: LogWindows, flow_id: str, window: Window
) -> FunnelSummary:
    """The funnel page's figures: from the store's counters for all time, else its activity table."""
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
