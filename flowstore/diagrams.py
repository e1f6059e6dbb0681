"""A flow definition as a state diagram: Mermaid `stateDiagram-v2` or Graphviz DOT text.

Pure functions of a definition and (optionally) usage counts; no I/O. `FlowStore.diagram` feeds
them the counts from the statistics tables, and `flowstore.adapters.diagrams` renders DOT to SVG or PNG.

With statistics, each step is labelled with the users on it now, and each transition with how many
runs took it and its drop-off: the share of entries into the transition's source step that did not
leave by this transition (for a step with one way out, the classic funnel drop-off between the two
steps; for a branching step, the other branches count as not taking this one).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from flowstore.definitions import FlowDefinition, FlowStep

__all__ = ["DIAGRAM_FORMATS", "DiagramFormat", "DiagramStats", "dot", "mermaid", "text_diagram"]

DiagramFormat = Literal["mermaid", "dot"]
DIAGRAM_FORMATS: tuple[DiagramFormat, ...] = ("mermaid", "dot")
"""The text formats; SVG and PNG are DOT rendered by Graphviz (`flowstore.adapters.diagrams`)."""


@dataclass(frozen=True)
class DiagramStats:
    """Usage counts to label a diagram with (all versions of the flow together)."""

    current: Mapping[str, int] = field(default_factory=dict)
    """Active instances on each step now."""
    entered: Mapping[str, int] = field(default_factory=dict)
    """Entries into each step so far."""
    taken: Mapping[tuple[str, str], int] = field(default_factory=dict)
    """Accepted transitions so far, per (from_step, transition)."""

    def step_label(self, step: str) -> str:
        """`N now` for a step."""
        return f"{self.current.get(step, 0)} now"

    def transition_label(self, step: str, transition: str) -> str:
        """`N took it, D% drop-off` for a transition (no percentage before anyone entered)."""
        took = self.taken.get((step, transition), 0)
        entered = self.entered.get(step, 0)
        if not entered:
            return f"{took} took it"
        drop = max(0.0, 1 - took / entered)
        return f"{took} took it, {drop:.0%} drop-off"


def _ordered(definition: FlowDefinition) -> list[FlowStep]:
    return sorted(definition.steps.values(), key=lambda step: (step.index, step.step))


# Mermaid: state ids are generated (s0, s1, ...) and names go in `state "name" as id`, because
# step names may hold characters Mermaid ids cannot. Labels escape Mermaid's special characters
# with its entity codes (#quot; #59; ...).
_MERMAID_ESCAPES = {
    "#": "#35;",
    '"': "#quot;",
    ";": "#59;",
    ":": "#58;",
    "<": "#lt;",
    ">": "#gt;",
    "\n": " ",
    "\r": " ",
}


def _mermaid_text(value: str) -> str:
    return "".join(_MERMAID_ESCAPES.get(char, char) for char in value)


def mermaid(definition: FlowDefinition, stats: DiagramStats | None = None) -> str:
    """The flow as Mermaid `stateDiagram-v2` text (one statement per line)."""
    steps = _ordered(definition)
    ids = {step.step: f"s{i}" for i, step in enumerate(steps)}
    lines = ["stateDiagram-v2"]
    for step in steps:
        lines.append(f'    state "{_mermaid_text(step.step)}" as {ids[step.step]}')
        if stats is not None:
            lines.append(f"    {ids[step.step]} : {_mermaid_text(stats.step_label(step.step))}")
    lines.append(f"    [*] --> {ids[definition.initial_step]}")
    for step in steps:
        for name, transition in step.transitions.items():
            label = name
            if stats is not None:
                label = f"{name} ({stats.transition_label(step.step, name)})"
            lines.append(
                f"    {ids[step.step]} --> {ids[transition.step]} : {_mermaid_text(label)}"
            )
        if step.is_terminal:
            lines.append(f"    {ids[step.step]} --> [*]")
    return "\n".join(lines) + "\n"


def _dot_escape(value: str) -> str:
    # DOT's quoted strings escape only the double quote; backslashes would start escapes such as
    # \n in labels, so they are doubled, and raw line breaks become spaces.
    cleaned = value.replace("\\", "\\\\").replace('"', '\\"')
    return cleaned.replace("\n", " ").replace("\r", " ")


def _dot_string(*lines: str) -> str:
    """A quoted DOT string; several lines are joined with DOT's \\n line break."""
    return '"' + "\\n".join(_dot_escape(line) for line in lines) + '"'


def dot(definition: FlowDefinition, stats: DiagramStats | None = None) -> str:
    """The flow as Graphviz DOT text: a point for the start, terminal steps with a double border."""
    start = "__start__"
    while start in definition.steps:  # node ids share one namespace with the step names
        start += "_"
    lines = [
        f"digraph {_dot_string(definition.flow)} {{",
        "    rankdir=LR;",
        '    node [shape=box, style=rounded, fontname="Helvetica"];',
        '    edge [fontname="Helvetica", fontsize=10];',
        f'    {_dot_string(start)} [shape=point, width=0.15, label=""];',
    ]
    steps = _ordered(definition)
    for step in steps:
        attributes = []
        if stats is not None:
            attributes.append(f"label={_dot_string(step.step, stats.step_label(step.step))}")
        if step.is_terminal:
            attributes.append("peripheries=2")
        suffix = f" [{', '.join(attributes)}]" if attributes else ""
        lines.append(f"    {_dot_string(step.step)}{suffix};")
    lines.append(f"    {_dot_string(start)} -> {_dot_string(definition.initial_step)};")
    for step in steps:
        for name, transition in step.transitions.items():
            label = [name] if stats is None else [name, stats.transition_label(step.step, name)]
            lines.append(
                f"    {_dot_string(step.step)} -> {_dot_string(transition.step)} "
                f"[label={_dot_string(*label)}];"
            )
    lines.append("}")
    return "\n".join(lines) + "\n"


def text_diagram(
    definition: FlowDefinition, fmt: DiagramFormat = "mermaid", stats: DiagramStats | None = None
) -> str:
    """The diagram in `fmt` ("mermaid" or "dot")."""
    if fmt == "mermaid":
        return mermaid(definition, stats)
    if fmt == "dot":
        return dot(definition, stats)
    msg = f"unknown diagram format {fmt!r}; expected one of {', '.join(DIAGRAM_FORMATS)}"
    raise ValueError(msg)
