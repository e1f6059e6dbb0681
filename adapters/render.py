"""How the CLI and the demo show flowstore's models: rich tables for people, dicts for JSON."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import orjson
from pydantic import BaseModel
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from flowstore import (
    FlowDefinition,
    FlowState,
    FlowStateHistory,
    FlowStatistics,
    FlowTransition,
    FunnelStep,
)

__all__ = ["HISTORY_FIELDS", "Model", "cell", "model_view", "record", "table"]

Model = FlowDefinition | FlowState | FlowStateHistory | FlowStatistics | FunnelStep | FlowTransition
"""Everything the store answers with."""

HISTORY_FIELDS = (
    "timestamp",
    "kind",
    "transition",
    "from_step",
    "to_step",
    "success",
    "ok",
    "message",
    "error",
)
"""The fields of a history table."""


def record(model: Model) -> dict[str, Any]:
    """The model as JSON-ready data with camelCase keys (a definition in the seed's shape)."""
    if isinstance(model, FlowDefinition | FlowTransition):
        return model.to_seed()
    return model.to_dict()


def cell(value: Any) -> str:
    """One value as table text: blank for None, ✓/✗ for booleans, UTC times to the millisecond,
    the names of a mapping of models (steps), compact JSON for other mappings and lists."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "✓" if value else "✗"
    if isinstance(value, float):
        return f"{value:.3f}"
    if isinstance(value, datetime):
        return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
    if isinstance(value, dict) and value and all(isinstance(v, BaseModel) for v in value.values()):
        return ", ".join(value)
    if isinstance(value, dict | list):
        return orjson.dumps(value).decode()
    return str(value)


def _header(field: str) -> str:
    return field.replace("_", " ")


def _timely(field: str) -> bool:
    return field == "timestamp" or field.endswith("_at")


def table(items: Sequence[Model], fields: Sequence[str], *, title: str | None = None) -> Table:
    """Models of one kind as a table: a row each, a column for each of the named fields."""
    out = Table(title=title, title_justify="left")
    for field in fields:
        out.add_column(_header(field), no_wrap=_timely(field))
    for item in items:
        out.add_row(*(cell(getattr(item, field)) for field in fields))
    return out


def _fields(model: Model, *, title: str | None = None) -> Table:
    out = Table(title=title, title_justify="left", show_header=False)
    out.add_column(style="bold", no_wrap=True)
    out.add_column()
    for field in type(model).model_fields:
        out.add_row(_header(field), cell(getattr(model, field)))
    return out


def _definition(definition: FlowDefinition) -> Table:
    title = f"{definition.flow} v{definition.version} (initial step: {definition.initial_step})"
    out = Table(title=title, title_justify="left")
    for column in ("index", "step", "service", "module", "transitions"):
        out.add_column(column)
    for step in sorted(definition.steps.values(), key=lambda s: s.index):
        moves = ", ".join(f"{t.transition} → {t.step}" for t in step.transitions.values())
        out.add_row(str(step.index), step.step, step.service, step.module or "", moves or "(end)")
    return out


def _statistics(stats: FlowStatistics, title: str) -> Group:
    perf = stats.performance_metrics
    summary = Table(show_header=False)
    summary.add_column(style="bold")
    summary.add_column(justify="right")
    for label, value in (
        ("Total flows", str(stats.total_flows)),
        ("Active users", str(stats.active_users)),
        ("Completion rate", f"{stats.completion_rate:.1%}"),
        ("Average duration", f"{stats.average_flow_duration:.1f} ms"),
        ("Error rate", f"{stats.error_rate:.1%}"),
        ("Average response time", f"{perf.average_response_time:.3f} ms"),
        ("p95 response time", f"{perf.p95_response_time:.3f} ms"),
        ("Throughput", f"{perf.throughput_per_second:.1f} /s"),
    ):
        summary.add_row(label, value)
    steps = Table(title="Popular steps", title_justify="left")
    steps.add_column("step")
    steps.add_column("entries", justify="right")
    for entry in stats.popular_steps:
        steps.add_row(entry.step, str(entry.count))
    return Group(Text(title, style="bold"), summary, steps)


def model_view(model: Model, *, title: str | None = None) -> RenderableType:
    """One model for people: a definition's steps, statistics, or a field/value table."""
    if isinstance(model, FlowDefinition):
        return _definition(model)
    if isinstance(model, FlowStatistics):
        return _statistics(model, title or "Statistics")
    return _fields(model, title=title)
