"""Faults injected at random moments while writers run; afterwards nothing accepted is lost or
doubled (`tests.reliability.ledger`) and the tables equal a replay of the log.

- a writer process killed with SIGKILL mid-run (SQLite and PostgreSQL);
- a projection worker (`flowstore projections run`) killed with SIGKILL while writers run;
- PostgreSQL stopped (fast or immediate) and started again under load;
- the SQLite database made read-only (immutable: `chattr +i`) under load, then writable again;
- an append that committed but whose reply was lost (simulated): it must not be applied twice.

The Kafka faults (publisher killed, broker frozen, broker restarted) are in `test_kafka_faults.py`.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from eventsourcing.persistence import OperationalError

from flowstore import FlowStore, StorageUnavailableError
from flowstore.domain import TransitionExecuted
from flowstore.projections.sql import SqlProjections
from flowstore.storage import parse_url
from flowstore.testing import Internals
from tests.pgserver import PostgresServer
from tests.reliability.harness import (
    REPO,
    Figures,
    Hammers,
    RestartablePostgres,
    WriterProcess,
    backend_of,
    create_ring,
    scale,
    settle,
    wait_until,
)
from tests.reliability.ledger import Ledger, all_events
from tests.reliability.writer import FLOW, CountingStore

CLI = [sys.executable, "-m", "flowstore.adapters.cli"]


# kill -9 of a writer


def test_a_writer_killed_mid_run_loses_no_accepted_transition(
    store_url: str, figures: Figures
) -> None:
    rng = random.Random()
    create_ring(store_url)
    ledger = Ledger()
    kills = scale(3, 25)
    began = time.monotonic()
    for writer in range(1, kills + 1):
        process = WriterProcess(store_url, writer, threads=2, seed=rng.randrange(10**6))
        process.wait_ready()
        enough = rng.randint(1, 30)
        process.wait_for(
            lambda lines, n=enough: sum(1 for x in lines if x.startswith("A ")) >= n,
            f"{enough} accepted transitions",
        )
        time.sleep(rng.uniform(0, 0.03))  # then die at a random point of the work
        process.kill()
        process.into(ledger)
    check = settle(store_url, ledger)
    assert check.counts["accepted"] >= kills
    figures.add(
        fault="kill -9 of a writer process mid-run",
        backend=backend_of(store_url),
        count=kills,
        seconds=time.monotonic() - began,
        load="1 process x 2 threads, 4 users, random transitions",
        held="every accepted/rejected transition in the log exactly once, in order; verify == []",
        lost=check.lost,
        notes=f"{check.counts['accepted']} accepted, {check.counts['rejected']} rejected, "
        f"{check.in_flight_found} in-flight commands reached the log",
    )


# kill -9 of a projection worker


def test_a_projection_worker_killed_under_write_load_leaves_exact_tables(
    store_url: str, figures: Figures
) -> None:
    rng = random.Random()
    create_ring(store_url)
    tables = SqlProjections(parse_url(store_url))
    env = {**os.environ, "FLOWSTORE_URL": store_url}
    worker_args = [*CLI, "projections", "run", "--interval", "0.01", "--batch", "5"]
    kills = scale(3, 30)
    began = time.monotonic()
    store = CountingStore(store_url, live_projections=False)
    hammers = Hammers(store, threads=2)
    try:
        for _ in range(kills):
            before = tables.position()
            worker = subprocess.Popen(
                worker_args, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
            )
            wait_until(lambda b=before: tables.position() > b, "the worker to apply a batch")
            time.sleep(rng.uniform(0, 0.05))  # then die at a random point of the work
            worker.send_signal(signal.SIGKILL)
            worker.wait()
        hammers.stop()
        head = store.log_position()
        worker = subprocess.Popen(
            worker_args, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        wait_until(lambda: tables.position() >= head, "the last worker to catch up", 120)
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=60) == 0
    finally:
        hammers.stop()
        store.close()
    check = settle(store_url, hammers.ledger)
    with FlowStore(store_url) as reader:
        after_kills = tables.snapshot()
        reader.rebuild_projections()
        assert tables.compare(after_kills, tables.snapshot()) == []
    tables.close()
    figures.add(
        fault="kill -9 of a projection worker (projections run)",
        backend=backend_of(store_url),
        count=kills,
        seconds=time.monotonic() - began,
        load="2 writer threads during the kills",
        held="tables == replay of the log (verify) == rebuild; ledger exact",
        lost=check.lost,
        notes=f"{check.counts['accepted']} accepted while the worker was killed",
    )


# PostgreSQL stopped and restarted


def test_postgres_stopped_and_restarted_under_load_loses_nothing(
    restartable_pg: RestartablePostgres, figures: Figures
) -> None:
    rng = random.Random()
    url = restartable_pg.create_database("connect_timeout=1")
    create_ring(url)
    cycles = scale(1, 6)
    began = time.monotonic()
    modes: Counter[str] = Counter()
    recovery = 0.0
    store = CountingStore(url)
    hammers = Hammers(store, threads=4)
    try:
        for _ in range(cycles):
            hammers.wait_for_progress(rng.randint(5, 40), "writes before the stop")
            mode = rng.choice(["fast", "immediate"])
            failures = hammers.failures()
            restartable_pg.stop(mode)
            modes[mode] += 1
            wait_until(lambda f=failures: hammers.failures() > f, "a writer to see the outage", 120)
            time.sleep(rng.uniform(0, 1.0))  # stay down a random while
            restartable_pg.start()
            restarted = time.monotonic()
            hammers.wait_for_progress(5, "writes after the restart", timeout=180)
            recovery = max(recovery, time.monotonic() - restarted)
    finally:
        if not restartable_pg.server._running:
            restartable_pg.start()
        hammers.stop()
        store.close()
    check = settle(url, hammers.ledger)
    figures.add(
        fault="PostgreSQL stopped (fast/immediate) and restarted under load",
        backend="postgres",
        count=f"{cycles} ({', '.join(f'{n} {m}' for m, n in sorted(modes.items()))})",
        seconds=time.monotonic() - began,
        load="4 writer threads, 4 users",
        held="ledger exact after restart; verify == []",
        lost=check.lost,
        notes=f"{check.counts['accepted']} accepted, {check.counts['failed']} failed while down "
        f"(slowest failure {hammers.error_latency:.1f} s, connect_timeout=1); back to accepting "
        f"{recovery:.1f} s after the restart at worst; errors seen: "
        + "; ".join(f"{n} x {kind}" for kind, n in hammers.errors.most_common()),
    )
    print(hammers.errors)


def test_a_command_while_postgres_is_down_raises_a_flow_error(
    restartable_pg: RestartablePostgres,
) -> None:
    url = restartable_pg.create_database("connect_timeout=1")
    create_ring(url)
    with FlowStore(url) as store:
        before = store.execute_transition("ann", FLOW, "tick")
        restartable_pg.stop("fast")
        try:
            with pytest.raises(StorageUnavailableError, match="PostgreSQL") as caught:
                store.execute_transition("ann", FLOW, "tick")
            assert isinstance(caught.value.__cause__, OperationalError)
            with pytest.raises(StorageUnavailableError, match="opening"):
                FlowStore(url)
        finally:
            restartable_pg.start()
        # Nothing was written, and the store goes on from the state it had.
        assert store.get_flow_state("ann", FLOW) == before
        assert store.execute_transition("ann", FLOW, "tick").version == before.version + 1


# SQLite made read-only


def _immutable(paths: list[Path], on: bool) -> None:
    existing = [str(p) for p in paths if p.exists()]
    if existing:
        subprocess.run(["chattr", "+i" if on else "-i", *existing], check=True, capture_output=True)


@pytest.fixture
def read_only_files(tmp_path: Path) -> Iterator[Callable[[bool], None]]:
    """`set(True)` makes the SQLite database and its -wal immutable: even root cannot write.

    Not the -shm: SQLite maps it into memory, and a write fault on a page of an immutable mapped
    file kills the process with SIGBUS (no error to check, whatever the library does).
    """
    db = tmp_path / "store.db"
    paths = [db, Path(f"{db}-wal")]
    probe = tmp_path / "probe"
    probe.write_text("x")
    if shutil.which("chattr") is None:
        pytest.skip("needs chattr")
    try:
        _immutable([probe], True)
        _immutable([probe], False)
    except subprocess.CalledProcessError:
        pytest.skip("chattr +i is not allowed here (needs CAP_LINUX_IMMUTABLE and ext4/xfs)")
    try:
        yield lambda on: _immutable(paths, on)
    finally:
        _immutable(paths, False)


def test_sqlite_made_read_only_under_load_refuses_writes_and_corrupts_nothing(
    tmp_path: Path, read_only_files: Callable[[bool], None], figures: Figures
) -> None:
    rng = random.Random()
    url = f"sqlite:///{tmp_path / 'store.db'}"
    create_ring(url)
    rounds = scale(3, 20)
    began = time.monotonic()
    opening: Counter[str] = Counter()
    store = CountingStore(url)
    hammers = Hammers(store, threads=2)
    try:
        for _ in range(rounds):
            hammers.wait_for_progress(rng.randint(1, 40), "writes before the freeze")
            failures = hammers.failures()
            read_only_files(True)
            try:
                wait_until(lambda f=failures: hammers.failures() >= f + 3, "writes to fail")
                position = store.log_position()
                states = {u: store.get_flow_state(u, FLOW) for u in ("u0", "u1", "u2", "u3")}
                try:
                    FlowStore(url).close()
                except Exception as exc:
                    opening[f"{type(exc).__module__}.{type(exc).__qualname__}"] += 1
                else:
                    opening["opened"] += 1
                assert store.log_position() == position  # nothing got through meanwhile
                assert {u: store.get_flow_state(u, FLOW) for u in states} == states
            finally:
                read_only_files(False)
            hammers.wait_for_progress(3, "writes after the file is writable again")
    finally:
        read_only_files(False)
        hammers.stop()
        store.close()
    check = settle(url, hammers.ledger)
    with contextlib.closing(sqlite3.connect(tmp_path / "store.db")) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    assert opening["opened"] == 0, "a store opened on a read-only database"
    figures.add(
        fault="SQLite database and its -wal made read-only (chattr +i) under load",
        backend="sqlite",
        count=rounds,
        seconds=time.monotonic() - began,
        load="2 writer threads, 4 users",
        held="writes refused, log and states unchanged while read-only; integrity_check ok; "
        "ledger exact; verify == []",
        lost=check.lost,
        notes=f"{check.counts['accepted']} accepted, {check.counts['failed']} refused; errors: "
        + "; ".join(f"{n} x {kind}" for kind, n in hammers.errors.most_common())
        + "; opening a store: "
        + "; ".join(f"{n} x {kind}" for kind, n in opening.most_common()),
    )
    print(hammers.errors, opening)


def test_a_command_on_a_read_only_database_raises_a_flow_error(
    tmp_path: Path, read_only_files: Callable[[bool], None]
) -> None:
    url = f"sqlite:///{tmp_path / 'store.db'}"
    create_ring(url)
    with FlowStore(url) as store:
        before = store.execute_transition("ann", FLOW, "tick")
        read_only_files(True)
        try:
            with pytest.raises(StorageUnavailableError, match="SQLite") as caught:
                store.execute_transition("ann", FLOW, "tick")
            assert isinstance(caught.value.__cause__, OperationalError)
            with pytest.raises(StorageUnavailableError, match="read-only"):
                FlowStore(url)
            assert store.get_flow_state("ann", FLOW) == before  # nothing was written
        finally:
            read_only_files(False)
        assert store.execute_transition("ann", FLOW, "tick").version == before.version + 1


def test_connections_opened_while_the_file_was_read_only_write_again_once_it_is_not(
    tmp_path: Path, read_only_files: Callable[[bool], None]
) -> None:
    """SQLite opens a file it may not write read-only, and such a connection stays read-only
    (in CI: a store's live projector refused every batch after the file was writable again).
    Here every connection of both pools is opened during the read-only spell: once the file is
    writable, the first command goes through and the tables catch up."""
    url = f"sqlite:///{tmp_path / 'store.db'}"
    create_ring(url)
    with FlowStore(url) as store:
        before = store.execute_transition("ann", FLOW, "tick")
        store.sync_projections()
        read_only_files(True)
        try:
            Internals(store).drop_idle_connections()
            assert store.read_events(1, 1000)  # the log's pool opens one: read-only
            assert store.get_flow_history("ann", FLOW)  # and the tables' engine
        finally:
            read_only_files(False)
        after = store.execute_transition("ann", FLOW, "tick")
        assert after.version == before.version + 1
        store.sync_projections()
        assert store.get_flow_state("ann", FLOW) == after
        assert store.verify_projections() == []


# An append whose acknowledgement is lost


def test_an_append_whose_acknowledgement_was_lost_is_not_applied_twice(
    pg_server: PostgresServer,
) -> None:
    url = pg_server.create_database()
    create_ring(url)
    with FlowStore(url) as store:
        store.execute_transition("ann", FLOW, "tick")
        # Committed; then what eventsourcing's retry of the same insert raises.
        with Internals(store).lost_acknowledgement() as appends:
            state = store.execute_transition("ann", FLOW, "tick", {"nonce": "once"})
        assert appends == [1]  # no second decision, no second append
        assert state.payload == {"nonce": "once"}
        copies = [
            e
            for _, e in all_events(store)
            if isinstance(e, TransitionExecuted) and e.payload == {"nonce": "once"}
        ]
        assert len(copies) == 1
