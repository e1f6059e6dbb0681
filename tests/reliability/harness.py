"""The reliability tests' harness: scale (quick / long), figures for RELIABILITY.md, writers (in
threads of the test process or in subprocesses), a PostgreSQL server to stop and restart, and the
checks every fault test ends with.

`FLOWSTORE_LONG=1` selects the long variants (`scale(quick, long)`); `FLOWSTORE_RELIABILITY_OUT`
names a JSON-lines file the tests append their figures to (`python -m tests.reliability.report`
sets both and turns the file into RELIABILITY.md).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from flowstore import FlowError, FlowExistsError, FlowStore
from tests.pgserver import PostgresServer
from tests.reliability.ledger import Ledger, LedgerCheck, all_events
from tests.reliability.writer import RING, CountingStore, hammer

REPO = Path(__file__).resolve().parents[2]
LONG = os.environ.get("FLOWSTORE_LONG", "") not in ("", "0")
OUT_ENV = "FLOWSTORE_RELIABILITY_OUT"

T = TypeVar("T")


def scale(quick: T, long: T) -> T:
    """The quick value in CI, the long one under FLOWSTORE_LONG=1."""
    return long if LONG else quick


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    """Poll `condition` until it holds; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.005)  # polling a condition, not synchronising on time


def assert_tables_match_log(store: FlowStore) -> None:
    """The tables equal a replay of the log, naming the first differences if not."""
    differences = store.verify_projections()
    assert differences == [], [d.describe() for d in differences[:5]]


class Figures:
    """Rows for RELIABILITY.md: what was tried, how often, for how long, what held, what was lost."""

    def __init__(self, test: str) -> None:
        self.test = test
        self.rows: list[dict[str, Any]] = []

    def add(
        self,
        *,
        fault: str,
        backend: str,
        count: int | str,
        seconds: float,
        load: str,
        held: str,
        lost: int | str = 0,
        notes: str = "",
    ) -> None:
        """Record one row (written out only when the report runner asked for figures)."""
        row = {
            "test": self.test,
            "fault": fault,
            "backend": backend,
            "count": count,
            "seconds": round(seconds, 1),
            "load": load,
            "held": held,
            "lost": lost,
            "notes": notes,
            "long": LONG,
        }
        self.rows.append(row)
        if path := os.environ.get(OUT_ENV):
            with open(path, "a", encoding="utf-8") as out:
                out.write(json.dumps(row) + "\n")


class RestartablePostgres:
    """A PostgreSQL server of the test's own, to stop (fast or immediate) and start again."""

    def __init__(self, server: PostgresServer) -> None:
        self.server = server

    def stop(self, mode: str = "fast") -> None:
        """Stop the server; `immediate` is a crash (no checkpoint, clients cut off)."""
        s = self.server
        s._run(
            [s._bin("pg_ctl"), "stop", "-D", str(s.data_dir), "-m", mode, "-w", "-s"],
            timeout=90,
        )
        s._running = False

    def start(self) -> None:
        """Start it again on the same port and data directory; returns once it accepts."""
        s = self.server
        s._run(
            [
                *(s._bin("pg_ctl"), "start", "-D", str(s.data_dir)),
                *("-l", str(s.log_file), "-o", f"-p {s.port}", "-w", "-t", "60", "-s"),
            ],
            timeout=90,
        )
        s._running = True

    def create_database(self, options: str = "") -> str:
        """A fresh database's URL, with URL query `options` (e.g. `connect_timeout=1`)."""
        url = self.server.create_database("reliability")
        return f"{url}?{options}" if options else url


class WriterProcess:
    """`python -m tests.reliability.writer` in a subprocess, its output collected as it comes."""

    def __init__(
        self,
        url: str,
        writer: int,
        *,
        threads: int = 1,
        users: str = "u0,u1,u2",
        seconds: float = 0.0,
        seed: int = 0,
        wait_go: bool = False,
        max_retries: int = 50,
    ) -> None:
        argv = [
            *(sys.executable, "-m", "tests.reliability.writer", url),
            *("--writer", str(writer), "--threads", str(threads), "--users", users),
            *("--seconds", str(seconds), "--seed", str(seed), "--max-retries", str(max_retries)),
        ]
        if wait_go:
            argv.append("--wait-go")
        self.stderr = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 (closed in finish)
        self.process = subprocess.Popen(
            argv,
            cwd=REPO,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            text=True,
        )
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self.lines.append("<EOF>")
            self._changed.notify_all()

    def wait_for(
        self, condition: Callable[[list[str]], bool], what: str, timeout: float = 60
    ) -> None:
        """Wait until the output so far satisfies `condition`."""
        with self._changed:
            if not self._changed.wait_for(
                lambda: condition(self.lines) or "<EOF>" in self.lines, timeout
            ):
                pytest.fail(f"timed out after {timeout} s waiting for the writer: {what}")
            if not condition(self.lines):
                pytest.fail(f"the writer ended before {what}: {self.error_output()}")

    def wait_ready(self, timeout: float = 60) -> None:
        """Wait until its store is open."""
        self.wait_for(lambda lines: "READY" in lines, "READY", timeout)

    def accepted(self) -> int:
        """Accepted commands reported so far."""
        with self._changed:
            return sum(1 for line in self.lines if line.startswith("A "))

    def go(self) -> None:
        """Start a writer started with `wait_go`."""
        assert self.process.stdin is not None
        self.process.stdin.write("GO\n")
        self.process.stdin.flush()

    def kill(self) -> None:
        """SIGKILL, then collect what it printed before it died."""
        self.process.send_signal(signal.SIGKILL)
        self.finish()

    def finish(self, timeout: float = 120) -> list[str]:
        """Wait for it to exit; return every line it printed."""
        self.process.wait(timeout=timeout)
        self._reader.join(timeout=30)
        if self.process.stdin is not None:
            self.process.stdin.close()
        return [line for line in self.lines if line != "<EOF>"]

    def error_output(self) -> str:
        """The tail of its stderr."""
        self.stderr.seek(0)
        return self.stderr.read()[-3000:]

    def into(self, ledger: Ledger) -> None:
        """Add its reported outcomes to a ledger."""
        ledger.add_lines(self.lines)


def backend_of(url: str) -> str:
    return "postgres" if url.startswith("postgres") else "sqlite"


def create_ring(url: str) -> None:
    with FlowStore(url) as store, contextlib.suppress(FlowExistsError):
        store.create_flow(RING)


def settle(url: str, ledger: Ledger) -> LedgerCheck:
    """Open a new store (it catches up), check the ledger and the tables against the log."""
    with FlowStore(url) as store:
        check = ledger.check(all_events(store))
        assert check.problems == [], check.problems[:20]
        assert_tables_match_log(store)
    return check


class Hammers:
    """Writer threads in this process, sharing one store, reporting into one ledger."""

    def __init__(self, store: CountingStore, threads: int, *, writer: int = 0) -> None:
        self.ledger = Ledger()
        self.errors: Counter[str] = Counter()
        self.error_latency = 0.0
        self.accepted = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(
                target=hammer,
                kwargs={
                    "store": store,
                    "writer": writer,
                    "thread": t,
                    "users": ["u0", "u1", "u2", "u3"],
                    "stop": self._stop,
                    "emit": self._emit,
                    "on_error": self._on_error,
                },
                daemon=True,
            )
            for t in range(threads)
        ]
        for thread in self._threads:
            thread.start()

    def _emit(self, line: str) -> None:
        with self._lock:
            self.ledger.add_line(line)
            self.accepted += line.startswith("A ")

    def _on_error(self, exc: BaseException, seconds: float) -> None:
        kind = f"{type(exc).__module__}.{type(exc).__qualname__}"
        with self._lock:
            self.errors[f"{kind} (FlowError: {isinstance(exc, FlowError)})"] += 1
            self.error_latency = max(self.error_latency, seconds)

    def failures(self) -> int:
        with self._lock:
            return sum(self.errors.values())

    def wait_for_progress(self, more: int, what: str, timeout: float = 120) -> None:
        """Wait until `more` further commands were accepted."""
        start = self.accepted
        wait_until(lambda: self.accepted >= start + more, what, timeout)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=300)
            assert not thread.is_alive(), "a writer thread hangs"
