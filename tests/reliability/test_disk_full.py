"""The disk fills up under load: commands fail with a clear error, nothing is corrupted, and the
store takes writes again once space is freed (the read-only half of that issue is in
`test_faults.py`).

The store lives on a small filesystem of its own: a tmpfs, else a loop-mounted ext4 image (the tests
skip, saying why, when neither can be mounted). Writer threads hammer transitions; at a random
moment a filler file takes all the free space but a random remainder, the writers' own growth takes
the rest, and commands start failing. After a random while the filler is deleted. The same store
must then accept writes again and its tables catch up; SQLite's `PRAGMA integrity_check` (or
PostgreSQL's amcheck) finds nothing; at the end every accepted or rejected transition is in the log
exactly once and the tables equal a replay of the log.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import sqlite3
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import pytest

from flowstore import FlowError, FlowStore
from tests.pgserver import PostgresServer
from tests.reliability.harness import (
    Figures,
    Hammers,
    RestartablePostgres,
    assert_tables_match_log,
    create_ring,
    scale,
    settle,
    wait_until,
)
from tests.reliability.writer import FLOW, CountingStore

USERS = ("u0", "u1", "u2", "u3")  # the users Hammers writes to
MOST_LEFT = 256 * 1024
"""The filler leaves 0 to this many bytes free: the writers fill the rest themselves."""


# A small filesystem


class SmallDisk:
    """A small filesystem of the test's own, and a filler file that takes its free space."""

    def __init__(self, path: Path, kind: str) -> None:
        self.path = path
        self.kind = kind
        self.filler = path / "filler"

    def available(self) -> int:
        """Bytes an unprivileged process may still write."""
        stat = os.statvfs(self.path)
        return stat.f_bavail * stat.f_frsize

    def fill(self, leave: int) -> None:
        """Take all the free space but `leave` bytes (all of it if the store grows meanwhile)."""
        target = max(0, self.available() - leave)
        chunk = bytes(64 * 1024)
        with open(self.filler, "ab", buffering=0) as out:
            written = 0
            with contextlib.suppress(OSError):  # ENOSPC: the writers were quicker
                while written < target:
                    written += out.write(chunk[: target - written])

    def free(self) -> None:
        """Delete the filler."""
        self.filler.unlink(missing_ok=True)


def _run(argv: list[str]) -> None:
    subprocess.run(argv, check=True, capture_output=True, text=True, timeout=60)


def _why(exc: Exception) -> str:
    if isinstance(exc, subprocess.CalledProcessError):
        return (exc.stderr or exc.stdout or str(exc)).strip().splitlines()[-1]
    return str(exc)


@contextlib.contextmanager
def small_disk(megabytes: int) -> Iterator[SmallDisk]:
    """Mount a `megabytes` tmpfs (else an ext4 image on a loop device); unmount it afterwards.

    Needs root (CAP_SYS_ADMIN); skips the test, naming both failures, when neither mount works. It
    is mounted in a directory of its own under the system temp dir, which (unlike pytest's) the
    `postgres` OS user can traverse. The ext4 image reserves no blocks for root, so "full" is full
    for every process.
    """
    home = Path(tempfile.mkdtemp(prefix="flowstore-disk-"))
    home.chmod(0o755)
    path = home / "disk"
    path.mkdir()
    try:
        try:
            _run(["mount", "-t", "tmpfs", "-o", f"size={megabytes}m,mode=0755", "tmpfs", str(path)])
            kind = f"tmpfs of {megabytes} MB"
        except (OSError, subprocess.CalledProcessError) as tmpfs_failed:
            image = home / "disk.ext4"
            try:
                _run(["truncate", "-s", f"{megabytes}M", str(image)])
                _run(["mkfs.ext4", "-q", "-F", "-m", "0", str(image)])
                _run(["mount", "-o", "loop", str(image), str(path)])
                path.chmod(0o755)
                kind = f"loop-mounted ext4 image of {megabytes} MB"
            except (OSError, subprocess.CalledProcessError) as loop_failed:
                pytest.skip(
                    "needs a small filesystem of its own: mount -t tmpfs failed "
                    f"({_why(tmpfs_failed)}) and so did a loop-mounted ext4 image "
                    f"({_why(loop_failed)})"
                )
        try:
            yield SmallDisk(path, kind)
        finally:
            if subprocess.run(["umount", str(path)], capture_output=True, check=False).returncode:
                subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)
    finally:
        shutil.rmtree(home, ignore_errors=True)


# What the stores on it are checked with


def sqlite_problems(path: Path) -> list[str]:
    """What `PRAGMA integrity_check` finds (nothing, when it says ok)."""
    with contextlib.closing(sqlite3.connect(path)) as conn:
        rows = [row[0] for row in conn.execute("PRAGMA integrity_check").fetchall()]
    return [] if rows == ["ok"] else rows


def postgres_problems(url: str, *, parent_check: bool = False) -> list[str]:
    """What amcheck finds in the database's tables (verify_heapam) and B-tree indexes.

    `parent_check` also checks the indexes' parent/child links (it blocks writers meanwhile).
    """
    check = "bt_index_parent_check(c.oid, true)" if parent_check else "bt_index_check(c.oid, true)"
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS amcheck")
        problems = [
            f"{table}: block {block} offset {offset}: {message}"
            for table, block, offset, message in conn.execute(
                "SELECT c.relname, v.blkno, v.offnum, v.msg FROM pg_class c, "
                "LATERAL verify_heapam(c.oid) v "
                "WHERE c.relkind = 'r' AND c.relnamespace = 'public'::regnamespace"
            ).fetchall()
        ]
        indexes = conn.execute(
            f"SELECT c.relname, {check} FROM pg_class c JOIN pg_am a ON a.oid = c.relam "
            "WHERE a.amname = 'btree' AND c.relnamespace = 'public'::regnamespace"
        ).fetchall()
        assert indexes, "no index was checked"
    return problems


# The run


@dataclass
class FullDiskRun:
    """What a run of fills and frees saw."""

    rounds: int = 0
    accepted_after_fill: int = 0
    """Commands accepted between the filler and the first failure (the writers filled the rest)."""
    accepted_while_full: int = 0
    """Commands accepted after the first failure and before the filler was deleted."""
    state_reads: int = 0
    """get_flow_state calls that answered while the disk was full (they read the log)."""
    errors_while_reading: Counter[str] = field(default_factory=Counter)
    to_fail: float = 0.0
    """Slowest time from the filler to the first failed command."""
    to_write: float = 0.0
    """Slowest time from deleting the filler to the next accepted command."""
    to_catch_up: float = 0.0
    """Slowest time from deleting the filler to the tables reflecting every write."""


def fill_and_free_under_load(
    store: CountingStore,
    hammers: Hammers,
    disk: SmallDisk,
    *,
    rounds: int,
    failures: int,
    check: Callable[[], list[str]],
    keep_up: Callable[[], None],
) -> FullDiskRun:
    """Fill the disk at random moments while `hammers` write, wait for `failures` failed commands,
    stay full a random while, free it; after each round the writes resume, the tables catch up and
    `check` finds no corruption. `keep_up` runs while waiting for the writes to resume."""
    rng = random.Random()
    run = FullDiskRun()
    for _ in range(rounds):
        hammers.wait_for_progress(rng.randint(1, 60), "writes before the disk fills")
        failed, accepted = hammers.failures(), hammers.accepted
        filled = time.monotonic()
        disk.fill(leave=rng.randint(0, MOST_LEFT))
        try:
            wait_until(lambda f=failed: hammers.failures() > f, "a command to fail", 120)
            run.to_fail = max(run.to_fail, time.monotonic() - filled)
            run.accepted_after_fill += hammers.accepted - accepted
            accepted = hammers.accepted
            wait_until(lambda f=failed: hammers.failures() >= f + failures, "more failures", 120)
            for user in USERS:  # they need no space: they answer (or fail if the server is down)
                try:
                    store.get_flow_state(user, FLOW)
                except Exception as exc:  # e.g. PostgreSQL restarting after a PANIC
                    kind = f"{type(exc).__module__}.{type(exc).__qualname__}"
                    run.errors_while_reading[
                        f"{kind} (FlowError: {isinstance(exc, FlowError)})"
                    ] += 1
                else:
                    run.state_reads += 1
            time.sleep(rng.uniform(0, 0.3))  # stay full a random while
            run.accepted_while_full += hammers.accepted - accepted
        finally:
            disk.free()
        freed = time.monotonic()

        def resumed(target: int = hammers.accepted + 3) -> bool:
            keep_up()
            return hammers.accepted >= target

        wait_until(resumed, "writes after the filler was deleted", 120)
        run.to_write = max(run.to_write, time.monotonic() - freed)
        store.sync_projections(timeout=60)
        run.to_catch_up = max(run.to_catch_up, time.monotonic() - freed)
        assert check() == []
        run.rounds += 1
    return run


def describe(errors: Counter[str]) -> str:
    """`3 x module.Error (FlowError: True); ...`, the commonest first."""
    return "; ".join(f"{n} x {kind}" for kind, n in errors.most_common()) or "none"


def run_and_settle(
    url: str,
    disk: SmallDisk,
    figures: Figures,
    *,
    backend: str,
    rounds: int,
    failures: int,
    check: Callable[[], list[str]],
    keep_up: Callable[[], None] = lambda: None,
    notes: Callable[[], str] = str,
) -> None:
    """The whole test on one backend: fills and frees under load, then the checks and figures."""
    create_ring(url)
    began = time.monotonic()
    store = CountingStore(url)
    hammers = Hammers(store, threads=2)
    try:
        run = fill_and_free_under_load(
            store, hammers, disk, rounds=rounds, failures=failures, check=check, keep_up=keep_up
        )
        hammers.stop()
        store.sync_projections(timeout=60)
        assert_tables_match_log(store)  # the store that went through it, not only a fresh one
    finally:
        disk.free()
        hammers.stop()
        store.close()
    assert all(kind.endswith("(FlowError: True)") for kind in run.errors_while_reading), (
        run.errors_while_reading
    )
    ledger = settle(url, hammers.ledger)  # a new store: ledger exact, verify == []
    with FlowStore(url) as again:
        again.execute_transition("after", FLOW, "tick")  # a freshly opened store writes too
    assert check() == []
    figures.add(
        fault="disk full under load (filler file at a random moment), then space freed",
        backend=backend,
        count=rounds,
        seconds=time.monotonic() - began,
        load="2 writer threads, 4 users",
        held="commands fail while full; reads of state answer (or raise a FlowError); once "
        "space is freed the same store writes again and its tables catch up; "
        + ("integrity_check ok" if backend == "sqlite" else "amcheck (heap and B-tree) clean")
        + " after every round; ledger exact; verify == []",
        lost=ledger.lost,
        notes=f"{disk.kind}, filler leaving 0-{MOST_LEFT // 1024} KB; "
        f"{ledger.counts['accepted']} accepted ({run.accepted_after_fill} after the filler, "
        f"{run.accepted_while_full} after the first failure), {ledger.counts['rejected']} "
        f"rejected, {ledger.counts['failed']} failed; first failure <= {run.to_fail:.2f} s "
        f"after the filler (slowest failing command {hammers.error_latency:.2f} s); writing "
        f"again <= {run.to_write:.2f} s and tables caught up <= {run.to_catch_up:.1f} s after "
        f"the filler was deleted; {run.state_reads} state reads answered while full "
        f"({describe(run.errors_while_reading)} failed); errors: "
        + describe(hammers.errors)
        + notes(),
    )
    print(hammers.errors)


def first_failure(command: Callable[[int], object], limit: int = 100_000) -> Exception:
    """Run `command(0)`, `command(1)`, ... until it raises; return what it raised."""
    for attempt in range(limit):
        try:
            command(attempt)
        except Exception as exc:
            return exc
    pytest.fail(f"{limit} commands went through on a full disk")


# SQLite


@pytest.fixture
def sqlite_disk() -> Iterator[SmallDisk]:
    """A 32 MB filesystem for one SQLite store (it grows well under that in a long run)."""
    with small_disk(32) as disk:
        yield disk


def test_sqlite_on_a_full_disk_refuses_writes_and_corrupts_nothing(
    sqlite_disk: SmallDisk, figures: Figures
) -> None:
    db = sqlite_disk.path / "store.db"
    run_and_settle(
        f"sqlite:///{db}",
        sqlite_disk,
        figures,
        backend="sqlite",
        rounds=scale(3, 20),
        failures=5,
        check=lambda: sqlite_problems(db),
    )


def test_a_command_on_a_full_sqlite_disk_raises_a_flow_error(sqlite_disk: SmallDisk) -> None:
    url = f"sqlite:///{sqlite_disk.path / 'store.db'}"
    create_ring(url)
    with FlowStore(url) as store:
        store.execute_transition("ann", FLOW, "tick")
        for leave in (0, 64 * 1024):  # full at once; full after a few commands
            sqlite_disk.fill(leave)
            try:
                error = first_failure(lambda i: store.execute_transition("ann", FLOW, "tick"))
            finally:
                sqlite_disk.free()
            assert isinstance(error, FlowError), repr(error)
            store.execute_transition("ann", FLOW, "tick")


def test_a_table_read_on_a_full_disk_answers_or_fails_fast_with_a_flow_error(
    sqlite_disk: SmallDisk,
) -> None:
    url = f"sqlite:///{sqlite_disk.path / 'store.db'}"
    create_ring(url)
    with FlowStore(url) as store, ThreadPoolExecutor(1) as pool:
        store.execute_transition("ann", FLOW, "tick")
        store.sync_projections()
        sqlite_disk.fill(64 * 1024)  # a few commands get in, then neither they nor rows fit
        try:
            first_failure(lambda i: store.execute_transition("ann", FLOW, "tick"))
            if store.projection_position() >= store.log_position():
                pytest.fail("the tables kept up: the disk filled before the log's last event")
            read = pool.submit(store.get_flow_history, "ann", FLOW)
            with contextlib.suppress(TimeoutError):
                read.exception(timeout=5)
            answered = read.done()
        finally:
            sqlite_disk.free()  # the projector catches up and the read returns
        assert answered, "get_flow_history still waiting 5 s into a full disk"
        error = read.exception()
        assert error is None or isinstance(error, FlowError), repr(error)


# PostgreSQL


@dataclass
class PostgresOnSmallDisk:
    """A PostgreSQL server whose data directory (WAL included) is on a small disk."""

    server: PostgresServer
    disk: SmallDisk
    revived: int = 0
    """Times the test started the server again because it had given up."""

    def starts(self) -> int:
        """Times the server became ready, from its log (which is on the small disk too: a line
        written while the disk was full is lost)."""
        try:
            text = self.server.log_file.read_text(errors="replace")
        except OSError:
            return 0
        return text.count("database system is ready to accept connections")

    def revive(self) -> None:
        """Start the server again if it gave up: a WAL write that finds no space is a PANIC, and
        the crash recovery that follows fails too while the disk is full (an operator restarts it)."""
        if not self.server.alive():
            time.sleep(0.5)  # not in the middle of starting or stopping: still down
            if not self.server.alive():
                RestartablePostgres(self.server).start()
                self.revived += 1

    def accepting(self) -> bool:
        """Whether the server is up (started again if it gave up) and takes connections: after
        a PANIC it first replays its WAL, refusing them meanwhile."""
        self.revive()
        try:
            psycopg.connect(self.server.url(), connect_timeout=1).close()
        except psycopg.OperationalError:
            return False
        return True


@pytest.fixture(scope="module")
def pg_on_small_disk() -> Iterator[PostgresOnSmallDisk]:
    """A server of this module's own on a 192 MB filesystem (the session's server is never filled).

    WAL is kept to two 16 MB segments so that the cluster (about 70 MB) leaves room for the test.
    """
    if shutil.which("runuser") is None and os.geteuid() == 0:
        pytest.skip("needs runuser to start PostgreSQL as root")
    with (
        small_disk(192) as disk,
        PostgresServer.start(base_dir=disk.path) as server,
    ):
        with psycopg.connect(server.url(), autocommit=True) as conn:
            conn.execute("ALTER SYSTEM SET min_wal_size = '32MB'")
            conn.execute("ALTER SYSTEM SET max_wal_size = '32MB'")
            conn.execute("SELECT pg_reload_conf()")
        yield PostgresOnSmallDisk(server, disk)


def test_postgres_on_a_full_disk_refuses_writes_and_corrupts_nothing(
    pg_on_small_disk: PostgresOnSmallDisk, figures: Figures
) -> None:
    url = pg_on_small_disk.server.create_database("diskfull")
    starts, revived = pg_on_small_disk.starts(), pg_on_small_disk.revived
    run_and_settle(
        f"{url}?connect_timeout=1",
        pg_on_small_disk.disk,
        figures,
        backend="postgres",
        rounds=scale(2, 12),
        failures=2,  # each takes about 2 s: eventsourcing retries the insert ten times
        check=lambda: postgres_problems(url),
        keep_up=pg_on_small_disk.revive,
        notes=lambda: (
            f"; server restarts: {pg_on_small_disk.starts() - starts} "
            f"({pg_on_small_disk.revived - revived} by the test after the server gave up)"
        ),
    )
    assert postgres_problems(url, parent_check=True) == []


def test_a_command_on_a_full_postgres_disk_raises_a_flow_error(
    pg_on_small_disk: PostgresOnSmallDisk,
) -> None:
    url = pg_on_small_disk.server.create_database("diskfull")
    disk = pg_on_small_disk.disk
    create_ring(url)
    with FlowStore(f"{url}?connect_timeout=1") as store:
        store.execute_transition("ann", FLOW, "tick")
        disk.fill(0)
        try:
            error = first_failure(lambda i: store.execute_transition("ann", FLOW, "tick"))
        finally:
            disk.free()
        assert isinstance(error, FlowError), repr(error)
        # Whether the server survived depends on which write found the disk full: a WAL write is
        # a PANIC, and the recovery that follows fails too while the disk is full (the
        # postmaster gives up). Once it is back, the same store's next command goes through.
        wait_until(pg_on_small_disk.accepting, "the server to accept connections again", 120)
        store.execute_transition("ann", FLOW, "tick")
