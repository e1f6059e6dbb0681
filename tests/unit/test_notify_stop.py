"""A wait for the log's next append ends when its stop is set, whether before or during the wait."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from flowstore.notify import LogNotifier
from flowstore.storage import parse_url

pytestmark = pytest.mark.timeout(60)  # a wait that the stop does not end fails here


@pytest.fixture
def notifier(tmp_path: Path) -> LogNotifier:
    # No channel: nothing notifies, so only the stop (or the hour) can end a wait.
    return LogNotifier(parse_url(f"sqlite:///{tmp_path / 'f.db'}"), None)


def test_a_stop_set_before_the_wait_ends_it_at_once(notifier: LogNotifier) -> None:
    stop = threading.Event()
    stop.set()
    assert notifier.wait(0, 3600, stop=stop)


def test_a_stop_set_during_the_wait_ends_it_once_woken(notifier: LogNotifier) -> None:
    stop, started, ended = threading.Event(), threading.Event(), threading.Event()

    def waiter() -> None:
        started.set()
        notifier.wait(0, 3600, stop=stop)
        ended.set()

    thread = threading.Thread(target=waiter)
    thread.start()
    started.wait()
    stop.set()
    notifier.wake()
    thread.join()
    assert ended.is_set()


def test_a_wait_without_a_stop_still_times_out(notifier: LogNotifier) -> None:
    assert not notifier.wait(0, 0.01)
