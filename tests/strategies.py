"""Hypothesis strategies: random, valid flow definitions in the seed's JSON shape."""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

TRANSITION_NAMES = ["go", "back", "skip", "done", "retry"]


@st.composite
def flow_definitions(draw: st.DrawFn, flow_id: str = "flow") -> dict[str, Any]:
    """A valid definition: 1-5 steps, each with 0-3 transitions to any step (terminals allowed)."""
    count = draw(st.integers(min_value=1, max_value=5))
    names = [f"step-{i}" for i in range(count)]
    steps: dict[str, Any] = {}
    for i, name in enumerate(names):
        chosen = draw(st.lists(st.sampled_from(TRANSITION_NAMES), max_size=3, unique=True))
        transitions = {t: {"transition": t, "step": draw(st.sampled_from(names))} for t in chosen}
        steps[name] = {
            "index": i,
            "step": name,
            "service": draw(st.sampled_from(["svc-a", "svc-b"])),
            "transitions": transitions,
        }
    return {"flow": flow_id, "initialStep": draw(st.sampled_from(names)), "steps": steps}


payloads = st.none() | st.dictionaries(
    st.text(min_size=1, max_size=5),
    st.none() | st.booleans() | st.integers(-1000, 1000) | st.text(max_size=10),
    max_size=3,
)
