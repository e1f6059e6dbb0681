"""Load: N processes x M threads hammer PostgreSQL with transitions on overlapping users for a
bounded time. Every outcome is counted (accepted, conflicted and retried, rejected, gave up), and
afterwards every accepted transition is in the log exactly once and in order per instance."""

from __future__ import annotations

import threading
import time
from collections import Counter
from datetime import UTC, datetime
from typing import Any

import psycopg

from flowstore import FlowStore
from flowstore.decisions import start_flow
from flowstore.domain import instance_id
from flowstore.testing import Internals
from tests.flows import linear
from tests.pgserver import PostgresServer
from tests.reliability.harness import (
    Figures,
    WriterProcess,
    create_ring,
    scale,
    wait_until,
)
from tests.reliability.ledger import Ledger, all_events
from tests.reliability.writer import FLOW

USERS = ["u0", "u1", "u2", "u3", "u4"]


def test_processes_and_threads_on_overlapping_users_lose_nothing(
    pg_server: PostgresServer, figures: Figures
) -> None:
    processes, threads, seconds = scale((2, 2, 3.0), (4, 4, 60.0))
    url = pg_server.create_database()
    create_ring(url)
    writers = [
        WriterProcess(
            url,
            w,
            threads=threads,
            users=",".join(USERS),
            seconds=seconds,
            seed=w,
            wait_go=True,
            max_retries=100,
        )
        for w in range(1, processes + 1)
    ]
    for writer in writers:
        writer.wait_ready()
    began = time.monotonic()
    for writer in writers:  # all ready: start together
        writer.go()
    ledger = Ledger()
    for writer in writers:
        lines = writer.finish(timeout=seconds + 300)
        assert writer.process.returncode == 0, writer.error_output()
        assert lines[-1] == "DONE"
        ledger.add_lines(lines)
    elapsed = time.monotonic() - began
    retried = sum(
        1
        for v, detail in ledger.details.items()
        if ledger.outcomes[v] in "AR" and "retries=0" not in detail
    )
    with FlowStore(url) as store:
        events = all_events(store)
        check = ledger.check(events)
        assert check.problems == [], check.problems[:20]
        assert check.in_flight_found == 0  # every writer finished: nothing was in flight
        # Each instance's version (read from its events) is its number of events in the log.
        per_instance = Counter(e.originator_id for _, e in events)
        for user in USERS:
            iid = instance_id(user, FLOW)
            state = store.get_flow_state(user, FLOW)
            if state is None:
                continue
            assert state.version == per_instance[iid]
    counts = check.counts
    assert counts["accepted"] > 0
    assert check.retries > 0, "the writers never conflicted: the load proves little"
    assert counts["failed"] == 0
    with FlowStore(url) as store:
        differences = store.verify_projections()
    figures.add(
        fault="load: processes x threads on overlapping users",
        backend="postgres",
        count=f"{processes} processes x {threads} threads",
        seconds=elapsed,
        load=f"{len(USERS)} users shared by all, {seconds:.0f} s bounded",
        held="every accepted and rejected transition in the log exactly once, in order per "
        "instance; versions contiguous; verify == []",
        lost=check.lost,
        notes=f"{counts['accepted']} accepted ({counts['accepted'] / elapsed:.0f}/s), "
        f"{counts['rejected']} rejected, {retried} conflicted and retried "
        f"({check.retries} retries), {counts['gave up']} gave up"
        + (f"; VERIFY FOUND {len(differences)} DIFFERENCES" if differences else ""),
    )
    assert differences == [], [d.describe() for d in differences[:5]]


def test_an_append_that_commits_late_is_still_projected(pg_server: PostgresServer) -> None:
    """Another process's append holds its commit while this store appends and projects.

    The slow append goes through that process's own recorder, exactly as a command would
    (eventsourcing's insert function when POSTGRES_ENABLE_DB_FUNCTIONS is on, else LOCK TABLE and
    INSERT), only inside a transaction the test commits late. Either this store's append waits
    for it (ids in commit order) or the tables must still pick the slow events up.
    """
    url = pg_server.create_database()
    with FlowStore(url) as store, FlowStore(url, live_projections=False) as other:
        store.create_flow(linear("f"))
        store.execute_transition("ann", "f", "next")
        events = start_flow(None, store.get_flow("f"), user_id="slow", now=datetime.now(UTC))
        recorder: Any = Internals(other).recorder
        stored = Internals(other).stored(events)
        bob_done = threading.Event()
        bob = threading.Thread(
            target=lambda: (store.execute_transition("bob", "f", "next"), bob_done.set())
        )
        with (
            psycopg.connect(url, autocommit=True) as watcher,
            recorder.datastore.get_connection() as slow,
        ):
            with slow.transaction(), slow.cursor() as cursor:  # committed when the block ends
                if recorder.datastore.enable_db_functions:
                    rows = [
                        recorder.construct_pg_stored_event(
                            e.originator_id, e.originator_version, e.topic, e.state
                        )
                        for e in stored
                    ]
                    cursor.execute(recorder.sql_invoke_pg_function_insert_events, (rows,))
                else:
                    recorder._insert_stored_events(cursor, stored)
                bob.start()

                def bob_waits_or_is_done() -> bool:
                    waiting = watcher.execute(
                        "SELECT count(*) FROM pg_stat_activity "
                        "WHERE datname = current_database() AND wait_event_type = 'Lock'"
                    ).fetchone()
                    return bob_done.is_set() or bool(waiting and waiting[0])

                wait_until(bob_waits_or_is_done, "bob's append to finish or wait for the lock")
                if bob_done.is_set():
                    store.sync_projections()  # the tables move past the slow append's ids
            bob.join(timeout=60)
        assert bob_done.is_set()
        store.sync_projections()
        store.catch_up_projections()
        assert store.get_flow_state("slow", "f") is not None
        assert [h.to_step for h in store.get_flow_history("slow", "f")] == ["s0"]
        assert store.verify_projections() == []
