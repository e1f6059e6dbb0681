"""`flowstore worker` as real processes: one leads each job, a standby takes over after kill -9."""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from queue import Empty, Queue
from typing import Any

import pytest

from flowstore import FlowStore
from flowstore.adapters.worker import WorkerSettings, run_worker
from flowstore.leader import LeaderLock, run_elected
from flowstore.storage import parse_url
from tests.flows import linear, ring
from tests.pgserver import PostgresServer

pytestmark = pytest.mark.timeout(180)

ROOT = Path(__file__).resolve().parents[2]


class Worker:
    """A `flowstore worker` process whose log lines the test reads as they come."""

    def __init__(self, url: str, *extra: str, env: dict[str, str] | None = None) -> None:
        env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "FLOWSTORE_KAFKA_BOOTSTRAP": "",
            **(env or {}),
        }
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "flowstore.adapters.cli",
                "--url",
                url,
                "worker",
                "--interval",
                "0.05",
                "--expire-every",
                "0",
                *extra,
            ],
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            text=True,
            env=env,
        )
        self.lines: Queue[str] = Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.put(line)
        self.lines.put("")  # the process ended

    def read_line(self) -> str:
        """The next log line (fail if none comes, or the process ends)."""
        try:
            line = self.lines.get(timeout=120)
        except Empty:
            pytest.fail("the worker logged nothing for 120 s")
        if not line:
            pytest.fail(f"the worker ended (exit code {self.process.wait()})")
        return line

    def wait_for(self, text: str) -> None:
        """Block until a log line contains `text` (fail if the process ends first)."""
        while text not in self.read_line():
            pass

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=60)

    def signal_a_job_thread(self, signum: int) -> None:
        """Send `signum` to one thread of the worker other than its main thread (Linux).

        What the kernel does with a signal sent to the process when another thread takes it
        first: the C-level handler runs in that thread, and the main thread is not interrupted.
        """
        libc = ctypes.CDLL(None, use_errno=True)
        pid = self.process.pid
        for task in sorted(Path(f"/proc/{pid}/task").iterdir()):
            if int(task.name) == pid:
                continue  # the main thread
            if libc.tgkill(pid, int(task.name), signum) == 0:
                return
            if ctypes.get_errno() != errno.ESRCH:  # ESRCH: that thread ended meanwhile
                raise OSError(ctypes.get_errno(), "tgkill")
        pytest.fail("the worker has no thread besides its main thread")


@pytest.fixture
def workers() -> Iterator[list[Worker]]:
    started: list[Worker] = []
    yield started
    for worker in started:
        if worker.process.poll() is None:
            worker.kill()


def wait_until(condition: Callable[[], bool], what: str) -> None:
    """Poll `condition` (pytest-timeout bounds the test)."""
    while not condition():
        time.sleep(0.01)  # the pace of a polling loop that checks the condition
    assert condition(), what


def test_a_standby_worker_takes_over_projections_after_the_leader_is_killed(
    store_url: str, workers: list[Worker]
) -> None:
    with FlowStore(store_url, live_projections=False) as store:
        store.create_flow(ring("r"))
        first = Worker(store_url)
        workers.append(first)
        first.wait_for("leading projections")
        lock = LeaderLock(parse_url(store_url), "projections")
        assert not lock.try_acquire()  # the leader holds it
        second = Worker(store_url)
        workers.append(second)
        store.execute_transition("ann", "r", "tick")
        wait_until(lambda: store.projection_position() == store.log_position(), "first leader")

        first.kill()
        second.wait_for("leading projections")
        store.execute_transition("bob", "r", "tick")
        wait_until(lambda: store.projection_position() == store.log_position(), "new leader")
        assert store.verify_projections() == []
        assert second.stop() == 0


def test_a_stopped_worker_hands_its_jobs_over(store_url: str, workers: list[Worker]) -> None:
    first = Worker(store_url)
    workers.append(first)
    first.wait_for("leading projections")
    second = Worker(store_url)
    workers.append(second)
    assert first.stop() == 0  # SIGTERM: releases the locks on its way out
    second.wait_for("leading projections")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="tgkill and /proc are Linux's")
def test_a_worker_stops_when_sigterm_reaches_a_thread_other_than_its_main_thread(
    store_url: str, workers: list[Worker]
) -> None:
    # Linux hands a signal sent to a process to whichever of its threads takes it first (one
    # that just unblocked signals, as pthread_create does around clone, beats a sleeping main
    # thread): the worker's main thread, waiting for the stop without a timeout, never ran the
    # Python handler that sets it, and the worker ran on (CI: "took over 60 s after SIGTERM").
    worker = Worker(store_url)
    workers.append(worker)
    worker.wait_for("leading projections")
    worker.signal_a_job_thread(signal.SIGTERM)
    assert worker.process.wait(timeout=60) == 0
    worker.wait_for("no longer leading projections")  # it stopped its jobs on the way out


def test_a_stopping_worker_does_not_wait_out_its_projection_interval(
    pg_server: PostgresServer, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # PostgreSQL: between two catch-ups the projections job waits for the next append, or for
    # its interval. The stop must end that wait; it did not, so a worker with a long --interval
    # kept its job running until `run_worker` gave up on it after 30 s.
    caplog.set_level(logging.INFO)
    with FlowStore(pg_server.create_database(), live_projections=False) as store:
        notifier, waiting = store.log_notifier, threading.Event()
        wait_for_append = notifier.wait

        def wait(generation: int, timeout: float, **options: Any) -> bool:
            # The wait that only an append (or the stop) can end: the listener listens and has
            # made its first wake-up (generation 1), which the job has seen.
            if notifier.listening and generation == notifier.generation >= 1:
                waiting.set()
            return wait_for_append(generation, timeout, **options)

        monkeypatch.setattr(notifier, "wait", wait)
        stop = threading.Event()
        settings = WorkerSettings(interval=3600, jobs=("projections",))
        runner = threading.Thread(target=run_worker, args=(store, stop, settings))
        runner.start()
        waiting.wait()  # pytest-timeout bounds this
        stop.set()
        runner.join()
        messages = [record.getMessage() for record in caplog.records]
        assert "no longer leading projections" in messages
        assert not [message for message in messages if "did not stop" in message]


def test_only_one_of_two_elections_leads_at_a_time(store_url: str) -> None:
    config = parse_url(store_url)
    stop = threading.Event()
    steps = {"a": 0, "b": 0}

    def step(name: str) -> Callable[[], None]:
        def run() -> None:
            steps[name] += 1
            if sum(steps.values()) >= 20:
                stop.set()

        return run

    # Two locks of one name in one process stand for two processes (file and advisory locks
    # are per open file / per connection, not per process).
    a, b = LeaderLock(config, "job", store_key="k"), LeaderLock(config, "job", store_key="k")
    threads = [
        threading.Thread(target=run_elected, args=(lock, step(n), stop), kwargs={"interval": 0})
        for n, lock in (("a", a), ("b", b))
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert min(steps.values()) == 0  # the standby never ran while the leader held the lock
    assert not a.held
    assert not b.held


def test_the_worker_serves_metrics_naming_the_jobs_it_leads(
    store_url: str, workers: list[Worker]
) -> None:
    import httpx

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    worker = Worker(store_url, "--metrics-port", str(port))
    workers.append(worker)
    worker.wait_for("leading projections")
    text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    assert 'flowstore_leader{job="projections"} 1.0' in text
    assert "flowstore_projection_lag_events 0.0" in text
    assert worker.stop() == 0


def test_the_worker_counts_its_expiry_commands_and_projected_events(
    store_url: str, workers: list[Worker]
) -> None:
    from tests.e2e.http.test_metrics import commands, scrape

    with FlowStore(store_url, live_projections=False) as store:
        store.create_flow(linear("t", 3, ttl=1))
        store.execute_transition("ann", "t", "next")  # idle from now: expired a second later
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        worker = Worker(store_url, "--metrics-port", str(port), "--expire-every", "0.2")
        workers.append(worker)
        url = f"http://127.0.0.1:{port}/metrics"
        worker.wait_for("expired 1 flow instance")
        samples = scrape(url)
        assert samples[("flowstore_expired_total", ())] == 1.0
        assert commands(samples, "expire") == {"accepted": 1.0}
        # The worker projected the whole log (its own expiry included), each event once.
        head = store.log_position()
        projected = ("flowstore_projected_events_total", ())
        wait_until(lambda: scrape(url).get(projected, 0) >= head, "projected")
        assert scrape(url)[projected] == head
    assert worker.stop() == 0
