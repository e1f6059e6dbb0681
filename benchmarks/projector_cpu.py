"""The live projector's CPU per stage in scenario 2's batches (thread CPU, not wall time).

    PYTHONPATH=<checkout> python -m benchmarks.projector_cpu [--ops N]

`batch_profile --live --stages` times the stages in wall µs, which on one GIL shared with the
command thread includes the waits for it; this times each stage with `time.thread_time` in the
thread that runs it (the projector's), so the figures add up to the projector's CPU. Like
`benchmarks.stages`, it wraps private functions (and may miss stages older code lacks): run it
on two checkouts, one after the other, to compare them.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

from benchmarks.scenarios import PAYLOAD, _started_store

_STAGES = (
    ("catch-up (all of it)", "flowstore.projections.sql:SqlProjections", "catch_up"),
    ("  read (handed over + from the log)", "flowstore.eventlog:EventLog", "read_live"),
    ("  fold rows", "flowstore.projections.sql:SqlProjections", "_fold"),
    ("  prepare rows", "flowstore.projections.sql:SqlProjections", "_prepare"),
    ("  move the position", "flowstore.projections.sql:SqlProjections", "_move"),
    ("  write rows", "flowstore.projections.sql:SqlProjections", "_write"),
    ("  keep the rows' copies", "flowstore.projections.batch:RowCache", "keep"),
)


def _timed(spent: dict[str, float], label: str, function: Callable[..., Any]) -> Any:
    def timed(*args: Any, **kwargs: Any) -> Any:
        began = time.thread_time()
        try:
            return function(*args, **kwargs)
        finally:
            spent[label] += time.thread_time() - began

    return timed


def main() -> None:
    """Run the batches and print the projector's CPU µs per transition in each stage."""
    import importlib

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ops", type=int, default=10_000, help="transitions, in batches of 500")
    args = parser.parse_args()
    spent: dict[str, float] = defaultdict(float)
    for label, where, name in _STAGES:
        module, owner = where.split(":")
        cls = getattr(importlib.import_module(module), owner)
        if hasattr(cls, name):
            setattr(cls, name, _timed(spent, label, getattr(cls, name)))
    users = [f"user-{i}" for i in range(500)]
    store = _started_store(f"sqlite:///{tempfile.mkdtemp()}/cpu.db", users)
    commit = type(store.engine.dialect).do_commit
    type(store.engine.dialect).do_commit = _timed(spent, "  commit", commit)  # type: ignore[method-assign]
    try:
        store.execute_transitions([(u, "loop", "tick", PAYLOAD) for u in users])  # caches warm
        store.sync_projections()
        spent.clear()
        cpu, own = time.process_time(), time.thread_time()
        for _ in range(args.ops // 500):
            store.execute_transitions([(u, "loop", "tick", PAYLOAD) for u in users])
        store.sync_projections()
        cpu, own = time.process_time() - cpu, time.thread_time() - own
    finally:
        type(store.engine.dialect).do_commit = commit  # type: ignore[method-assign]
        store.close()
    done = args.ops // 500 * 500
    print(
        f"{done} transitions: {cpu / done * 1e6:.1f} CPU µs per transition, of which the"
        f" commands' thread {own / done * 1e6:.1f}, the other threads {(cpu - own) / done * 1e6:.1f}"
    )
    for label, _, _ in _STAGES[:4]:
        print(f"  {label:40}{spent[label] / done * 1e6:7.1f}")
    for label in ("  move the position", "  write rows", "  commit", "  keep the rows' copies"):
        print(f"  {label:40}{spent[label] / done * 1e6:7.1f}")


if __name__ == "__main__":
    main()
