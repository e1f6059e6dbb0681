"""Hypothesis strategies: random, valid flow definitions in the seed's JSON shape."""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

TRANSITION_NAMES = ["go", "back", "skip", "done", "retry"]


@st.composite
def flow_definitions(draw: st.DrawFn, flow_id: str = "flow") -> dict[str, Any]:
    """A valid definition: 1-5 steps, every one reachable, at least one terminal step reachable.

    Steps are visited in a random order starting at the initial step; each one after the first is
    the target of a transition from a step visited before it (a random tree, so all are reachable).
    The last step visited keeps no transitions (a reachable terminal); the others may get up to two
    extra transitions to any step, so loops, back edges and further terminals all occur.
    """
    count = draw(st.integers(min_value=1, max_value=5))
    order = draw(st.permutations([f"step-{i}" for i in range(count)]))
    transitions: dict[str, dict[str, Any]] = {name: {} for name in order}

    def add(source: str, target: str) -> None:
        free = [t for t in TRANSITION_NAMES if t not in transitions[source]]
        name = draw(st.sampled_from(free))
        transitions[source][name] = {"transition": name, "step": target}

    for i, name in enumerate(order[1:], start=1):
        # A parent is always visited before its child, so the last step is nobody's parent.
        add(draw(st.sampled_from(order[:i])), name)
    for name in order[:-1]:
        for _ in range(draw(st.integers(min_value=0, max_value=2))):
            if len(transitions[name]) < len(TRANSITION_NAMES):
                add(name, draw(st.sampled_from(order)))
    steps = {
        name: {
            "index": int(name.removeprefix("step-")),
            "step": name,
            "service": draw(st.sampled_from(["svc-a", "svc-b"])),
            "transitions": transitions[name],
        }
        for name in sorted(order)
    }
    return {"flow": flow_id, "initialStep": order[0], "steps": steps}


# Storable text: no NUL (PostgreSQL cannot hold it; check_payload refuses it, tested on its own).
_text = st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",))
payloads = st.none() | st.dictionaries(
    st.text(_text, min_size=1, max_size=5),
    st.none() | st.booleans() | st.integers(-1000, 1000) | st.text(_text, max_size=10),
    max_size=3,
)
