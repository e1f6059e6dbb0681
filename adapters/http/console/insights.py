"""What the console's pictures show, as a few small functions over the projection tables.

The pages call only these functions: `diagram_stats`, `activity`, `dwell`, `idle_by_step` and
`list_instances`. Each reads small projection tables, never the whole history: the transition
counters (`flow_transitions`), the time buckets (`flow_activity`, `flow_response_times`, a minute
and an hour per row), the newest history rows of the flow (their `stay_ms`) and `flow_states`
through its indexes.

Definitions, all per flow:
- *transitions*: accepted transitions; *rejections*: refused attempts (unknown transition or
  payload refused); *errors*: accepted transitions whose step reported failure (`ok=False`, the
  OwlMeans model); *error rate*: (rejections + errors) / attempts, as `FlowStatistics.error_rate`.
- *completions*: runs that reached a terminal step, in the bucket they reached it.
- *response time*: a transition attempt's `elapsed_ms`. p50/p95 per bucket come from a log-scale
  histogram (8 bins per doubling, `flowstore.projections.ops.response_bin`): the nearest-rank
  percentile's bin, reported as the bin's geometric middle, so within 4.4% of the exact value
  (and exact in which bin it falls), over every attempt of the bucket.
- *dwell*: for a transition out of a step, the time since the command that brought the run there.
- *idle*: an active run's time since its last command (`flow_states.updated_at`).
"""

from __future__ import annotations

import base64
import binascii
import bisect
import itertools
import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import orjson
from sqlalchemy import ColumnElement, Integer, and_, cast, func, or_, select, true

from flowstore import FlowStore, InvalidArgumentError
from flowstore.diagrams import DiagramStats
from flowstore.models import FlowStatus
from flowstore.projections.ops import ACTIVITY_SPANS
from flowstore.projections.queries import histogram_percentile, percentile
from flowstore.projections.sql import SqlProjections

__all__ = [
    "ACTIVITY_WINDOWS",
    "DWELL_BINS",
    "IDLE_CHOICES",
    "Activity",
    "ActivityWindow",
    "Bucket",
    "Dwell",
    "IdleChoice",
    "IdleStep",
    "InstancePage",
    "InstanceRow",
    "activity",
    "diagram_stats",
    "dwell",
    "idle_by_step",
    "list_instances",
]


def _tables(store: FlowStore) -> SqlProjections:
    # The one place the console reaches the store's read model directly: the store offers no
    # query for time buckets, dwell or idle runs yet (see the module docstring). `read_model`
    # waits until the tables reflect everything this process wrote, as the store's own queries do.
    return store.read_model()


@dataclass(frozen=True)
class ActivityWindow:
    """A time window of the activity page and the size of its buckets."""

    key: str
    label: str
    seconds: int
    bucket_seconds: int
    bucket_label: str


ACTIVITY_WINDOWS: tuple[ActivityWindow, ...] = (
    ActivityWindow("1h", "Last hour, per minute", 3600, 60, "minute"),
    ActivityWindow("24h", "Last 24 hours, per hour", 86_400, 3600, "hour"),
    ActivityWindow("7d", "Last 7 days, per hour", 7 * 86_400, 3600, "hour"),
    ActivityWindow("30d", "Last 30 days, per day", 30 * 86_400, 86_400, "day"),
)
"""The windows the activity page offers (the first is the default)."""


@dataclass(frozen=True)
class Bucket:
    """One time bucket of a flow's activity."""

    start: datetime
    transitions: int = 0
    rejections: int = 0
    errors: int = 0
    """Accepted transitions that said their step failed (`ok=False`); counted in `transitions`."""
    completions: int = 0
    p50_ms: float = 0.0
    p95_ms: float = 0.0

    @property
    def attempts(self) -> int:
        """Transition attempts, accepted or not."""
        return self.transitions + self.rejections

    @property
    def error_rate(self) -> float:
        """(Rejections + errors) / attempts (0 without attempts)."""
        return (self.rejections + self.errors) / self.attempts if self.attempts else 0.0


@dataclass(frozen=True)
class Activity:
    """A flow's activity over a window: every bucket, empty ones included, oldest first."""

    flow_id: str
    window: ActivityWindow
    buckets: list[Bucket]


def _span_for(size: int) -> int:
    """The largest bucket the tables keep that tiles buckets of `size` seconds."""
    return max(span for span in ACTIVITY_SPANS if size % span == 0)


def diagram_stats(store: FlowStore, flow_id: str) -> DiagramStats:
    """The counts a diagram is labelled with: users on each step now, entries, transitions taken."""
    funnel = store.get_flow_funnel(flow_id)
    return DiagramStats(
        current={s.step: s.current for s in funnel},
        entered={s.step: s.entered for s in funnel},
        taken=_tables(store).transition_counts(flow_id),
    )


def activity(
    store: FlowStore, flow_id: str, window: ActivityWindow, *, now: datetime | None = None
) -> Activity:
    """Transitions, rejections, errors, completions and p50/p95 response times per bucket.

    Read from the time-bucket tables (`flow_activity`, `flow_response_times`): the minute rows
    for minutes, the hour rows for hours and days, never the history.
    """
    store.get_flow(flow_id)  # FlowNotFoundError for an unknown flow
    p = _tables(store)
    a, r = p.tables.activity, p.tables.response_times
    size = window.bucket_seconds
    span = _span_for(size)
    now = now or datetime.now(UTC)
    last = int(now.timestamp()) // size
    first = last - window.seconds // size + 1
    bounds = (first * size, (last + 1) * size)
    counts = (
        select(
            (a.c.start // size).label("bucket"),
            func.sum(a.c.attempts),
            func.sum(a.c.rejections),
            func.sum(a.c.failures),
            func.sum(a.c.completions),
        )
        .where(
            a.c.flow_id == flow_id,
            a.c.span == span,
            a.c.start >= bounds[0],
            a.c.start < bounds[1],
            a.c.step == "",
        )
        .group_by("bucket")
    )
    times = (
        select((r.c.start // size).label("bucket"), r.c.bin, func.sum(r.c.attempts))
        .where(
            r.c.flow_id == flow_id,
            r.c.span == span,
            r.c.start >= bounds[0],
            r.c.start < bounds[1],
        )
        .group_by("bucket", r.c.bin)
    )
    histograms: defaultdict[int, dict[int, int]] = defaultdict(dict)
    with p._read() as conn:  # a read connection of the store's own (no write lock)
        found = {int(row[0]): tuple(int(v or 0) for v in row[1:]) for row in conn.execute(counts)}
        for at, index, n in conn.execute(times):
            histograms[int(at)][int(index)] = int(n)
    buckets = []
    for n in range(first, last + 1):
        attempts, refused, failed, completed = found.get(n, (0, 0, 0, 0))
        histogram = histograms.get(n, {})
        buckets.append(
            Bucket(
                start=datetime.fromtimestamp(n * size, UTC),
                transitions=attempts - refused,
                rejections=refused,
                errors=failed,
                completions=completed,
                p50_ms=histogram_percentile(histogram, 50),
                p95_ms=histogram_percentile(histogram, 95),
            )
        )
    return Activity(flow_id=flow_id, window=window, buckets=buckets)


DWELL_BINS: tuple[tuple[str, float], ...] = (
    ("<1s", 1_000),
    ("1-10s", 10_000),
    ("10s-1m", 60_000),
    ("1-10m", 600_000),
    ("10m-1h", 3_600_000),
    ("1h-1d", 86_400_000),
    (">1d", math.inf),
)
"""The dwell and idle histograms' bins: (label, upper bound in ms, exclusive)."""


@dataclass(frozen=True)
class Dwell:
    """How long runs stayed on one step before moving on, over the moves in a window."""

    step: str
    moves: int
    p50_ms: float
    p95_ms: float
    histogram: list[int]
    """Moves per `DWELL_BINS` bin."""
    since: datetime
    """The start of the period the moves were taken from (later than asked, when sampled)."""


DWELL_SAMPLE = 10_000
"""At most this many of the most recent moves out of a flow's steps make the stays (per page)."""


_BIN_TOPS = [high for _, high in DWELL_BINS]


def _histogram(values: Sequence[float]) -> list[int]:
    counts = [0] * len(DWELL_BINS)
    for value in values:
        counts[bisect.bisect_right(_BIN_TOPS, value)] += 1  # the first bin whose top is above it
    return counts


def dwell(
    store: FlowStore, flow_id: str, *, since: datetime, sample: int = DWELL_SAMPLE
) -> dict[str, Dwell]:
    """Per step, how long runs stayed before the transitions out of it made since `since`.

    Only the most recent `sample` transition attempts count: the stays are a sample of the
    window, and `Dwell.since` says where it starts. Each accepted transition's history row holds
    its stay (`stay_ms`, projected when it was taken), so this reads those rows alone, newest
    first along the (flow_id, timestamp) index.
    """
    store.get_flow(flow_id)  # FlowNotFoundError for an unknown flow
    p = _tables(store)
    h = p.tables.history
    newest = (
        select(h.c.from_step, h.c.stay_ms)
        .where(h.c.flow_id == flow_id, h.c.timestamp >= since, h.c.kind == "transition")
        .order_by(h.c.timestamp.desc())
    )
    per_step: defaultdict[str, list[float]] = defaultdict(list)
    with p._read() as conn:
        # Two columns of plain values (timestamps cost more to read than the rest together).
        rows = conn.execute(newest.limit(sample)).all()
        if len(rows) == sample:  # a sample: from when
            oldest = newest.with_only_columns(h.c.timestamp).offset(sample - 1).limit(1)
            since = max(since, _aware(conn.execute(oldest).scalar_one()))
    for step, ms in rows:
        if ms is not None:
            per_step[step].append(float(ms))
    return {
        step: Dwell(
            step=step,
            moves=len(values),
            p50_ms=percentile(values, 50),
            p95_ms=percentile(values, 95),
            histogram=_histogram(values),
            since=since,
        )
        for step, values in per_step.items()
    }


@dataclass(frozen=True)
class IdleChoice:
    """An idle threshold the stuck page offers."""

    key: str
    label: str
    seconds: int


IDLE_CHOICES: tuple[IdleChoice, ...] = (
    IdleChoice("5m", "5 minutes", 300),
    IdleChoice("1h", "1 hour", 3600),
    IdleChoice("1d", "1 day", 86_400),
    IdleChoice("7d", "7 days", 7 * 86_400),
)
"""Idle thresholds, shortest first."""


@dataclass(frozen=True)
class IdleStep:
    """The active runs on one step now: how many, how many idle past a threshold, since when."""

    step: str
    active: int
    idle: int
    oldest: datetime | None
    """The oldest last command among the step's active runs."""
    histogram: list[int] = field(default_factory=list)
    """Active runs per `DWELL_BINS` bin of idle time."""


def idle_by_step(
    store: FlowStore, flow_id: str, *, idle_for: timedelta, now: datetime | None = None
) -> dict[str, IdleStep]:
    """Per step, the active runs on it now and how long since their last command."""
    store.get_flow(flow_id)
    p = _tables(store)
    s = p.tables.states
    now = now or datetime.now(UTC)
    cutoff = now - idle_for
    # One pass over the flow's active runs (the covering index on flow_id, status, step,
    # updated_at): per step, how many there are and how many acted after each moment that
    # matters, the histogram's edges (newest first) and the idle cutoff.
    edges = [now - timedelta(milliseconds=high) for _, high in DWELL_BINS[:-1]]
    moments = [*edges, cutoff]
    query = (
        select(
            s.c.step,
            func.count(),
            func.min(s.c.updated_at),
            *(func.sum(cast(s.c.updated_at > moment, Integer)) for moment in moments),
        )
        .where(s.c.flow_id == flow_id, s.c.status == FlowStatus.ACTIVE.value)
        .group_by(s.c.step)
    )
    result: dict[str, IdleStep] = {}
    with p._read() as conn:
        for step, count, oldest, *after in conn.execute(query):
            newer = [int(n or 0) for n in after]
            # Bin i holds the runs past edge i - 1 but not past edge i (the last: past them all).
            bounds = [0, *newer[: len(edges)], int(count)]
            histogram = [high - low for low, high in itertools.pairwise(bounds)]
            idle = int(count) - newer[-1]
            result[step] = IdleStep(step, int(count), idle, _aware(oldest), histogram)
    return result


@dataclass(frozen=True)
class InstanceRow:
    """One run on the list of a step's users."""

    user_id: str
    step: str
    updated_at: datetime
    started_at: datetime | None


@dataclass(frozen=True)
class InstancePage:
    """A page of runs, longest idle first, and the cursor of the next page (None at the end)."""

    rows: list[InstanceRow]
    next_cursor: str | None


def _encode_cursor(row: InstanceRow) -> str:
    raw = orjson.dumps([row.updated_at.isoformat(), row.user_id])
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        at, user = orjson.loads(raw)
        moment = datetime.fromisoformat(at)
        if not isinstance(user, str) or moment.tzinfo is None:
            raise ValueError(cursor)
    except (ValueError, TypeError, binascii.Error, orjson.JSONDecodeError):
        raise InvalidArgumentError("cursor", cursor, "not a cursor this page gave") from None
    return moment, user


def list_instances(
    store: FlowStore,
    flow_id: str,
    *,
    step: str | None = None,
    status: FlowStatus = FlowStatus.ACTIVE,
    idle_for: timedelta | None = None,
    limit: int = 50,
    cursor: str | None = None,
    now: datetime | None = None,
) -> InstancePage:
    """The flow's runs with `status` (on `step`, idle at least `idle_for`), longest idle first."""
    store.get_flow(flow_id)
    p = _tables(store)
    s = p.tables.states
    conditions: list[ColumnElement[bool]] = [s.c.flow_id == flow_id, s.c.status == status.value]
    if step is not None:
        conditions.append(s.c.step == step)
    if idle_for is not None:
        conditions.append(s.c.updated_at <= (now or datetime.now(UTC)) - idle_for)
    after: ColumnElement[bool] = true()
    if cursor is not None:
        at, user = _decode_cursor(cursor)
        at = at.astimezone(UTC)
        after = or_(s.c.updated_at > at, and_(s.c.updated_at == at, s.c.user_id > user))
    query = (
        select(s.c.user_id, s.c.step, s.c.updated_at, s.c.started_at)
        .where(*conditions, after)
        .order_by(s.c.updated_at, s.c.user_id)
        .limit(limit + 1)
    )
    with p._read() as conn:
        rows = [
            InstanceRow(
                user_id=r.user_id,
                step=r.step,
                updated_at=_aware(r.updated_at),
                started_at=_aware(r.started_at) if r.started_at is not None else None,
            )
            for r in conn.execute(query)
        ]
    more = len(rows) > limit
    rows = rows[:limit]
    return InstancePage(rows, _encode_cursor(rows[-1]) if more and rows else None)


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)
