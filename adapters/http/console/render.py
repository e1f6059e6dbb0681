"""What the console's pages show that is more than a value: diagrams, and figures in words.

A flow's diagram is drawn by the server itself (`flowstore.diagram_svg`, a layered layout in pure
Python): the same picture whether or not Graphviz is installed. Steps are filled by how many users
are on them now (darker: more); transitions carry how many runs took them and the drop-off. The
Mermaid and DOT text stay on the page for pasting elsewhere.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from markupsafe import Markup

from flowstore import FlowDefinition, FlowStore
from flowstore.adapters.http.console.charts import Series, bar_chart, line_chart
from flowstore.adapters.http.console.insights import (
    DWELL_BINS,
    Activity,
    Dwell,
    IdleChoice,
    IdleStep,
    InstancePage,
    diagram_stats,
    dwell,
    idle_by_step,
    list_instances,
)
from flowstore.diagram_svg import svg as flow_svg
from flowstore.diagrams import dot, mermaid

__all__ = [
    "DWELL_WINDOW",
    "HEAT",
    "Chart",
    "Diagram",
    "StuckReport",
    "StuckStep",
    "activity_charts",
    "duration",
    "flow_diagram",
    "heat_level",
    "legend",
    "percent",
    "stuck_report",
]

HEAT: tuple[str, ...] = ("#ffffff", "#e3ecf7", "#c6d9ef", "#a4c3e6", "#7fa9db")
"""Step fills from no users to the most users; black text keeps over 7:1 contrast on each."""


@dataclass(frozen=True)
class Diagram:
    """A flow diagram for a page: inline SVG drawn by the server, and its Mermaid and DOT text."""

    svg: Markup
    mermaid: str
    dot: str


def heat_level(count: int, most: int) -> int:
    """Which `HEAT` colour a step with `count` users gets when the busiest step has `most`."""
    if count <= 0 or most <= 0:
        return 0
    return max(1, math.ceil(count / most * (len(HEAT) - 1)))


def legend(most: int) -> list[tuple[str, str]]:
    """(colour, "what it means") for each `HEAT` level in use when the busiest step has `most`."""
    entries = [(HEAT[0], "no users now")]
    levels = len(HEAT) - 1
    for level in range(1, levels + 1):
        low = math.floor((level - 1) / levels * most) + 1
        high = math.floor(level / levels * most)
        if high >= low:
            entries.append(
                (HEAT[level], _users(low) if low == high else f"{low} to {high} users now")
            )
    return entries


def _users(count: int) -> str:
    return f"{count} user now" if count == 1 else f"{count} users now"


def flow_diagram(
    store: FlowStore, flow_id: str, version: int | None, current: Mapping[str, int]
) -> Diagram:
    """The flow's diagram with statistics, for version `version` (the latest when None)."""
    definition = store.get_flow(flow_id, version)
    stats = diagram_stats(store, flow_id)
    most = max(current.values(), default=0)
    fills = {step: HEAT[heat_level(count, most)] for step, count in current.items()}
    label = (
        f"State diagram of {flow_id}: steps with the users on them now, "
        "transitions with how many took them"
    )
    picture = flow_svg(definition, stats, fills=fills, label=label, id_prefix="diagram")
    # flow_svg escapes every text it writes (step and transition names come from users).
    return Diagram(
        svg=Markup(picture), mermaid=mermaid(definition, stats), dot=dot(definition, stats)
    )


def percent(value: float) -> str:
    """A share (0..1) as a percentage with one decimal: 0.4567 -> "45.7%"."""
    return f"{value * 100:.1f}%"


def duration(ms: float) -> str:
    """Milliseconds in the unit that reads best: "850 ms", "12.3 s", "4 min 5 s", "2 h 3 min"."""
    if ms < 1000:
        return f"{ms:.0f} ms" if ms >= 10 or ms == 0 else f"{ms:.2f} ms"
    seconds = ms / 1000
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, seconds = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {seconds} s"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours} h {minutes} min"
    days, hours = divmod(hours, 24)
    return f"{days} d {hours} h"


_TIME_FORMATS = {"minute": "%H:%M", "hour": "%H:%M", "day": "%m-%d"}


@dataclass(frozen=True)
class Chart:
    """A chart for a page: its heading, the SVG, and the series it draws (for the table)."""

    key: str
    title: str
    svg: Markup
    series: list[Series]
    format: str
    """How the table writes values: "count", "percent" or "duration"."""


def _count(value: float) -> str:
    return f"{value:g}"


def activity_charts(figures: Activity) -> list[Chart]:
    """The activity page's charts: counts, error rate and response times per bucket."""
    window, buckets = figures.window, figures.buckets
    starts = [b.start for b in buckets]
    fmt = _TIME_FORMATS[window.bucket_label]
    if window.bucket_label == "hour" and window.seconds > 86_400:
        fmt = "%m-%d %H:00"
    per = f"per {window.bucket_label}"
    counts = [
        Series("transitions", "transitions", [b.transitions for b in buckets], "#3b6fb6"),
        Series("rejections", "rejections", [b.rejections for b in buckets], "#c05621", "6,3"),
        Series("errors", "errors (ok=false)", [b.errors for b in buckets], "#a4221a", "1,3"),
        Series("completions", "completions", [b.completions for b in buckets], "#2f855a", "2,2"),
    ]
    # Rates and response times exist only where there were attempts: elsewhere the line breaks.
    tried = [b.attempts > 0 for b in buckets]
    errors = [
        Series(
            "error_rate",
            "error rate",
            [b.error_rate if t else None for b, t in zip(buckets, tried, strict=True)],
            "#a4221a",
        )
    ]
    times = [
        Series(
            "p50",
            "p50",
            [b.p50_ms if t else None for b, t in zip(buckets, tried, strict=True)],
            "#3b6fb6",
        ),
        Series(
            "p95",
            "p95",
            [b.p95_ms if t else None for b, t in zip(buckets, tried, strict=True)],
            "#6b4fbb",
            "6,3",
        ),
    ]
    specs: list[tuple[str, str, list[Series], str, Callable[[float], str]]] = [
        (
            "counts",
            f"Transitions, rejections, errors and completions {per}",
            counts,
            "count",
            _count,
        ),
        (
            "errors",
            f"Error rate {per} (rejections and errors, as a share of attempts)",
            errors,
            "percent",
            percent,
        ),
        ("times", f"Response time {per}: p50 and p95", times, "duration", duration),
    ]
    return [
        Chart(
            key,
            title,
            line_chart(
                f"{title}, {figures.flow_id}, {window.label.lower()}",
                starts,
                series,
                time_format=fmt,
                value_format=formatter,
                chart_id=f"chart-{key}",
            ),
            series,
            kind,
        )
        for key, title, series, kind, formatter in specs
    ]


DWELL_WINDOW = timedelta(days=7)
"""How far back the stuck page looks at moves out of each step."""


@dataclass(frozen=True)
class StuckStep:
    """One step on the stuck page: how long runs stayed there, and who is idle there now."""

    step: str
    dwell: Dwell | None
    idle: IdleStep | None
    chart: Markup

    @property
    def active(self) -> int:
        """Active runs on the step now."""
        return self.idle.active if self.idle else 0

    @property
    def idle_count(self) -> int:
        """Active runs on the step idle past the chosen threshold."""
        return self.idle.idle if self.idle else 0


@dataclass(frozen=True)
class StuckReport:
    """What the stuck page shows for a flow."""

    definition: FlowDefinition
    idle: IdleChoice
    since: datetime
    now: datetime
    steps: list[StuckStep]
    selected: str | None
    page: InstancePage | None
    bins: list[str] = field(default_factory=lambda: [label for label, _ in DWELL_BINS])


def stuck_report(
    store: FlowStore,
    flow_id: str,
    idle: IdleChoice,
    *,
    step: str | None = None,
    cursor: str | None = None,
    now: datetime | None = None,
) -> StuckReport:
    """Per non-terminal step: dwell before moving on, idle runs now; the idle runs of `step`."""
    definition = store.get_flow(flow_id)
    now = now or datetime.now(UTC)
    since = now - DWELL_WINDOW
    idle_for = timedelta(seconds=idle.seconds)
    stays = dwell(store, flow_id, since=since)
    idling = idle_by_step(store, flow_id, idle_for=idle_for, now=now)
    names = [s.step for s in sorted(definition.steps.values(), key=lambda s: (s.index, s.step))]
    names += sorted((set(stays) | set(idling)) - set(names))  # steps of older versions
    steps: list[StuckStep] = []
    for name in names:
        found = definition.step(name)
        if found is not None and found.is_terminal:
            continue  # nobody waits on a terminal step: reaching it completes the run
        stay = stays.get(name)
        steps.append(
            StuckStep(
                step=name,
                dwell=stay,
                idle=idling.get(name),
                chart=bar_chart(
                    f"Time on {name} before moving on, runs per bin",
                    [label for label, _ in DWELL_BINS],
                    stay.histogram if stay else [0] * len(DWELL_BINS),
                    colour="#3b6fb6",
                    chart_id=f"dwell-{len(steps)}",
                ),
            )
        )
    # The stays may be a sample of the latest moves (insights.DWELL_SAMPLE): say from when.
    since = min((d.since for d in stays.values()), default=since)
    page = None
    if step is not None:
        page = list_instances(
            store, flow_id, step=step, idle_for=idle_for, limit=50, cursor=cursor, now=now
        )
    return StuckReport(definition, idle, since, now, steps, step, page)
