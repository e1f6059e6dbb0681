"""The live projector's thread is woken by a write (or another process's append) only when it is
idle: waking it while it lingers or catches up hands it the GIL for nothing, on every command."""

from __future__ import annotations

import threading
from typing import Any

from flowstore.projections.live import LiveProjector


def test_writes_while_it_catches_up_do_not_wake_the_thread_and_are_still_projected() -> None:
    inside, release = threading.Event(), threading.Event()
    positions = iter(range(1, 1000))
    caught_up: list[int] = []

    def catch_up() -> int:
        inside.set()
        release.wait(timeout=30)
        caught_up.append(next(positions))
        return caught_up[-1] * 100  # far past every target below

    projector = LiveProjector(catch_up, poll=60.0, linger=0.0)
    try:
        projector.written(1)  # idle: woken at once (the next poll is a minute away)
        assert inside.wait(timeout=30)
        wakes: list[Any] = []
        notify_all = projector._changed.notify_all
        projector._changed.notify_all = lambda: wakes.append(1)  # type: ignore[method-assign]
        for position in range(2, 50):
            projector.written(position)
            projector.nudge()
        assert wakes == []  # busy: nobody woken
        projector._changed.notify_all = notify_all  # type: ignore[method-assign]
        release.set()
        projector.wait(timeout=30)  # reached: the writes were seen after the catch-up
        assert caught_up
    finally:
        release.set()
        projector.close()


def test_an_idle_thread_is_woken_by_a_write_and_by_a_nudge() -> None:
    calls = threading.Semaphore(0)

    def catch_up() -> int:
        calls.release()
        return 10**9  # past every target: back to idle

    projector = LiveProjector(catch_up, poll=60.0, linger=0.0)
    try:
        projector.written(1)
        assert calls.acquire(timeout=30)  # without a wake: not before the poll, a minute away
        projector.nudge()
        assert calls.acquire(timeout=30)
    finally:
        projector.close()
