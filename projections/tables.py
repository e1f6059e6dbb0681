"""The read-model tables, in the same database as the event log (SQLAlchemy 2 Core).

`define_tables(suffix)` builds the whole set; the live tables have no suffix and a rebuild fills a
twin set (`flow_states__rebuild`, ...) before swapping it in. Every table here is disposable: the log
can always rebuild it.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Float,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
)

from flowstore.projections.ops import ACTIVITY_COLUMNS

__all__ = [
    "LAYOUT",
    "LAYOUT_ROW",
    "QUARANTINE",
    "REBUILD_SUFFIX",
    "TRACKING",
    "UNREADABLE",
    "ProjectionTables",
    "define_tables",
    "layout_of",
    "tracking_metadata",
    "tracking_name",
]

LAYOUT = 3
"""The tables' layout version: raise it with every change of a table, column, index or of what a
row holds. 2: history steps and transition as "" rather than NULL (the seed's strings), a rejected
attempt's `to_step` is the step the user stayed on; `flow_activity`;
`flow_response_samples.second`; the `flow_states` index for `list_instances`. 3: `flow_activity`
by minute and by hour (`span`, `start`) with `completions`; `flow_response_times`;
`flow_transitions`; `flow_states.entered_at` and its idle index; `flow_history.stay_ms`; no
(flow_id, kind) index on history.

The layout is recorded in the tracking table (the `LAYOUT_ROW` row, and from layout 3 on in the
name of the position's row, `tracking_name`), so that a process reading another layout says so
(`ProjectionLayoutError`) rather than reading or writing tables it does not know. Opening a store
never drops or rebuilds tables: `flowstore projections migrate` moves them from one layout to the
next while the processes that serve the old one carry on (see `SqlProjections.migrate`).
"""

LAYOUT_ROW = "flowstore.layout"
"""The tracking row whose `position` holds the tables' layout (not a log position)."""


REBUILD_SUFFIX = "__rebuild"
_ID = String(256)


@dataclass(frozen=True)
class ProjectionTables:
    """One complete set of read-model tables (live or being rebuilt)."""

    metadata: MetaData
    states: Table
    history: Table
    counters: Table
    steps: Table
    samples: Table
    throughput: Table
    activity: Table
    response_times: Table
    transitions: Table

    @property
    def all(self) -> list[Table]:
        """Every table of the set, parents first."""
        return [
            self.states,
            self.history,
            self.counters,
            self.steps,
            self.samples,
            self.throughput,
            self.activity,
            self.response_times,
            self.transitions,
        ]


def define_tables(suffix: str = "") -> ProjectionTables:
    """The table set, named with `suffix` (empty for the live tables)."""
    md = MetaData()
    states = Table(
        f"flow_states{suffix}",
        md,
        Column("user_id", _ID, primary_key=True),
        Column("flow_id", _ID, primary_key=True),
        # The aggregate's id: what an erasure deletes by, whatever user id its events read with.
        Column("instance_id", String(36), nullable=False),
        Column("step", _ID, nullable=True),
        Column("service", _ID, nullable=True),
        Column("ok", Boolean, nullable=False),
        Column("payload", JSON, nullable=True),
        Column("status", String(16), nullable=False),
        Column("definition_version", Integer, nullable=False),
        Column("version", Integer, nullable=False),
        Column("started_at", DateTime(timezone=True), nullable=True),
        Column("updated_at", DateTime(timezone=True), nullable=False),
        Column("completed_at", DateTime(timezone=True), nullable=True),
        Column("expires_at", DateTime(timezone=True), nullable=True),
        # The OwlMeans model's fields (entity id and message are personal: erasure deletes the row).
        Column("previous", _ID, nullable=True),
        Column("entity_id", _ID, nullable=True),
        Column("message", String, nullable=True),
        # When the run came to its step (the last accepted command that put it on one): a
        # transition out of the step records the stay (`flow_history.stay_ms`).
        Column("entered_at", DateTime(timezone=True), nullable=True),
        Index(f"ix_flow_states{suffix}_flow_status", "flow_id", "status"),
        Index(f"ix_flow_states{suffix}_expiry", "status", "expires_at"),
        Index(f"ix_flow_states{suffix}_instance", "instance_id"),
        # list_instances: a flow's instances at a step and status, paged by user id; idle_for
        # filters on updated_at along the same index entries.
        Index(
            f"ix_flow_states{suffix}_flow_step",
            "flow_id",
            "status",
            "step",
            "user_id",
            "updated_at",
        ),
        # The console's idle runs of a step, longest idle first (a page without sorting them all).
        Index(
            f"ix_flow_states{suffix}_flow_idle",
            "flow_id",
            "status",
            "step",
            "updated_at",
            "user_id",
        ),
    )
    # On SQLite, a rebuild fills its history table without this key (`_without_key` in
    # `flowstore.projections.rebuild`) and gives it the key at the swap, as a unique index on
    # the same columns (`_key_index_ddl`).
    history = Table(
        f"flow_history{suffix}",
        md,
        Column("user_id", _ID, primary_key=True),
        Column("flow_id", _ID, primary_key=True),
        Column("version", Integer, primary_key=True),
        Column("instance_id", String(36), nullable=False),
        Column("id", String(80), nullable=False),
        Column("kind", String(16), nullable=False),
        Column("from_step", _ID, nullable=True),
        Column("to_step", _ID, nullable=True),
        Column("transition", _ID, nullable=True),
        Column("payload", JSON, nullable=True),
        Column("timestamp", DateTime(timezone=True), nullable=False),
        Column("success", Boolean, nullable=False),
        Column("error", String, nullable=True),
        Column("meta", JSON, nullable=False),
        Column("ok", Boolean, nullable=True),
        Column("message", String, nullable=True),
        # A transition taken: how long the run had stayed on the step it left, in ms.
        Column("stay_ms", Float, nullable=True),
        # A flow's latest rows (the console's stays: the newest moves, walked backwards).
        Index(f"ix_flow_history{suffix}_flow_time", "flow_id", "timestamp"),
        Index(f"ix_flow_history{suffix}_instance", "instance_id"),
    )
    counters = Table(
        f"flow_counters{suffix}",
        md,
        Column("flow_id", _ID, primary_key=True),
        Column("started", Integer, nullable=False, default=0),
        Column("completed", Integer, nullable=False, default=0),
        Column("expired", Integer, nullable=False, default=0),
        Column("attempts", Integer, nullable=False, default=0),
        Column("rejections", Integer, nullable=False, default=0),
        # Transitions taken with ok=False: the step was reached but its work failed (an error too).
        Column("failures", Integer, nullable=False, default=0),
        Column("completed_duration_ms", Float, nullable=False, default=0.0),
        Column("response_ms_total", Float, nullable=False, default=0.0),
    )
    steps = Table(
        f"flow_step_counters{suffix}",
        md,
        Column("flow_id", _ID, primary_key=True),
        Column("step", _ID, primary_key=True),
        Column("entered", Integer, nullable=False, default=0),
        Column("moved_on", Integer, nullable=False, default=0),
        Column("dropped", Integer, nullable=False, default=0),
    )
    # The most recent response times per flow, in a ring of SAMPLE_SLOTS rows (slot = attempt % N),
    # so the p95 is exact over a bounded, recent window without reading history.
    samples = Table(
        f"flow_response_samples{suffix}",
        md,
        Column("flow_id", _ID, primary_key=True),
        Column("slot", Integer, primary_key=True),
        Column("elapsed_ms", Float, nullable=False),
        # When the attempt was made (epoch second): the p95 of a time window uses the ring's
        # samples that fall in it.
        Column("second", Integer, nullable=False),
    )
    # Attempts per flow per second of event time, for throughput over a recent window.
    throughput = Table(
        f"flow_throughput{suffix}",
        md,
        Column("flow_id", _ID, primary_key=True),
        Column("second", Integer, primary_key=True),
        Column("attempts", Integer, nullable=False, default=0),
    )
    # Statistics, the funnel and the console's charts over a time window: the counters and step
    # counters again, per flow, time bucket (a minute and an hour: `ACTIVITY_SPANS`) and step (""
    # for the flow's own counts). Runs count in the bucket they started (their `completed` and its
    # duration too; `completions` when they happened), attempts and steps in the bucket they
    # happened. Kept for good: a row per flow, bucket and step that saw anything.
    activity = Table(
        f"flow_activity{suffix}",
        md,
        Column("flow_id", _ID, primary_key=True),
        Column("span", Integer, primary_key=True),
        Column("start", BigInteger, primary_key=True),
        Column("step", _ID, primary_key=True),
        *(
            Column(
                name,
                Float if name.endswith(("_ms", "_total")) else Integer,
                nullable=False,
                default=0,
            )
            for name in ACTIVITY_COLUMNS
        ),
        Index(f"ix_flow_activity{suffix}_span_start", "span", "start"),
    )
    # Response times per flow and time bucket as a log-scale histogram (`ops.response_bin`): the
    # buckets of a window merge into one, which gives its p50/p95 to within 4.4%.
    response_times = Table(
        f"flow_response_times{suffix}",
        md,
        Column("flow_id", _ID, primary_key=True),
        Column("span", Integer, primary_key=True),
        Column("start", BigInteger, primary_key=True),
        Column("bin", Integer, primary_key=True),
        Column("attempts", Integer, nullable=False, default=0),
    )
    # Accepted transitions per flow, step left and transition name: the diagram's labels.
    transitions = Table(
        f"flow_transitions{suffix}",
        md,
        Column("flow_id", _ID, primary_key=True),
        Column("from_step", _ID, primary_key=True),
        Column("transition", _ID, primary_key=True),
        Column("taken", Integer, nullable=False, default=0),
    )
    return ProjectionTables(
        md,
        states,
        history,
        counters,
        steps,
        samples,
        throughput,
        activity,
        response_times,
        transitions,
    )


tracking_metadata = MetaData()
TRACKING = Table(
    "projection_tracking",
    tracking_metadata,
    Column("name", String(64), primary_key=True),
    Column("position", Integer, nullable=False),
)
"""One row per projection: the notification id of the last event applied (same transaction)."""

_NAME = "flowstore"


def tracking_name(layout: int) -> str:
    """The row holding the position of the tables at `layout`.

    Layouts 1 and 2 share the name releases before layouts used; later ones have their own, so
    that once a migration has replaced a layout's tables, its processes find no row to move.
    """
    return _NAME if layout <= 2 else f"{_NAME}.v{layout}"


def layout_of(name: str) -> int | None:
    """The (lowest) layout whose position row `name` is (None: not a position row)."""
    if name == _NAME:
        return 1
    prefix = f"{_NAME}.v"
    if name.startswith(prefix) and name[len(prefix) :].isdigit():
        return int(name[len(prefix) :])
    return None


UNREADABLE = Table(
    "projection_unreadable",
    tracking_metadata,
    Column("position", BigInteger, primary_key=True),
    Column("originator_id", String(64), nullable=False),
    Column("originator_version", Integer, nullable=False),
    Column("detail", Text, nullable=False),
)
"""Events of the log the projections could not decode and skipped (`flowstore projections status`
names them; `flowstore quarantine` moves one aside). Written with the rows, in the same transaction."""

QUARANTINE = Table(
    "flowstore_quarantine",
    tracking_metadata,
    Column("position", BigInteger, primary_key=True),
    Column("originator_id", String(64), nullable=False),
    Column("originator_version", Integer, nullable=False),
    Column("topic", Text, nullable=False),
    Column("state", LargeBinary, nullable=False),
    Column("reason", Text, nullable=False),
    Column("quarantined_at", DateTime(timezone=True), nullable=False),
)
"""The audit record of `flowstore quarantine`: each event moved out of the log, byte for byte, with
why and when (the row can be put back by hand)."""
