"""Erasure racing the user's own writes, and rebuilds started together from two processes."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Callable

from sqlalchemy import create_engine, text

from flowstore import FlowError, FlowStore
from flowstore.storage import parse_url
from tests.flows import linear, ring
from tests.reliability.harness import LONG, Figures


def _keys(url: str) -> int:
    engine = create_engine(parse_url(url).sqlalchemy_url or "")
    try:
        with engine.connect() as conn:
            return int(conn.execute(text("SELECT count(*) FROM flowstore_user_keys")).scalar_one())
    finally:
        engine.dispose()


def test_erasures_racing_the_users_writes(
    new_database: Callable[[], str], figures: Figures
) -> None:
    url = new_database()
    rounds = 100 if LONG else 30
    accepted = refused = 0
    began = time.monotonic()
    with FlowStore(url) as store:
        store.create_flow(ring("loop"))
        store.create_flow(linear("other", 3))
        stop = threading.Event()
        failures: list[BaseException] = []
        lock = threading.Lock()

        def write(flow: str, transition: str) -> None:
            nonlocal accepted, refused
            while not stop.is_set():
                try:
                    if flow == "other":
                        store.reset_flow("ann", flow)
                    store.execute_transition("ann", flow, transition, {"note": "secret"})
                    with lock:
                        accepted += 1
                except FlowError:
                    with lock:
                        refused += 1
                except BaseException as exc:  # pragma: no cover (reported below)
                    failures.append(exc)
                    return

        writers = [
            threading.Thread(target=write, args=("loop", "tick")),
            threading.Thread(target=write, args=("other", "next")),
        ]
        for thread in writers:
            thread.start()
        erased = 0
        try:
            for _ in range(rounds):
                erased += store.erase_user("ann")  # must never give up on a busy user
        finally:
            stop.set()
            for thread in writers:
                thread.join(timeout=60)
        assert failures == []
        differences = store.verify_projections()
        assert differences == []
        assert all(row.user_id == "ann" for row in store.get_flow_history("ann", "loop"))
        store.erase_user("ann")
    assert _keys(url) == 0  # no key left for the user, none made for an erased stand-in
    figures.add(
        fault="erase_user racing the same user's transitions (2 writer threads, 2 flows)",
        backend=parse_url(url).backend,
        count=rounds,
        seconds=time.monotonic() - began,
        load="2 writer threads on the erased user",
        held="no CONCURRENCY_CONFLICT from erase_user; verify == []; history reads as the user; "
        "no keys left after the last erasure",
        notes=f"{erased} runs erased, {accepted} writes accepted, {refused} refused",
    )


_REBUILD = [sys.executable, "-m", "flowstore.adapters.cli"]


def test_rebuilds_started_together_from_two_processes(
    new_database: Callable[[], str], figures: Figures
) -> None:
    url = new_database()
    with FlowStore(url) as store:
        store.create_flow(linear("line", 4))
        for number in range(3000 if LONG else 600):
            store.execute_transition(f"u{number}", "line", "next", {"n": number})
    rounds = 10 if LONG else 3
    codes: list[int] = []
    began = time.monotonic()
    for _ in range(rounds):
        both = [
            subprocess.Popen(
                [*_REBUILD, "--url", url, "projections", "rebuild"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for _ in range(2)
        ]
        round_codes = [process.wait(timeout=300) for process in both]
        assert set(round_codes) <= {0, 4}, round_codes  # done, or REBUILD_RUNNING
        assert 0 in round_codes
        codes += round_codes
        with FlowStore(url) as store:
            assert store.verify_projections() == []
    figures.add(
        fault="two `projections rebuild` processes started together",
        backend=parse_url(url).backend,
        count=rounds,
        seconds=time.monotonic() - began,
        load="600-3,000 events per rebuild",
        held="each exits 0 (rebuilt) or 4 (REBUILD_RUNNING); verify == [] after each round",
        notes=f"{codes.count(0)} rebuilt, {codes.count(4)} refused",
    )
