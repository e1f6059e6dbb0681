"""Where a rebuild's time goes: CPU µs per event in each stage, for whichever code is imported.

    PYTHONPATH=<checkout> python -m benchmarks.rebuild_stages URL [--no-child]

Rebuilds the projections of the store at URL (a log written beforehand, e.g. by scenario 5) with
timers around the stages (`time.thread_time`: each stage's own thread, so a page written by
another thread while the next is folded is not counted twice): reading the log ("read +
decode", of which decoding the rows into plain events is "decode"; pages a child process read
ahead count only their unpickling here), folding a page into rows, writing the rows, the swap (secondary indexes,
dropping the old tables). The total is `time.process_time` (every thread of this process); the
child's CPU (`ReadAhead`, on logs of `READ_AHEAD_FROM` events or more; `--no-child` turns it
off) and its peak RSS are printed apart. Beside each stage's CPU is its wall time: where the wall
exceeds the CPU, the thread waited (for the GIL, the disk, or the child's next page: "read +
decode"); "wait for the writer" is the main thread waiting for the page in flight to be written
(its writer thread's GIL waits included). Like `benchmarks.stages`, it wraps private functions,
so it changes with them; run it on two checkouts, one after the other, to compare them.
"""

from __future__ import annotations

import resource
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

_STAGES = ("read + decode", "  of which decode", "fold", "write", "swap", "wait for the writer")

_waited: dict[str, float] = defaultdict(float)
"""Wall seconds per stage (`spent` holds the CPU)."""


def _timed(spent: dict[str, float], label: str, function: Callable[..., Any]) -> Any:
    def timed(*args: Any, **kwargs: Any) -> Any:
        began, wall = time.thread_time(), time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            spent[label] += time.thread_time() - began
            _waited[label] += time.perf_counter() - wall

    return timed


def main(url: str, child: bool = True) -> None:
    """Rebuild once and print the CPU µs per event of each stage."""
    from flowstore import FlowStore
    from flowstore.eventlog import EventLog
    from flowstore.projections.sql import SqlProjections

    if not child:
        try:
            import flowstore.projections.readahead as readahead

            readahead.READ_AHEAD_FROM = sys.maxsize
        except ImportError:  # older code: no child anyway
            pass
    spent: dict[str, float] = defaultdict(float)
    for owner, name, label in (
        (EventLog, "read", "read + decode"),
        (SqlProjections, "_fold", "fold"),
        (SqlProjections, "_write", "write"),
        (SqlProjections, "_swap", "swap"),
    ):
        setattr(owner, name, _timed(spent, label, getattr(owner, name)))
    try:
        from flowstore.projections.rebuild import Rebuilds
    except ImportError:  # older code: no writer thread
        pass
    else:
        if hasattr(Rebuilds, "_written"):
            Rebuilds._written = staticmethod(  # type: ignore[method-assign]
                _timed(spent, "wait for the writer", Rebuilds._written)
            )
    try:
        from flowstore.projections.readahead import ReadAhead
    except ImportError:
        pass
    else:  # the pages the child sends: unpickling them is this process's part of reading
        ReadAhead.__call__ = _timed(spent, "read + decode", ReadAhead.__call__)  # type: ignore[method-assign]
    from flowstore.codec import PydanticMapper

    # The page's decoding: from the driver's rows where the code has that path, else from the
    # recorder's notifications (older code, PostgreSQL), whichever is called first per page.
    decode = "to_plain_rows" if hasattr(PydanticMapper, "to_plain_rows") else "to_plain_events"
    setattr(
        PydanticMapper, decode, _timed(spent, "  of which decode", getattr(PydanticMapper, decode))
    )
    with FlowStore(url, live_projections=False) as store:
        began, cpu = time.perf_counter(), time.process_time()
        events = store.rebuild_projections()
        wall, cpu = time.perf_counter() - began, time.process_time() - cpu
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"{events:,} events: {events / wall:,.0f} events/s, {cpu / events * 1e6:.1f} CPU µs/event, "
        f"peak RSS {rss:.0f} MB"
    )
    print(f"  {'stage':20} {'CPU':>6} {'wall':>6}   µs/event, wall {wall / events * 1e6:.1f}")
    for label in _STAGES:
        print(
            f"  {label:20} {spent[label] / events * 1e6:6.1f} {_waited[label] / events * 1e6:6.1f}"
        )
    if children.ru_maxrss:
        child_cpu = (children.ru_utime + children.ru_stime) / events * 1e6
        print(
            f"  child process        {child_cpu:6.1f} (its own), peak RSS {children.ru_maxrss / 1024:.0f} MB"
        )


if __name__ == "__main__":
    main(sys.argv[1], child="--no-child" not in sys.argv[2:])
