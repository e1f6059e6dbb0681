"""The read-model tables, in the same database as the event log (SQLAlchemy 2 Core).

`define_tables(suffix)` builds the whole set; the live tables have no suffix and a rebuild fills a
twin set (`flow_states__rebuild`, ...) before swapping it in. Every table here is disposable: the log
can always rebuild it.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import (
    JSON,
    Boolean,
    Column,
    DateTime,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
)

__all__ = [
    "LAYOUT",
    "REBUILD_SUFFIX",
    "TRACKING",
    "ProjectionTables",
    "define_tables",
    "layout_of",
    "tracking_metadata",
    "tracking_name",
]

LAYOUT = 1
"""The layout `define_tables` builds: raise it with every change of a table, column or index.

The layout is recorded in the tracking row's name (`tracking_name`), so that a process reading
another layout finds no row of its own and says so (`ProjectionLayoutError`) rather than reading
or writing tables it does not know; `flowstore projections migrate` moves the tables from one
layout to the next without stopping the processes that serve the old one.
"""

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

    @property
    def all(self) -> list[Table]:
        """Every table of the set, parents first."""
        return [self.states, self.history, self.counters, self.steps, self.samples, self.throughput]


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
        Index(f"ix_flow_states{suffix}_flow_status", "flow_id", "status"),
        Index(f"ix_flow_states{suffix}_expiry", "status", "expires_at"),
        Index(f"ix_flow_states{suffix}_instance", "instance_id"),
    )
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
        # Per-flow scans: transition counts for diagrams, a flow's history for exports.
        Index(f"ix_flow_history{suffix}_flow_kind", "flow_id", "kind"),
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
    )
    # Attempts per flow per second of event time, for throughput over a recent window.
    throughput = Table(
        f"flow_throughput{suffix}",
        md,
        Column("flow_id", _ID, primary_key=True),
        Column("second", Integer, primary_key=True),
        Column("attempts", Integer, nullable=False, default=0),
    )
    return ProjectionTables(md, states, history, counters, steps, samples, throughput)


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
    """The tracking row of the tables at `layout` (layout 1 keeps the name releases before used)."""
    return _NAME if layout == 1 else f"{_NAME}.v{layout}"


def layout_of(name: str) -> int | None:
    """The layout a tracking row's name records (None: not a row of these tables)."""
    if name == _NAME:
        return 1
    prefix = f"{_NAME}.v"
    if name.startswith(prefix) and name[len(prefix) :].isdigit():
        return int(name[len(prefix) :])
    return None
