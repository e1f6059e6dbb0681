"""Pausing the cyclic collector (`flowstore.gcpause`) over long stretches of work without cycles."""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator

import pytest

from flowstore.gcpause import PausedCollection, reference_counting_only


@pytest.fixture
def collections() -> Iterator[list[int]]:
    """The generation of every collection made meanwhile."""
    seen: list[int] = []

    def record(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            seen.append(info["generation"])

    gc.callbacks.append(record)
    try:
        yield seen
    finally:
        gc.callbacks.remove(record)


def test_the_collector_stays_off_across_steps_and_breathes_only_when_due(
    collections: list[int],
) -> None:
    with PausedCollection(most=3600) as pause:
        for _ in range(3):
            assert not pause.due()
            assert not gc.isenabled()
            junk = [[] for _ in range(5000)]  # far more than a collection's threshold
            del junk
        assert collections == []
        pause.most = 0
        assert pause.due()
        pause.breathe()
        assert collections == [0]  # the young generation only
        assert not gc.isenabled()
    assert gc.isenabled()


def test_a_collector_the_application_turned_off_is_left_alone(collections: list[int]) -> None:
    gc.disable()
    try:
        with PausedCollection(most=0) as pause:
            assert not pause.due()
            pause.breathe()
        assert not gc.isenabled()
        assert collections == []
    finally:
        gc.enable()


def test_overlapping_pauses_in_two_threads_keep_the_collector_off_until_the_last_ends() -> None:
    """A batch of commands beside a rebuild: the first stretch to end must not turn it on."""
    assert gc.isenabled()
    entered, release = threading.Event(), threading.Event()
    seen: list[bool] = []

    def other() -> None:
        with reference_counting_only():
            entered.set()
            release.wait(30)
        seen.append(gc.isenabled())

    with PausedCollection():
        thread = threading.Thread(target=other)
        thread.start()
        assert entered.wait(30)
    assert not gc.isenabled()  # the other thread's stretch goes on
    release.set()
    thread.join(30)
    assert seen == [True]  # on again once the last stretch ended
    assert gc.isenabled()


def test_nested_stretches_under_a_collector_the_application_turned_off_leave_it_off() -> None:
    gc.disable()
    try:
        with reference_counting_only(), PausedCollection(most=0) as pause:
            assert not gc.isenabled()
            assert not pause.due()
        assert not gc.isenabled()
    finally:
        gc.enable()
