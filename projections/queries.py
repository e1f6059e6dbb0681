"""Queries on the read-model tables: a user's flows, history, statistics, funnel, instances."""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import AbstractContextManager
from datetime import UTC, datetime
from typing import Any

import orjson
from sqlalchemy import (
    ColumnElement,
    Connection,
    Engine,
    RowMapping,
    Select,
    Table,
    and_,
    distinct,
    false,
    func,
    inspect,
    or_,
    select,
)

from flowstore.models import (
    FlowStateHistory,
    FlowStatistics,
    FlowStatus,
    FunnelStep,
    PerformanceMetrics,
    StepCount,
)
from flowstore.projections.batch import StateKey
from flowstore.projections.ops import ACTIVITY_COLUMNS, bin_value
from flowstore.projections.tables import ProjectionTables

__all__ = ["Queries", "histogram_percentile", "percentile", "row_dict"]


def percentile(samples: Sequence[float], q: float) -> float:
    """The nearest-rank q-th percentile (0 < q <= 100) of the samples; 0.0 when there are none."""
    if not samples:
        return 0.0
    ordered = sorted(samples)
    return ordered[max(1, math.ceil(q / 100 * len(ordered))) - 1]


def histogram_percentile(counts: dict[int, int], q: float) -> float:
    """The nearest-rank q-th percentile of a response-time histogram ({bin: attempts}): the
    middle of the bin that holds the value `percentile` would give (within 4.4% of it)."""
    total = sum(counts.values())
    if not total:
        return 0.0
    rank = max(1, math.ceil(q / 100 * total))
    seen = 0
    for index in sorted(counts):
        seen += counts[index]
        if seen >= rank:
            return bin_value(index)
    raise AssertionError("unreachable: the ranks add up to the total")


def _utc(value: Any) -> Any:
    # SQLite keeps no time zone: everything stored is UTC, so naive values read back are UTC.
    if isinstance(value, datetime) and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


def _minute(moment: datetime) -> int:
    return int(moment.timestamp()) // 60


def _minute_ceiling(moment: datetime) -> int:
    return math.ceil(moment.timestamp() / 60)


def _buckets(table: Table, first: int, end: int) -> ColumnElement[bool]:
    """The `flow_activity`-style rows (span, start) that cover minutes [first, end) exactly:
    whole hours from the hour rows, the ragged ends from the minute rows."""
    c = table.c
    hours = (math.ceil(first / 60), end // 60)

    def minutes(low: int, high: int) -> ColumnElement[bool]:
        return and_(c.span == 60, c.start >= low * 60, c.start < high * 60)

    if hours[0] >= hours[1]:
        return minutes(first, end) if first < end else false()
    return or_(
        minutes(first, hours[0] * 60),
        and_(c.span == 3600, c.start >= hours[0] * 3600, c.start < hours[1] * 3600),
        minutes(hours[1] * 60, end),
    )


def row_dict(mapping: Any) -> dict[str, Any]:
    """A result row as a dict, its naive datetimes read as UTC."""
    return {k: _utc(v) for k, v in dict(mapping).items()}


_ACTIVITY_ONLY = ("entered", "moved_on", "dropped", "completions")
_SUMMED = tuple(name for name in ACTIVITY_COLUMNS if name not in _ACTIVITY_ONLY)
"""The counters whose sums `_statistics` takes: the `flow_activity` columns but its step counters
and `completions` (the charts'), which are also the all-time `flow_counters` columns."""


def _sums(table: Table) -> Select[Any]:
    """The sums of `_SUMMED` over `table`'s rows (0 where there are none), each under its name."""
    return select(*(func.coalesce(func.sum(table.c[name]), 0).label(name) for name in _SUMMED))


def _statistics(
    sums: RowMapping,
    steps: list[StepCount],
    samples: list[float],
    *,
    active: int,
    throughput: float,
) -> FlowStatistics:
    """The figures from the counters' sums (`_sums`), all time or over a window alike."""
    started, completed, attempts = sums["started"], sums["completed"], sums["attempts"]
    rejections, failures = sums["rejections"], sums["failures"]
    duration, response = sums["completed_duration_ms"], sums["response_ms_total"]
    return FlowStatistics(
        total_flows=int(started),
        active_users=active,
        completion_rate=completed / started if started else 0.0,
        average_flow_duration=duration / completed if completed else 0.0,
        popular_steps=steps,
        # Refused attempts and transitions taken with ok=False (the step's work failed).
        error_rate=(rejections + failures) / attempts if attempts else 0.0,
        performance_metrics=PerformanceMetrics(
            average_response_time=response / attempts if attempts else 0.0,
            p95_response_time=percentile(samples, 95),
            throughput_per_second=throughput,
        ),
    )


class Queries:
    """The read side of `SqlProjections` (a mixin: the runner provides the tables and connections)."""

    tables: ProjectionTables
    engine: Engine

    def _read(self) -> AbstractContextManager[Connection]:
        raise NotImplementedError  # the runner's: a connection that never takes the write lock

    def user_flows(self, user_id: str, status: FlowStatus | None = None) -> list[dict[str, Any]]:
        """The user's live state rows (active or completed, or only `status`), oldest run first."""
        s = self.tables.states
        statuses = [status] if status is not None else [FlowStatus.ACTIVE, FlowStatus.COMPLETED]
        query = (
            select(s)
            .where(s.c.user_id == user_id, s.c.status.in_(statuses))
            .order_by(s.c.started_at, s.c.flow_id)
        )
        with self._read() as conn:
            return [row_dict(r._mapping) for r in conn.execute(query)]

    def history(
        self,
        user_id: str,
        flow_id: str,
        *,
        limit: int | None = None,
        after_version: int | None = None,
        before_version: int | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        kinds: Sequence[str] | None = None,
        max_bytes: int | None = None,
    ) -> list[FlowStateHistory]:
        """The instance's history rows, oldest first: all, or a page of them.

        `after_version`/`before_version` are cursors (rows strictly after/before that event
        version of the instance: stable, whatever is appended meanwhile); `since` (inclusive) and
        `until` (exclusive) bound the time; with `before_version` and a `limit`, the page is the
        `limit` rows just before it (still oldest first). With `max_bytes`, rows stop at the first
        one that brings their payloads and errors to more than that (it is included, so the caller
        can tell the cap was reached); read in batches, so a huge history never sits in memory whole.
        """
        h = self.tables.history
        query = select(h).where(h.c.user_id == user_id, h.c.flow_id == flow_id)
        if after_version is not None:
            query = query.where(h.c.version > after_version)
        if before_version is not None:
            query = query.where(h.c.version < before_version)
        if since is not None:
            query = query.where(h.c.timestamp >= since)
        if until is not None:
            query = query.where(h.c.timestamp < until)
        if kinds is not None:
            query = query.where(h.c.kind.in_(list(kinds)))
        backwards = before_version is not None and after_version is None and limit is not None
        query = query.order_by(h.c.version.desc() if backwards else h.c.version)
        if limit is not None:
            query = query.limit(limit)
        rows: list[dict[str, Any]] = []
        size = 0
        with self._read() as conn:
            result = conn.execution_options(stream_results=True, yield_per=200).execute(query)
            for r in result:
                row = row_dict(r._mapping)
                rows.append(row)
                if max_bytes is not None:
                    size += len(orjson.dumps(row["payload"])) + len(row["error"] or "")
                    if size > max_bytes:
                        result.close()
                        break
        if backwards:
            rows.reverse()
        return [
            FlowStateHistory.model_validate(
                {k: v for k, v in r.items() if k not in ("version", "meta")}
                | {"metadata": r["meta"]}
            )
            for r in rows
        ]

    def expired(self, now: datetime) -> list[StateKey]:
        """(user_id, flow_id) of active instances whose expiry has passed."""
        s = self.tables.states
        query = select(s.c.user_id, s.c.flow_id).where(
            s.c.status == FlowStatus.ACTIVE, s.c.expires_at <= now
        )
        with self._read() as conn:
            return [(r.user_id, r.flow_id) for r in conn.execute(query)]

    def statistics(self, flow_id: str | None, *, now: datetime, window: float) -> FlowStatistics:
        """The seed's statistics, read from the counter tables (no history scan)."""
        t = self.tables

        def only(table: Table) -> Any:
            return table.c.flow_id == flow_id if flow_id is not None else True

        sums = _sums(t.counters).where(only(t.counters))
        active = select(func.count(distinct(t.states.c.user_id))).where(
            t.states.c.status == FlowStatus.ACTIVE, only(t.states)
        )
        popular = (
            select(t.steps.c.step, func.sum(t.steps.c.entered).label("n"))
            .where(only(t.steps))
            .group_by(t.steps.c.step)
            .order_by(func.sum(t.steps.c.entered).desc(), t.steps.c.step)
        )
        now_second = int(now.timestamp())
        recent = select(func.coalesce(func.sum(t.throughput.c.attempts), 0)).where(
            only(t.throughput),
            t.throughput.c.second > now_second - window,
            t.throughput.c.second <= now_second,
        )
        with self._read() as conn:
            sums_row = conn.execute(sums).one()._mapping
            steps = [StepCount(step=r.step, count=int(r.n)) for r in conn.execute(popular) if r.n]
            samples = list(
                conn.execute(select(t.samples.c.elapsed_ms).where(only(t.samples))).scalars()
            )
            return _statistics(
                sums_row,
                steps,
                samples,
                active=int(conn.execute(active).scalar_one()),
                throughput=int(conn.execute(recent).scalar_one()) / window,
            )

    def window_statistics(
        self, flow_id: str | None, *, since: datetime, until: datetime
    ) -> FlowStatistics:
        """The seed's statistics over [since, until), from the `flow_activity` rows.

        To the minute: a minute counts when it starts in [since rounded down to its minute,
        until); whole hours are read from the hour rows, the ends from the minute rows. Runs count in the minute they started (so the completion rate is over the runs
        started in the window), attempts and steps when they happened; `active_users` is now;
        the p95 is over the recent-samples ring's attempts made in the window (at most the
        flow's last 1,000), and the throughput is attempts per second of the window.
        """
        t = self.tables
        a = t.activity.c
        first, end = _minute(since), _minute_ceiling(until)

        def where(table: Table) -> list[Any]:
            return [table.c.flow_id == flow_id] if flow_id is not None else []

        window = [*where(t.activity), _buckets(t.activity, first, end)]
        sums = _sums(t.activity).where(*window, a.step == "")
        popular = (
            select(a.step, func.sum(a.entered).label("n"))
            .where(*window, a.step != "")
            .group_by(a.step)
            .order_by(func.sum(a.entered).desc(), a.step)
        )
        active = select(func.count(distinct(t.states.c.user_id))).where(
            t.states.c.status == FlowStatus.ACTIVE, *where(t.states)
        )
        samples_query = select(t.samples.c.elapsed_ms).where(
            *where(t.samples),
            t.samples.c.second >= int(since.timestamp()),
            t.samples.c.second < math.ceil(until.timestamp()),
        )
        seconds = max((until - since).total_seconds(), 1e-9)
        with self._read() as conn:
            row = conn.execute(sums).one()._mapping
            steps = [StepCount(step=r.step, count=int(r.n)) for r in conn.execute(popular) if r.n]
            samples = list(conn.execute(samples_query).scalars())
            return _statistics(
                row,
                steps,
                samples,
                active=int(conn.execute(active).scalar_one()),
                throughput=row["attempts"] / seconds,  # per second of the window
            )

    def window_funnel(self, flow_id: str, *, since: datetime, until: datetime) -> list[FunnelStep]:
        """Per step: entered, moved on and dropped within [since, until) (to the minute), and
        active there now."""
        t = self.tables
        a = t.activity.c
        counts = (
            select(
                a.step,
                func.sum(a.entered).label("entered"),
                func.sum(a.moved_on).label("moved_on"),
                func.sum(a.dropped).label("dropped"),
            )
            .where(
                a.flow_id == flow_id,
                _buckets(t.activity, _minute(since), _minute_ceiling(until)),
                a.step != "",
            )
            .group_by(a.step)
        )
        with self._read() as conn:
            now_at = self._current(conn, flow_id)
            found = {
                r.step: FunnelStep(
                    step=r.step,
                    entered=int(r.entered),
                    moved_on=int(r.moved_on),
                    dropped=int(r.dropped),
                    current=now_at.get(r.step, 0),
                )
                for r in conn.execute(counts)
            }
        found.update(
            (step, FunnelStep(step=step, entered=0, moved_on=0, dropped=0, current=n))
            for step, n in now_at.items()
            if step not in found
        )
        return list(found.values())

    def _current(self, conn: Connection, flow_id: str) -> dict[str, int]:
        s = self.tables.states
        query = (
            select(s.c.step, func.count().label("n"))
            .where(s.c.flow_id == flow_id, s.c.status == FlowStatus.ACTIVE)
            .group_by(s.c.step)
        )
        return {r.step: int(r.n) for r in conn.execute(query)}

    def instance_page(
        self,
        flow_id: str,
        *,
        status: FlowStatus,
        step: str | None,
        idle_since: datetime | None,
        after_user: str | None,
        limit: int,
    ) -> list[dict[str, Any]]:
        """Up to `limit` state rows of the flow with `status` (at `step`, untouched since
        `idle_since`), by user id, after `after_user` (index `ix_flow_states_flow_step`)."""
        s = self.tables.states
        query = select(s).where(s.c.flow_id == flow_id, s.c.status == status)
        if step is not None:
            query = query.where(s.c.step == step)
        if idle_since is not None:
            query = query.where(s.c.updated_at <= idle_since)
        if after_user is not None:
            query = query.where(s.c.user_id > after_user)
        query = query.order_by(s.c.user_id).limit(limit)
        with self._read() as conn:
            return [row_dict(r._mapping) for r in conn.execute(query)]

    def funnel(self, flow_id: str) -> list[FunnelStep]:
        """Per step: entered, moved on, dropped, and active now."""
        t = self.tables
        current = (
            select(t.states.c.step, func.count().label("n"))
            .where(t.states.c.flow_id == flow_id, t.states.c.status == FlowStatus.ACTIVE)
            .group_by(t.states.c.step)
        )
        counts = select(t.steps).where(t.steps.c.flow_id == flow_id)
        with self._read() as conn:
            now_at = {r.step: int(r.n) for r in conn.execute(current)}
            return [
                FunnelStep(
                    step=r.step,
                    entered=r.entered,
                    moved_on=r.moved_on,
                    dropped=r.dropped,
                    current=now_at.get(r.step, 0),
                )
                for r in conn.execute(counts)
            ]

    def table_names(self) -> list[str]:
        """Names of the tables that exist in the database (for tests and the console)."""
        return inspect(self.engine).get_table_names()

    def instances(self, flow_id: str, status: FlowStatus) -> list[dict[str, Any]]:
        """The flow's state rows with `status` (user_id, step, definition_version), by user id."""
        s = self.tables.states
        query = (
            select(s.c.user_id, s.c.step, s.c.definition_version)
            .where(s.c.flow_id == flow_id, s.c.status == status)
            .order_by(s.c.user_id)
        )
        with self._read() as conn:
            return [dict(r._mapping) for r in conn.execute(query)]

    def transition_counts(self, flow_id: str) -> dict[tuple[str, str], int]:
        """Accepted transitions of the flow so far, per (from_step, transition), all versions."""
        t = self.tables.transitions
        query = select(t.c.from_step, t.c.transition, t.c.taken).where(t.c.flow_id == flow_id)
        with self._read() as conn:
            return {(r.from_step, r.transition): int(r.taken) for r in conn.execute(query)}
