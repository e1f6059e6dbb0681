"""Diagrams: Mermaid and DOT text parsed back into edges, statistics labels, Graphviz rendering."""

from __future__ import annotations

import html
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from flowstore import FlowStore, InvalidArgumentError
from flowstore.adapters import diagrams as rendering
from flowstore.adapters.cli import main
from flowstore.adapters.diagrams import diagram_bytes, graphviz_available
from flowstore.definitions import parse_definition
from flowstore.diagrams import DiagramStats, dot, mermaid
from tests.flows import onboarding

FLOW = "user-onboarding"
needs_dot = pytest.mark.skipif(
    not graphviz_available(),
    reason="Graphviz's `dot` is not installed (Debian: apt-get install graphviz)",
)


def definition_edges(definition: dict[str, Any]) -> set[tuple[str, str, str]]:
    """(from step, to step, transition) for every transition of a seed-shaped definition."""
    return {
        (name, edge["step"], transition)
        for name, step in definition["steps"].items()
        for transition, edge in step["transitions"].items()
    }


# Parsers: just enough of each language to read our own output back.

_MERMAID_ENTITIES = {"#quot;": '"', "#59;": ";", "#58;": ":", "#35;": "#", "#lt;": "<", "#gt;": ">"}


def _mermaid_unescape(text: str) -> str:
    return re.sub(r"#(?:quot|lt|gt|\d+);", lambda m: _MERMAID_ENTITIES[m.group(0)], text)


def parse_mermaid(text: str) -> dict[str, Any]:
    """Names, notes, edges (with labels), the initial step and the terminal steps."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    assert lines[0] == "stateDiagram-v2"
    names: dict[str, str] = {}
    notes: dict[str, str] = {}
    edges: set[tuple[str, str, str]] = set()
    initial, terminals = None, set()
    for line in lines[1:]:
        if m := re.fullmatch(r'state "(.*)" as (\w+)', line):
            names[m.group(2)] = _mermaid_unescape(m.group(1))
        elif m := re.fullmatch(r"\[\*\] --> (\w+)", line):
            initial = m.group(1)
        elif m := re.fullmatch(r"(\w+) --> \[\*\]", line):
            terminals.add(m.group(1))
        elif m := re.fullmatch(r"(\w+) --> (\w+) : (.*)", line):
            edges.add((m.group(1), m.group(2), _mermaid_unescape(m.group(3))))
        elif m := re.fullmatch(r"(\w+) : (.*)", line):
            notes[m.group(1)] = m.group(2)
        else:
            raise AssertionError(f"unexpected Mermaid line {line!r}")
    assert initial is not None
    return {
        "initial": names[initial],
        "terminals": {names[t] for t in terminals},
        "edges": {(names[a], names[b], label) for a, b, label in edges},
        "notes": {names[k]: v for k, v in notes.items()},
    }


_DOT_STRING = r'"((?:[^"\\]|\\.)*)"'


def _dot_unescape(text: str) -> str:
    return re.sub(r"\\(.)", lambda m: "\n" if m.group(1) == "n" else m.group(1), text)


def parse_dot(text: str) -> dict[str, Any]:
    """Node attributes, edges (with labels), the initial step and the terminal steps."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    assert re.fullmatch(rf"digraph {_DOT_STRING} {{", lines[0])
    assert lines[-1] == "}"
    nodes: dict[str, str] = {}
    edges: set[tuple[str, str, str]] = set()
    start, initial, terminals = None, None, set()
    for line in lines[1:-1]:
        if m := re.fullmatch(rf"{_DOT_STRING} -> {_DOT_STRING} \[label={_DOT_STRING}\];", line):
            a, b, label = (_dot_unescape(g) for g in m.groups())
            edges.add((a, b, label))
        elif m := re.fullmatch(rf"{_DOT_STRING} -> {_DOT_STRING};", line):
            assert _dot_unescape(m.group(1)) == start
            initial = _dot_unescape(m.group(2))
        elif m := re.fullmatch(rf"{_DOT_STRING}(?: \[(.*)\])?;", line):
            name, attributes = _dot_unescape(m.group(1)), m.group(2) or ""
            if "shape=point" in attributes:
                start = name
                continue
            nodes[name] = attributes
            if "peripheries=2" in attributes:
                terminals.add(name)
        elif not re.fullmatch(r"(rankdir|node|edge)\b.*;", line):
            raise AssertionError(f"unexpected DOT line {line!r}")
    return {"initial": initial, "terminals": terminals, "edges": edges, "nodes": nodes}


# The text, without statistics


def test_mermaid_of_the_onboarding_flow_has_every_step_and_transition() -> None:
    seed = onboarding()
    parsed = parse_mermaid(mermaid(parse_definition(seed)))
    assert parsed["initial"] == "welcome"
    assert parsed["terminals"] == {"completed"}
    assert parsed["edges"] == definition_edges(seed)
    assert parsed["notes"] == {}


def test_dot_of_the_onboarding_flow_has_every_step_and_transition() -> None:
    seed = onboarding()
    parsed = parse_dot(dot(parse_definition(seed)))
    assert parsed["initial"] == "welcome"
    assert parsed["terminals"] == {"completed"}
    assert parsed["edges"] == definition_edges(seed)
    assert set(parsed["nodes"]) == set(seed["steps"])


def test_awkward_names_survive_both_formats() -> None:
    odd = 'a "quoted"; step: #1 <x> \\ back'
    flow = {
        "flow": 'flow "x"',
        "initialStep": odd,
        "steps": {
            odd: {
                "index": 0,
                "step": odd,
                "service": "s",
                "transitions": {"go: now;": {"transition": "go: now;", "step": "__start__"}},
            },
            "__start__": {"index": 1, "step": "__start__", "service": "s", "transitions": {}},
        },
    }
    expected = {(odd, "__start__", "go: now;")}
    definition = parse_definition(flow)
    assert parse_mermaid(mermaid(definition))["edges"] == expected
    parsed = parse_dot(dot(definition))
    assert parsed["edges"] == expected
    assert (parsed["initial"], parsed["terminals"]) == (odd, {"__start__"})


# With statistics, from the store's tables


@pytest.fixture
def store(store_url: str) -> Iterator[FlowStore]:
    with FlowStore(store_url) as s:
        s.create_flow(onboarding())
        for user, path in {
            "ann": ["start", "continue", "save", "complete"],
            "bob": ["start", "skip"],
            "cat": ["start", "continue"],
            "dan": ["start"],
        }.items():
            for transition in path:
                s.execute_transition(user, FLOW, transition)
        yield s


def test_statistics_label_steps_with_users_now_and_transitions_with_takers(
    store: FlowStore,
) -> None:
    parsed = parse_mermaid(store.diagram(FLOW, stats=True))
    assert parsed["notes"] == {
        "welcome": "0 now",
        "profile-setup": "1 now",  # dan
        "preferences": "1 now",  # cat
        "verification": "1 now",  # bob
        "completed": "0 now",  # ann completed: not active
    }
    labels = {(a, label.split(" (")[0]): label for a, b, label in parsed["edges"]}
    assert labels[("welcome", "start")] == "start (4 took it, 0% drop-off)"
    assert labels[("profile-setup", "continue")] == "continue (2 took it, 50% drop-off)"
    assert labels[("profile-setup", "skip")] == "skip (1 took it, 75% drop-off)"
    assert labels[("preferences", "save")] == "save (1 took it, 50% drop-off)"
    assert labels[("verification", "complete")] == "complete (1 took it, 50% drop-off)"
    # The same numbers in DOT, on a second line of each label.
    dot_parsed = parse_dot(store.diagram(FLOW, "dot", stats=True))
    dot_labels = {(a, label.split("\n")[0]): label for a, b, label in dot_parsed["edges"]}
    assert dot_labels[("profile-setup", "skip")] == "skip\n1 took it, 75% drop-off"
    assert 'label="profile-setup\\n1 now"' in dot_parsed["nodes"]["profile-setup"]


def test_rejected_attempts_are_not_counted_as_taken() -> None:
    stats = DiagramStats(current={}, entered={"a": 0}, taken={})
    assert stats.transition_label("a", "go") == "0 took it"  # nobody entered: no percentage


def test_unknown_format_and_past_versions(store: FlowStore) -> None:
    with pytest.raises(InvalidArgumentError, match="format"):
        store.diagram(FLOW, "svg")  # the library gives text; rendering is the adapters' job
    steps = onboarding()["steps"]
    steps["welcome"]["transitions"]["start"]["step"] = "verification"
    del steps["profile-setup"], steps["preferences"]
    store.update_flow(FLOW, {"steps": steps})
    assert ("welcome", "verification", "start") in parse_mermaid(store.diagram(FLOW))["edges"]
    old = parse_mermaid(store.diagram(FLOW, version=1))
    assert old["edges"] == definition_edges(onboarding())


# Rendering (Graphviz) and the CLI


@needs_dot
def test_svg_and_png_are_rendered_by_graphviz(store: FlowStore) -> None:
    svg = diagram_bytes(store, FLOW, "svg", stats=True).decode()
    assert svg.lstrip().startswith(("<?xml", "<svg", "<!DOCTYPE"))
    text = html.unescape(svg)  # Graphviz writes "-" as &#45;
    for name in onboarding()["steps"]:
        assert f">{name}</text>" in text
    assert ">1 took it, 75% drop-off</text>" in text
    assert diagram_bytes(store, FLOW, "png").startswith(b"\x89PNG\r\n\x1a\n")


def test_rendering_without_graphviz_is_a_clear_error(
    store: FlowStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(rendering.shutil, "which", lambda _: None)
    assert not graphviz_available()
    with pytest.raises(InvalidArgumentError, match="apt-get install graphviz"):
        diagram_bytes(store, FLOW, "svg")
    assert diagram_bytes(store, FLOW, "dot").startswith(b"digraph")  # text needs nothing


def test_cli_diagram(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite:///{tmp_path}/cli.db"
    with FlowStore(url) as s:
        s.create_flow(onboarding())
        s.execute_transition("ann", FLOW, "start")
    assert main(["--url", url, "diagram", FLOW]) == 0
    parsed = parse_mermaid(capsys.readouterr().out)
    assert parsed["edges"] == definition_edges(onboarding())
    assert main(["--url", url, "diagram", FLOW, "--format", "dot", "--stats"]) == 0
    assert parse_dot(capsys.readouterr().out)["nodes"]["profile-setup"].startswith(
        'label="profile-setup\\n1 now"'
    )
    assert main(["--url", url, "--json", "diagram", FLOW]) == 0
    data = orjson.loads(capsys.readouterr().out)
    assert (data["flow"], data["format"]) == (FLOW, "mermaid")
    assert data["diagram"].startswith("stateDiagram-v2\n")
    assert main(["--url", url, "diagram", FLOW, "--format", "png"]) == 5  # png needs --output
    assert "--output" in capsys.readouterr().err
    target = tmp_path / "flow.dot"
    assert main(["--url", url, "diagram", FLOW, "--format", "dot", "--output", str(target)]) == 0
    assert parse_dot(target.read_text())["initial"] == "welcome"
    assert main(["--url", url, "diagram", "nope"]) == 3


@needs_dot
def test_cli_writes_svg_and_png_files(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/cli.db"
    with FlowStore(url) as s:
        s.create_flow(onboarding())
    for fmt, magic in (("svg", b"<"), ("png", b"\x89PNG")):
        target = tmp_path / f"flow.{fmt}"
        assert main(["--url", url, "diagram", FLOW, "--format", fmt, "--output", str(target)]) == 0
        assert target.read_bytes().lstrip().startswith(magic)
