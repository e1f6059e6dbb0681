"""Where a rebuild's time goes: CPU µs per event in each stage, for whichever code is imported.

    PYTHONPATH=<checkout> python -m benchmarks.rebuild_stages URL

Rebuilds the projections of the store at URL (a log written beforehand, e.g. by scenario 5) with
timers around the stages (`time.process_time`, this thread): reading the log (the recorder's
`select_notifications`, inside "read + decode"), folding a page into rows, writing the rows. The
rest of the total is the swap (secondary indexes, dropping the old tables) and the bookkeeping.
Like `benchmarks.stages`, it wraps private functions, so it changes with them; run it on two
checkouts, one after the other, to compare them stage by stage.
"""

from __future__ import annotations

import sys
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any


def _timed(spent: dict[str, float], label: str, function: Callable[..., Any]) -> Any:
    def timed(*args: Any, **kwargs: Any) -> Any:
        began = time.process_time()
        try:
            return function(*args, **kwargs)
        finally:
            spent[label] += time.process_time() - began

    return timed


def main(url: str) -> None:
    """Rebuild once and print the CPU µs per event of each stage."""
    from flowstore import FlowStore
    from flowstore.eventlog import EventLog
    from flowstore.projections.sql import SqlProjections
    from flowstore.testing import Internals

    spent: dict[str, float] = defaultdict(float)
    for owner, name, label in (
        (EventLog, "read", "read + decode"),
        (SqlProjections, "_fold", "fold"),
        (SqlProjections, "_write", "write"),
    ):
        setattr(owner, name, _timed(spent, label, getattr(owner, name)))
    with FlowStore(url, live_projections=False) as store:
        recorder = Internals(store).recorder
        recorder.select_notifications = _timed(  # type: ignore[method-assign]
            spent, "  of which select", recorder.select_notifications
        )
        began, cpu = time.perf_counter(), time.process_time()
        events = store.rebuild_projections()
        wall, cpu = time.perf_counter() - began, time.process_time() - cpu
    print(
        f"{events:,} events: {events / wall:,.0f} events/s, {cpu / events * 1e6:.1f} CPU µs/event"
    )
    for label in ("read + decode", "  of which select", "fold", "write"):
        print(f"  {label:20} {spent[label] / events * 1e6:6.1f}")


if __name__ == "__main__":
    main(sys.argv[1])
