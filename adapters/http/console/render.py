"""What the console's pages show that is more than a value: diagrams, and figures in words.

A flow's diagram is the store's DOT text with statistics (`store.diagram(..., stats=True)`), its steps
filled by how many users are on them now (darker: more), rendered to inline SVG by Graphviz; without
Graphviz, the page shows the Mermaid text instead.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

from markupsafe import Markup

from flowstore import FlowStore
from flowstore.adapters.diagrams import graphviz_available, render_dot

__all__ = [
    "HEAT",
    "Diagram",
    "coloured_dot",
    "duration",
    "flow_diagram",
    "heat_level",
    "legend",
    "percent",
]

HEAT: tuple[str, ...] = ("#ffffff", "#e3ecf7", "#c6d9ef", "#a4c3e6", "#7fa9db")
"""Step fills from no users to the most users; black text keeps over 7:1 contrast on each."""


@dataclass(frozen=True)
class Diagram:
    """A flow diagram for a page: inline SVG when Graphviz is there, else Mermaid text."""

    svg: Markup | None
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


def _dot_id(value: str) -> str:
    # As flowstore.diagrams quotes node ids, so these statements name the same nodes.
    cleaned = value.replace("\\", "\\\\").replace('"', '\\"')
    return '"' + cleaned.replace("\n", " ").replace("\r", " ") + '"'


def coloured_dot(dot_text: str, current: Mapping[str, int]) -> str:
    """The DOT text with each step filled by how many users are on it now."""
    most = max(current.values(), default=0)
    lines = ['    bgcolor="transparent";']
    for step, count in current.items():
        fill = HEAT[heat_level(count, most)]
        lines.append(f'    {_dot_id(step)} [style="rounded,filled", fillcolor="{fill}"];')
    head, _, _ = dot_text.rstrip().rpartition("}")
    return head + "\n".join(lines) + "\n}\n"


_SVG_START = re.compile(r"<svg\b")


def _inline(svg: bytes, label: str) -> Markup:
    text = svg.decode()
    start = _SVG_START.search(text)
    if start is None:
        raise RuntimeError("Graphviz produced no <svg> element")
    text = text[start.start() :]
    label = Markup.escape(label)
    # Graphviz writes the size in points; the stylesheet lets it scale down to the page instead.
    text = _SVG_START.sub(f'<svg role="img" aria-label="{label}" focusable="false"', text, count=1)
    return Markup(text)  # Graphviz's own output of our DOT text: it escapes the labels


def flow_diagram(
    store: FlowStore, flow_id: str, version: int | None, current: Mapping[str, int]
) -> Diagram:
    """The flow's diagram with statistics, for version `version` (the latest when None)."""
    dot_text = store.diagram(flow_id, "dot", stats=True, version=version)
    mermaid = store.diagram(flow_id, "mermaid", stats=True, version=version)
    svg = None
    if graphviz_available():
        label = f"State diagram of {flow_id}: steps with the users on them now, transitions with how many took them"
        svg = _inline(render_dot(coloured_dot(dot_text, current), "svg"), label)
    return Diagram(svg=svg, mermaid=mermaid, dot=dot_text)


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
