"""The server-drawn flow diagram: a layered layout and its SVG (`flowstore.diagram_svg`)."""

from __future__ import annotations

import itertools
import xml.etree.ElementTree as ET
from typing import Any

from hypothesis import given, settings

from flowstore.definitions import FlowDefinition
from flowstore.diagram_svg import crossings, layout, svg
from flowstore.diagrams import DiagramStats
from tests.flows import linear, onboarding, ring
from tests.strategies import flow_definitions

SVG = "{http://www.w3.org/2000/svg}"


def parse(text: str) -> ET.Element:
    """The SVG as XML (fails on anything not well-formed)."""
    return ET.fromstring(text)


def groups(root: ET.Element, kind: str) -> list[ET.Element]:
    """The `<g>` elements of one class (node or edge)."""
    return [g for g in root.iter(f"{SVG}g") if kind in (g.get("class") or "").split()]


def make(raw: dict[str, Any]) -> FlowDefinition:
    """A definition from the seed's JSON shape."""
    return FlowDefinition.model_validate(raw)


def step(index: int, name: str, **moves: str) -> dict[str, Any]:
    """A step in the seed's JSON shape."""
    transitions = {t: {"transition": t, "step": to} for t, to in moves.items()}
    return {"index": index, "step": name, "service": "svc", "transitions": transitions}


@settings(max_examples=150, deadline=None)
@given(flow_definitions())
def test_every_step_is_a_node_and_every_transition_an_edge(raw: dict[str, Any]) -> None:
    definition = make(raw)
    plan = layout(definition)
    root = parse(svg(definition, DiagramStats()))
    nodes = {g.get("data-step") for g in groups(root, "node")}
    assert nodes == set(definition.steps)
    edges = sorted(
        (g.get("data-from"), g.get("data-transition"), g.get("data-to"))
        for g in groups(root, "edge")
    )
    assert edges == sorted(
        (s.step, name, t.step)
        for s in definition.steps.values()
        for name, t in s.transitions.items()
    )
    rank = {name: node.rank for name, node in plan.nodes.items()}
    assert rank[definition.initial_step] == 0
    for edge in plan.edges:
        if edge.back:
            # A back edge closes a cycle: its target reaches its source.
            assert _reaches(definition, edge.target, edge.source)
        else:
            assert rank[edge.target] > rank[edge.source]  # forward: always rightwards
    # Steps of one rank never overlap.
    for members in plan.ranks:
        boxes = sorted((plan.nodes[m].y, plan.nodes[m].height) for m in members if m in plan.nodes)
        for (y1, h1), (y2, h2) in itertools.pairwise(boxes):
            assert y1 + h1 / 2 < y2 - h2 / 2
    # Everything lies on the canvas.
    for node in plan.nodes.values():
        assert node.x - node.width / 2 >= 0
        assert node.x + node.width / 2 <= plan.width
        assert node.y - node.height / 2 >= 0
        assert node.y + node.height / 2 <= plan.height


def _reaches(definition: FlowDefinition, start: str, goal: str) -> bool:
    seen, todo = {start}, [start]
    while todo:
        name = todo.pop()
        if name == goal:
            return True
        for t in definition.steps[name].transitions.values():
            if t.step not in seen:
                seen.add(t.step)
                todo.append(t.step)
    return False


def test_steps_are_ranked_by_distance_and_pushed_past_their_sources() -> None:
    plan = layout(make(onboarding()))
    rank = {name: node.rank for name, node in plan.nodes.items()}
    # preferences and verification are both two moves from welcome, but preferences leads to
    # verification: it goes one rank further, so the transition between them points right.
    assert rank == {
        "welcome": 0,
        "profile-setup": 1,
        "preferences": 2,
        "verification": 3,
        "completed": 4,
    }
    assert not any(edge.back for edge in plan.edges)


def test_loops_are_back_edges_and_drawn_dashed() -> None:
    definition = make(ring("r"))
    root = parse(svg(definition))
    back = {(g.get("data-from"), g.get("data-transition")) for g in groups(root, "back")}
    assert back == {("a", "tick"), ("b", "tick"), ("b", "flop")}
    for g in groups(root, "back"):
        assert g.find(f"{SVG}path").get("stroke-dasharray")  # type: ignore[union-attr]
    forward = [g for g in groups(root, "edge") if "back" not in (g.get("class") or "")]
    assert all(g.find(f"{SVG}path").get("stroke-dasharray") is None for g in forward)  # type: ignore[union-attr]


def test_the_barycenter_pass_removes_crossings_the_index_order_has() -> None:
    # By index, rank 2 is [c1, c2] while b1 -> c2 and b2 -> c1: one crossing.
    raw = {
        "flow": "x",
        "initialStep": "a",
        "steps": {
            "a": step(0, "a", one="b1", two="b2"),
            "b1": step(1, "b1", go="c2"),
            "b2": step(2, "b2", go="c1"),
            "c1": step(3, "c1", end="z"),
            "c2": step(4, "c2", end="z"),
            "z": step(5, "z"),
        },
    }
    plan = layout(make(raw))
    links = [("a", "b1"), ("a", "b2"), ("b1", "c2"), ("b2", "c1"), ("c1", "z"), ("c2", "z")]
    assert crossings([["a"], ["b1", "b2"], ["c1", "c2"], ["z"]], links) == 1
    assert crossings(plan.ranks, links) == 0


def test_long_transitions_pass_through_a_point_in_each_rank_they_cross() -> None:
    raw = linear("long", 4)
    raw["steps"]["s0"]["transitions"]["jump"] = {"transition": "jump", "step": "s3"}
    plan = layout(make(raw))
    jump = next(e for e in plan.edges if e.transition == "jump")
    assert len(jump.points) == 4  # source port, one point in each of ranks 1 and 2, target port
    xs = [x for x, _ in jump.points]
    assert xs == sorted(xs)
    assert sum(1 for members in plan.ranks for m in members if m.startswith("\0")) == 2


def test_names_from_users_are_text_not_markup() -> None:
    odd = '</text><script>alert("x")</script>&amp;'
    raw = {
        "flow": 'f"<&>',
        "initialStep": odd,
        "steps": {odd: step(0, odd, **{"<go & 'on'>": "end"}), "end": step(1, "end")},
    }
    text = svg(make(raw), DiagramStats(current={odd: 2}), fills={odd: '"><script>'})
    assert "<script" not in text
    root = parse(text)
    assert [t.text for t in root.iter(f"{SVG}text")][:1] == ["<go & 'on'>"]
    node = next(g for g in groups(root, "node") if g.get("data-step") == odd)
    assert [t.text for t in node.iter(f"{SVG}text")] == [odd, "2 now"]
    assert root.get("aria-label") == 'State diagram of f"<&>'


def test_the_same_definition_gives_the_same_picture() -> None:
    definition = make(onboarding())
    stats = DiagramStats(
        current={"welcome": 3}, entered={"welcome": 4}, taken={("welcome", "start"): 1}
    )
    assert svg(definition, stats) == svg(make(onboarding()), stats)
