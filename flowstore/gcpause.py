"""Pausing the cyclic garbage collector over a stretch of work that makes no cycles.

A rebuild's page or a batch of transitions allocates tens of thousands of objects (events, rows,
dicts, aggregates) that live until the stretch ends and are never in a cycle: reference counting
frees them all. The cyclic collector, run every few hundred allocations, would scan them again and
again while they live (measured: 28% of a rebuild's CPU, 20% of a batch of transitions').
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["reference_counting_only"]

_guard = threading.Lock()
_pauses = 0  # stretches in progress, in any thread
_paused = False  # whether they turned the collector off (it was on when the first began)


@contextmanager
def reference_counting_only() -> Iterator[None]:
    """No cyclic garbage collection meanwhile (a second or two at most).

    Cycles other threads make meanwhile wait for the next collection. Left alone when the
    application turned the collector off. Stretches in several threads at once (a batch of
    commands and the live projector's catch-up) keep it off until the last one ends: the
    first to end would otherwise turn it on in the middle of the others.
    """
    global _pauses, _paused
    with _guard:
        _pauses += 1
        if _pauses == 1 and gc.isenabled():
            gc.disable()
            _paused = True
    try:
        yield
    finally:
        with _guard:
            _pauses -= 1
            if _pauses == 0 and _paused:
                _paused = False
                gc.enable()
