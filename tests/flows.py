"""Flow definitions the tests share, and a clock the tests control."""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime, timedelta
from importlib import resources
from typing import Any


def onboarding() -> dict[str, Any]:
    """The seed's user-onboarding flow, as the seed writes it (a fresh copy each call)."""
    text = resources.files("flowstore").joinpath("data/user-onboarding.json").read_text()
    return copy.deepcopy(json.loads(text))


def linear(flow: str, steps: int = 3, **extra: Any) -> dict[str, Any]:
    """A flow s0 -> s1 -> ... -> s{steps-1} through transitions named `next`."""
    names = [f"s{i}" for i in range(steps)]
    return {
        "flow": flow,
        "initialStep": names[0],
        "steps": {
            name: {
                "index": i,
                "step": name,
                "service": "svc",
                "transitions": (
                    {"next": {"transition": "next", "step": names[i + 1]}} if i + 1 < steps else {}
                ),
            }
            for i, name in enumerate(names)
        },
        **extra,
    }


def ring(flow: str) -> dict[str, Any]:
    """Steps a and b looping forever (tick stays, flip a->b, flop b->a); `finish` from b ends it.

    Concurrency tests hammer one instance with transitions that are always (tick) or sometimes
    (flip/flop) valid; the terminal step exists only because a definition must be able to end.
    """
    return {
        "flow": flow,
        "initialStep": "a",
        "steps": {
            "a": {
                "index": 0,
                "step": "a",
                "service": "s",
                "transitions": {
                    "tick": {"transition": "tick", "step": "a"},
                    "flip": {"transition": "flip", "step": "b"},
                },
            },
            "b": {
                "index": 1,
                "step": "b",
                "service": "s",
                "transitions": {
                    "tick": {"transition": "tick", "step": "b"},
                    "flop": {"transition": "flop", "step": "a"},
                    "finish": {"transition": "finish", "step": "done"},
                },
            },
            "done": {"index": 2, "step": "done", "service": "s", "transitions": {}},
        },
    }


class Clock:
    """A UTC clock that only moves when a test moves it."""

    def __init__(self, start: datetime | None = None) -> None:
        self.now = start or datetime(2026, 1, 1, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        """Move the clock forward."""
        self.now += timedelta(seconds=seconds)
