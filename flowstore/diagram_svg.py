"""A flow definition drawn as SVG by a layered (Sugiyama-style) layout in pure Python.

No Graphviz and no I/O: `layout` places the steps and routes the transitions, `svg` writes the
picture. The layout runs left to right like `dot -Grankdir=LR`:

1. Ranks: a breadth-first search from the initial step gives each step its distance from the start
   (steps the search cannot reach continue from the lowest unranked index, one rank after the
   last). A depth-first search in the same order finds the *back edges*: transitions to a step still
   on the search path, which close a loop in the flow. Every other transition then pushes its target
   at least one rank past its source (longest path), so the way forward always points right.
2. Forward transitions that span several ranks pass through one virtual point per rank crossed, so
   they take part in the ordering and bend around the steps in between.
3. Order within ranks: start from the steps' indexes, then sweep right and left a few times placing
   each step at the barycenter (mean position) of its neighbours in the previous rank; the order
   with the fewest crossings wins.
4. Back edges are not ordered: they are drawn dashed, as arcs under the steps they pass, so a loop
   reads differently from the way forward.

Every text in the SVG (step and transition names come from users) is escaped.
"""

from __future__ import annotations

import html
import itertools
import re
from collections import defaultdict, deque
from collections.abc import Mapping
from dataclasses import dataclass, field

from flowstore.definitions import FlowDefinition
from flowstore.diagrams import DiagramStats

__all__ = ["Edge", "Layout", "Node", "crossings", "layout", "svg"]

_FONT = 13.0
_SMALL = 11.0
_CHAR = 0.6  # average glyph width as a share of the font size (Helvetica-like sans-serif)
_PAD_X = 12.0
_NODE_H = 44.0
_ROW_GAP = 44.0
_RANK_GAP = 48.0  # the least room between two ranks, before labels widen it
_MARGIN = 16.0
_START_R = 6.0
_SWEEPS = 8
_LABEL_H = 28.0
_BOLD = ' font-weight="600"'


@dataclass
class Node:
    """A step placed on the canvas: its rank, its order in the rank, and its box."""

    step: str
    rank: int
    order: int = 0
    x: float = 0.0
    y: float = 0.0
    width: float = 0.0
    height: float = _NODE_H
    terminal: bool = False


@dataclass
class Edge:
    """A transition routed through `points` (centre of the source to centre of the target)."""

    source: str
    transition: str
    target: str
    back: bool
    points: list[tuple[float, float]] = field(default_factory=list)
    label_at: tuple[float, float] = (0.0, 0.0)


@dataclass
class Layout:
    """Where everything goes: steps, transitions, the start point, and the canvas size."""

    nodes: dict[str, Node]
    edges: list[Edge]
    start: tuple[float, float]
    width: float
    height: float
    ranks: list[list[str]]
    """Each rank's members top to bottom, virtual points (`\\0` + a number) included."""


def _text_width(text: str, size: float = _FONT) -> float:
    return len(text) * size * _CHAR


def _ranks(definition: FlowDefinition) -> tuple[dict[str, int], set[tuple[str, str]]]:
    """Each step's rank, and the transitions (source, target) that loop back.

    Breadth-first distance from the initial step first (unreachable steps continue from the
    lowest unranked index); a depth-first search in the same order marks the transitions that
    close a cycle; then every other transition's target is pushed at least one rank past its
    source (longest path), so no forward transition stays inside one rank.
    """
    ordered = sorted(definition.steps.values(), key=lambda s: (s.index, s.step))
    names = [s.step for s in ordered]

    def targets(name: str) -> list[str]:
        found = (t.step for t in definition.steps[name].transitions.values())
        return [t for t in found if t in definition.steps]

    rank: dict[str, int] = {}
    roots = [definition.initial_step] if definition.initial_step in definition.steps else []
    seeds: list[str] = []
    while len(rank) < len(names):
        if not roots:
            roots = [next(n for n in names if n not in rank)]
        base = max(rank.values(), default=-1) + 1 if rank else 0
        seeds.extend(roots)
        queue = deque(roots)
        for root in roots:
            rank[root] = base
        roots = []
        while queue:
            name = queue.popleft()
            for target in targets(name):
                if target not in rank:
                    rank[target] = rank[name] + 1
                    queue.append(target)

    back: set[tuple[str, str]] = set()
    state: dict[str, int] = {}  # 1: on the search path, 2: done
    topo: list[str] = []
    for seed in seeds:
        if seed in state:
            continue
        stack: list[tuple[str, list[str]]] = [(seed, targets(seed))]
        state[seed] = 1
        while stack:
            name, rest = stack[-1]
            if not rest:
                stack.pop()
                state[name] = 2
                topo.append(name)
                continue
            target = rest.pop(0)
            if state.get(target) == 1:
                back.add((name, target))
            elif target not in state:
                state[target] = 1
                stack.append((target, targets(target)))
    for name in reversed(topo):  # reverse post-order: sources before targets on forward edges
        for target in targets(name):
            if (name, target) not in back:
                rank[target] = max(rank[target], rank[name] + 1)
    return rank, back


def crossings(ranks: list[list[str]], links: list[tuple[str, str]]) -> int:
    """How many pairs of links between neighbouring ranks cross, for the order given."""
    position = {name: (r, i) for r, members in enumerate(ranks) for i, name in enumerate(members)}
    between: defaultdict[int, list[tuple[int, int]]] = defaultdict(list)
    for a, b in links:
        (ra, ia), (rb, ib) = position[a], position[b]
        if rb == ra + 1:
            between[ra].append((ia, ib))
    total = 0
    for pairs in between.values():
        for i, (a1, b1) in enumerate(pairs):
            for a2, b2 in pairs[i + 1 :]:
                if (a1 - a2) * (b1 - b2) < 0:
                    total += 1
    return total


def _order(ranks: list[list[str]], links: list[tuple[str, str]]) -> list[list[str]]:
    """Barycenter sweeps (right, then left) keeping the order with the fewest crossings."""
    succ: defaultdict[str, list[str]] = defaultdict(list)
    pred: defaultdict[str, list[str]] = defaultdict(list)
    for a, b in links:
        succ[a].append(b)
        pred[b].append(a)
    best = [list(members) for members in ranks]
    best_count = crossings(best, links)
    current = [list(members) for members in best]
    for sweep in range(_SWEEPS):
        forward = sweep % 2 == 0
        indexes = range(1, len(current)) if forward else range(len(current) - 2, -1, -1)
        for r in indexes:
            fixed = current[r - 1] if forward else current[r + 1]
            where = {name: i for i, name in enumerate(fixed)}
            neighbours = pred if forward else succ

            def key(
                item: tuple[int, str],
                where: dict[str, int] = where,
                n: Mapping[str, list[str]] = neighbours,
            ) -> tuple[float, int]:
                i, name = item
                seen = [where[m] for m in n[name] if m in where]
                # A member with no neighbour on the fixed side keeps its place.
                return (sum(seen) / len(seen) if seen else float(i), i)

            current[r] = [name for _, name in sorted(enumerate(current[r]), key=key)]
        count = crossings(current, links)
        if count < best_count:
            best, best_count = [list(members) for members in current], count
    return best


def layout(definition: FlowDefinition, stats: DiagramStats | None = None) -> Layout:
    """Place the flow's steps in ranks and route its transitions (see the module docstring)."""
    stats = stats or DiagramStats()
    rank, loops = _ranks(definition)
    steps = sorted(definition.steps.values(), key=lambda s: (s.index, s.step))
    nodes = {
        s.step: Node(
            step=s.step,
            rank=rank[s.step],
            width=max(_text_width(s.step), _text_width(stats.step_label(s.step), _SMALL))
            + 2 * _PAD_X,
            terminal=s.is_terminal,
        )
        for s in steps
    }
    edges: list[Edge] = []
    for s in steps:
        for name, transition in s.transitions.items():
            if transition.step not in nodes:
                continue  # a definition always names its own steps; old data might not
            back = (s.step, transition.step) in loops
            edges.append(Edge(s.step, name, transition.step, back))

    # Ranks with virtual points for long forward edges (named "\0<n>": no step name has a NUL).
    count = max(rank.values(), default=-1) + 1
    ranks: list[list[str]] = [[] for _ in range(count)]
    for s in steps:
        ranks[rank[s.step]].append(s.step)
    links: list[tuple[str, str]] = []
    chains: list[list[str]] = []
    for number, edge in enumerate(edges):
        if edge.back:
            chains.append([edge.source, edge.target])
            continue
        chain = [edge.source]
        for r in range(rank[edge.source] + 1, rank[edge.target]):
            virtual = f"\0{number}-{r}"
            ranks[r].append(virtual)
            chain.append(virtual)
        chain.append(edge.target)
        links.extend(itertools.pairwise(chain))
        chains.append(chain)
    ranks = _order(ranks, links)

    # Rank widths: the widest step, and room between ranks for the widest label crossing there.
    label_room = [_RANK_GAP] * count
    for edge in edges:
        if edge.back:
            continue
        text = max(
            _text_width(edge.transition, _SMALL),
            _text_width(stats.transition_label(edge.source, edge.transition), _SMALL),
        )
        gap = rank[edge.source]  # the label sits in the gap after the source's rank
        label_room[gap] = max(label_room[gap], text + 16)
    rank_width = [
        max((nodes[n].width for n in members if n in nodes), default=0.0) for members in ranks
    ]
    x = _MARGIN + 2 * _START_R + _RANK_GAP
    centres: list[float] = []
    for r in range(count):
        centres.append(x + rank_width[r] / 2)
        x += rank_width[r] + label_room[r]
    width = x - label_room[-1] + _MARGIN if count else 2 * _MARGIN

    tallest = max((len(members) for members in ranks), default=1)
    row = _NODE_H + _ROW_GAP
    body = tallest * row - _ROW_GAP
    positions: dict[str, tuple[float, float]] = {}
    for r, members in enumerate(ranks):
        top = _MARGIN + (body - (len(members) * row - _ROW_GAP)) / 2
        for i, name in enumerate(members):
            positions[name] = (centres[r], top + i * row + _NODE_H / 2)
            if name in nodes:
                nodes[name].order = i
                nodes[name].x, nodes[name].y = positions[name]

    # Ports: a step's forward transitions leave from its right side and arrive on the left,
    # spread out in the order of the other end, so neighbouring lines do not start as one.
    outgoing: defaultdict[str, list[int]] = defaultdict(list)
    incoming: defaultdict[str, list[int]] = defaultdict(list)
    for i, edge in enumerate(edges):
        if not edge.back:
            outgoing[edge.source].append(i)
            incoming[edge.target].append(i)
    out_y: dict[int, float] = {}
    in_y: dict[int, float] = {}
    for ports, ends, side in ((outgoing, out_y, 1), (incoming, in_y, -2)):

        def other_end(e: int, side: int = side) -> tuple[float, int]:
            return positions[chains[e][side]][1], e

        for name, at_port in ports.items():
            at_port.sort(key=other_end)
            spacing = min(10.0, _NODE_H * 0.6 / len(at_port))
            for k, e in enumerate(at_port):
                ends[e] = nodes[name].y + (k - (len(at_port) - 1) / 2) * spacing

    floor = _MARGIN + body
    depth = 0
    loops_below: defaultdict[str, int] = defaultdict(int)
    in_gap: defaultdict[int, list[Edge]] = defaultdict(list)
    for i, (edge, chain) in enumerate(zip(edges, chains, strict=True)):
        source, target = nodes[edge.source], nodes[edge.target]
        if edge.source == edge.target:
            # A step's transition to itself: a small loop under its box, label to the right.
            bottom = source.y + source.height / 2
            k = loops_below[edge.source]
            loops_below[edge.source] += 1
            sx, drop = source.x - 14 * k, 26 + 8 * k
            edge.points = [
                (sx - 10, bottom),
                (sx - 26, bottom + drop),
                (sx + 26, bottom + drop),
                (sx + 10, bottom),
            ]
            edge.label_at = (sx + 24, bottom + 14)
        elif edge.back:
            # A loop back to an earlier step: a dashed arc under all the rows, each one lower
            # than the last so they stay apart.
            depth += 1
            # Below the loops on single steps (and their labels), when there are any.
            low = floor + (44 if any(e.source == e.target for e in edges) else 10) + 22 * depth
            s_bottom, t_bottom = source.y + source.height / 2, target.y + target.height / 2
            edge.points = [
                (source.x, s_bottom),
                (source.x, low),
                (target.x, low),
                (target.x, t_bottom),
            ]
            # The arc's lowest point: three quarters of the way from its ends to `low`.
            deepest = max(s_bottom, t_bottom) + 0.75 * (low - max(s_bottom, t_bottom))
            edge.label_at = ((source.x + target.x) / 2, deepest + 12)
        else:
            points = [positions[name] for name in chain]
            points[0] = (source.x + source.width / 2, out_y[i])
            points[-1] = (target.x - target.width / 2, in_y[i])
            edge.points = points
            # The label sits on the line, in the middle of the gap after the source's rank.
            r = rank[edge.source]
            lx = centres[r] + rank_width[r] / 2 + label_room[r] / 2
            (ax, ay), (bx, by) = points[0], points[1]
            ly = _curve_y(ax, ay, bx, by, lx)
            edge.label_at = (lx, ly)
            in_gap[r].append(edge)
    # Labels in one gap that would overlap (transitions sharing a line, or leaving close together)
    # are pushed apart downwards, top to bottom.
    for gap_members in in_gap.values():
        gap_members.sort(key=lambda e: e.label_at[1])
        for above, below in itertools.pairwise(gap_members):
            lx, ly = below.label_at
            below.label_at = (lx, max(ly, above.label_at[1] + _LABEL_H))
    lowest = max(
        (max(y for _, y in e.points) for e in edges if e.back or e.source == e.target),
        default=floor - 32,
    )
    height = max(floor, lowest + 32) + _MARGIN
    init = nodes.get(definition.initial_step)
    start = (_MARGIN + _START_R, init.y if init else _MARGIN + _NODE_H / 2)
    return Layout(nodes, edges, start, width, height, ranks)


def _curve_y(ax: float, ay: float, bx: float, by: float, x: float) -> float:
    """The y of the segment's curve (`_segment`) where it passes `x` (found by bisection)."""
    if bx == ax:
        return (ay + by) / 2
    target = (x - ax) / (bx - ax)
    low, high = 0.0, 1.0
    for _ in range(30):
        t = (low + high) / 2
        # Control points halfway along in x: x(t) = 1.5t(1-t) + t^3 (increasing), y(t) = 3t^2 - 2t^3.
        if 1.5 * t * (1 - t) + t**3 < target:
            low = t
        else:
            high = t
    t = (low + high) / 2
    return ay + (by - ay) * (3 * t * t - 2 * t**3)


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _x(text: str) -> str:
    """Text safe in SVG content and attribute values."""
    return html.escape(_CONTROL.sub(" ", text), quote=True)


def _n(value: float) -> str:
    return f"{value:.1f}"


def _segment(a: tuple[float, float], b: tuple[float, float]) -> str:
    """A cubic curve from a to b leaving and arriving horizontally (as dot draws LR splines)."""
    middle = (a[0] + b[0]) / 2
    return f" C{_n(middle)},{_n(a[1])} {_n(middle)},{_n(b[1])} {_n(b[0])},{_n(b[1])}"


def _path(edge: Edge) -> str:
    points = edge.points
    start = f"M{_n(points[0][0])},{_n(points[0][1])}"
    if edge.back or edge.source == edge.target:
        (_, (x1, y1), (x2, y2), (x3, y3)) = points
        return start + f" C{_n(x1)},{_n(y1)} {_n(x2)},{_n(y2)} {_n(x3)},{_n(y3)}"
    return start + "".join(_segment(a, b) for a, b in itertools.pairwise(points))


def svg(
    definition: FlowDefinition,
    stats: DiagramStats | None = None,
    *,
    fills: Mapping[str, str] | None = None,
    label: str | None = None,
    id_prefix: str = "flow",
) -> str:
    """The flow as an SVG document: steps (filled from `fills`), transitions, labels with `stats`.

    `label` is the accessible name (`aria-label`); `id_prefix` keeps the arrow marker's id unique
    when several diagrams share a page.
    """
    plan = layout(definition, stats)
    fills = fills or {}
    marker = f"{_x(id_prefix)}-arrow"
    name = label or f"State diagram of {definition.flow}"
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="flow-diagram" role="img" '
        f'aria-label="{_x(name)}" viewBox="0 0 {_n(plan.width)} {_n(plan.height)}" '
        f'width="{_n(plan.width)}" height="{_n(plan.height)}" '
        f'font-family="Helvetica, Arial, sans-serif" data-flow="{_x(definition.flow)}">',
        f"<title>{_x(name)}</title>",
        f'<defs><marker id="{marker}" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" '
        'markerHeight="7" orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" '
        'fill="#1b1f24"/></marker></defs>',
    ]
    init = plan.nodes.get(definition.initial_step)
    if init is not None:
        sx, sy = plan.start
        out.append(
            f'<g class="start"><title>start</title><circle cx="{_n(sx)}" cy="{_n(sy)}" '
            f'r="{_START_R}" fill="#1b1f24"/><path d="M{_n(sx + _START_R)},{_n(sy)} '
            f'L{_n(init.x - init.width / 2)},{_n(init.y)}" stroke="#1b1f24" fill="none" '
            f'marker-end="url(#{marker})"/></g>'
        )
    for edge in plan.edges:
        lines = [edge.transition]
        if stats is not None:
            lines.append(stats.transition_label(edge.source, edge.transition))
        lx, ly = edge.label_at
        dash = ' stroke-dasharray="5,4"' if edge.back else ""
        # Forward labels are centred on their line; a white halo keeps them readable over it.
        first = ly if edge.back else ly - (len(lines) - 1) * 6.5 + 4
        anchor = "start" if edge.source == edge.target else "middle"
        texts = "".join(
            f'<text x="{_n(lx)}" y="{_n(first + i * 13)}" font-size="{_SMALL}" '
            f'text-anchor="{anchor}"{"" if i else _BOLD} fill="#1b1f24" stroke="#ffffff" '
            f'stroke-width="3" paint-order="stroke">{_x(text)}</text>'
            for i, text in enumerate(lines)
        )
        out.append(
            f'<g class="edge{" back" if edge.back else ""}" data-from="{_x(edge.source)}" '
            f'data-to="{_x(edge.target)}" data-transition="{_x(edge.transition)}">'
            f"<title>{_x(edge.source)} → {_x(edge.target)}</title>"
            f'<path d="{_path(edge)}" fill="none" stroke="#1b1f24" '
            f'stroke-width="1.3"{dash} marker-end="url(#{marker})"/>{texts}</g>'
        )
    for node in sorted(plan.nodes.values(), key=lambda n: (n.rank, n.order)):
        fill = fills.get(node.step, "#ffffff")
        left, top = node.x - node.width / 2, node.y - node.height / 2
        border = (
            f'<rect x="{_n(left - 3)}" y="{_n(top - 3)}" width="{_n(node.width + 6)}" '
            f'height="{_n(node.height + 6)}" rx="9" fill="none" stroke="#1b1f24"/>'
            if node.terminal
            else ""
        )
        texts = f'<text x="{_n(node.x)}" y="{_n(node.y - (3 if stats else -4))}" font-size="{_FONT}" text-anchor="middle" fill="#1b1f24">{_x(node.step)}</text>'
        if stats is not None:
            texts += (
                f'<text x="{_n(node.x)}" y="{_n(node.y + 13)}" font-size="{_SMALL}" '
                f'text-anchor="middle" fill="#1b1f24">{_x(stats.step_label(node.step))}</text>'
            )
        out.append(
            f'<g class="node{" terminal" if node.terminal else ""}" data-step="{_x(node.step)}" '
            f'data-rank="{node.rank}"><title>{_x(node.step)}</title>{border}'
            f'<rect x="{_n(left)}" y="{_n(top)}" width="{_n(node.width)}" '
            f'height="{_n(node.height)}" rx="6" fill="{_x(fill)}" stroke="#1b1f24"/>{texts}</g>'
        )
    out.append("</svg>")
    return "\n".join(out) + "\n"
