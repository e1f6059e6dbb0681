"""Pausing the cyclic garbage collector over stretches that may overlap in several threads."""

from __future__ import annotations

import gc
import threading

from flowstore.gcpause import reference_counting_only


def test_overlapping_pauses_in_two_threads_keep_the_collector_off_until_the_last_ends() -> None:
    assert gc.isenabled()
    entered, release = threading.Event(), threading.Event()
    seen: list[bool] = []

    def other() -> None:
        with reference_counting_only():
            entered.set()
            release.wait(30)
        seen.append(gc.isenabled())

    with reference_counting_only():
        thread = threading.Thread(target=other)
        thread.start()
        assert entered.wait(30)
    assert not gc.isenabled()  # the other thread's stretch goes on
    release.set()
    thread.join(30)
    assert seen == [True]  # on again when the last stretch ended
    assert gc.isenabled()


def test_a_collector_the_application_turned_off_stays_off() -> None:
    gc.disable()
    try:
        with reference_counting_only(), reference_counting_only():
            assert not gc.isenabled()
        assert not gc.isenabled()
    finally:
        gc.enable()
