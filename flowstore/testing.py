"""Helpers for testing code that uses flowstore: a store in memory, a clock you move, flows to run.

    from flowstore.testing import Clock, linear_flow, memory_store

    clock = Clock()
    with memory_store(clock=clock) as store:
        store.create_flow(linear_flow("signup", steps=3))
        store.execute_transition("ann", "signup", "next")
        clock.advance(60)

`memory_store` is a real `FlowStore` (the same write path, projections and errors) on an in-process
database, so tests of your flows need no files and no server; nothing is published to Kafka.
"""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime, timedelta
from importlib import resources
from typing import Any

from flowstore.store import FlowStore

__all__ = ["Clock", "linear_flow", "memory_store", "onboarding_flow", "ring_flow"]


class Clock:
    """A UTC clock that only moves when a test moves it (pass it as `FlowStore(clock=...)`)."""

    def __init__(self, start: datetime | None = None) -> None:
        self.now = start or datetime(2026, 1, 1, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        """Move the clock forward by `seconds`."""
        self.now += timedelta(seconds=seconds)


def memory_store(**options: Any) -> FlowStore:
    """A `FlowStore` on `memory://` that never publishes; `options` go to `FlowStore`."""
    return FlowStore("memory://", **{"kafka": False, **options})


def onboarding_flow() -> dict[str, Any]:
    """The seed's user-onboarding flow, as the seed writes it (a fresh copy on each call)."""
    text = resources.files("flowstore").joinpath("data/user-onboarding.json").read_text()
    return copy.deepcopy(json.loads(text))


def linear_flow(flow: str, steps: int = 3, **extra: Any) -> dict[str, Any]:
    """A flow s0 -> s1 -> ... -> s{steps-1} through transitions named `next`; `extra` is merged in."""
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


def ring_flow(flow: str) -> dict[str, Any]:
    """Steps a and b looping (tick stays, flip a->b, flop b->a), and `finish` from b to `done`.

    Good for concurrency tests: `tick` is always valid, flip/flop only sometimes.
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
