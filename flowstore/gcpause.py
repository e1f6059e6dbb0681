"""Pausing the cyclic garbage collector over a stretch of work that makes no cycles.

A rebuild's page or a batch of transitions allocates tens of thousands of objects (events, rows,
dicts, aggregates) that live until the stretch ends and are never in a cycle: reference counting
frees them all. The cyclic collector, run every few hundred allocations, would scan them again and
again while they live (measured: 28% of a rebuild's CPU, 20% of a batch of transitions').
"""

from __future__ import annotations

import gc
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from types import TracebackType

__all__ = ["PausedCollection", "reference_counting_only"]


_guard = threading.Lock()
_pauses = 0  # stretches in progress, in any thread
_paused = False  # whether they turned the collector off (it was on when the first began)


def _begin() -> bool:
    """Count a stretch in; whether the collector was on before the stretches (ours to restore)."""
    global _pauses, _paused
    with _guard:
        _pauses += 1
        if _pauses == 1 and gc.isenabled():
            gc.disable()
            _paused = True
        return _paused


def _end() -> None:
    """Count a stretch out; the last one turns the collector back on if the first turned it off.

    (Each turning it back on would turn it on in the middle of another thread's stretch: a batch
    of commands beside a rebuild or another batch.)
    """
    global _pauses, _paused
    with _guard:
        _pauses -= 1
        if _pauses == 0 and _paused:
            _paused = False
            gc.enable()


@contextmanager
def reference_counting_only() -> Iterator[None]:
    """No cyclic garbage collection meanwhile (a second or two at most).

    Cycles other threads make meanwhile wait for the next collection. Left alone when the
    application turned the collector off. Stretches in several threads at once keep it off
    until the last of them ends.
    """
    _begin()
    try:
        yield
    finally:
        _end()


class PausedCollection:
    """`reference_counting_only` over a long loop of such stretches (a rebuild's pages).

    Turning the collector back on between steps costs more than it looks: the objects a step
    leaves alive for the next (a page being written, the rows kept) were all made while it was
    off, and the first collections after it is on scan every one of them (measured: 2.8 of a
    rebuild's 45 CPU µs per event, re-enabling it after each 20,000-event page). So it stays
    off across steps; once every `most` seconds (`due`), the loop lets go of what it holds and
    `breathe` collects the young generation, then only a few objects besides other threads'
    (whose cycles so wait that long at most; older ones, which survived a breath, wait for the
    end of the loop).

        with PausedCollection() as pause:
            for step in steps:
                if pause.due():
                    ...  # finish the work in flight, drop references to it
                    pause.breathe()
                ...
    """

    def __init__(self, most: float = 1.0) -> None:
        self.most = most
        self._ours = False
        self._since = 0.0

    def __enter__(self) -> PausedCollection:
        # Left alone when the application turned the collector off.
        self._ours = _begin()
        self._since = time.monotonic()
        return self

    def due(self) -> bool:
        """Whether `most` seconds passed since the last breath (never, if the collector was off)."""
        return self._ours and time.monotonic() - self._since >= self.most

    def breathe(self) -> None:
        """Collect the young generation now (if the collector was on before the pause)."""
        if self._ours:
            gc.collect(0)
            self._since = time.monotonic()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        _end()
