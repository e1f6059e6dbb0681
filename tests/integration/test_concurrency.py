"""Concurrent writers never lose an update: threads on both backends, processes on PostgreSQL."""

from __future__ import annotations

import multiprocessing
import threading
from datetime import UTC, datetime
from typing import Any

import pytest

from flowstore import (
    ConcurrencyConflictError,
    FlowStore,
    HistoryKind,
    InvalidTransitionError,
)
from tests.flows import ring
from tests.pgserver import PostgresServer

FLOW = "loop"
LOOP = ring(FLOW)


def tick(url: str, user: str, count: int, barrier: Any) -> int:
    """Apply `count` ticks to one instance once every writer is ready; return how many succeeded."""
    accepted = 0
    with FlowStore(url, max_retries=200) as store:
        barrier.wait(timeout=60)  # all writers open their stores first, then race
        for _ in range(count):
            store.execute_transition(user, FLOW, "tick")
            accepted += 1
    return accepted


def accepted_transitions(store: FlowStore, user: str) -> list[Any]:
    return [
        h
        for h in store.get_flow_history(user, FLOW)
        if h.kind is HistoryKind.TRANSITION and h.success
    ]


def test_threads_on_one_instance_lose_no_update(store_url: str) -> None:
    with FlowStore(store_url) as store:
        store.create_flow(LOOP)
        store.reset_flow("shared", FLOW)
    threads, per_thread = 4, 25
    results: list[int] = []
    barrier = threading.Barrier(threads)
    workers = [
        threading.Thread(
            target=lambda: results.append(tick(store_url, "shared", per_thread, barrier))
        )
        for _ in range(threads)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert results == [per_thread] * threads
    with FlowStore(store_url) as store:
        state = store.get_flow_state("shared", FLOW)
        assert state is not None
        assert state.version == 1 + threads * per_thread  # the reset, then every tick
        assert len(accepted_transitions(store, "shared")) == threads * per_thread


def test_a_retried_transition_is_validated_against_the_fresh_state(store_url: str) -> None:
    """Another writer flips the step between our read and our append: we must not 'flip' twice."""
    with FlowStore(store_url) as store:
        store.create_flow(LOOP)
        store.reset_flow("ann", FLOW)
    other = FlowStore(store_url)
    interfered = False

    def clock() -> datetime:
        # The clock is read after the instance is loaded and before the append: the one moment
        # where a concurrent write makes our decision stale.
        nonlocal interfered
        if not interfered:
            interfered = True
            other.execute_transition("ann", FLOW, "flip")
        return datetime.now(UTC)

    with FlowStore(store_url, clock=clock) as store:
        with pytest.raises(InvalidTransitionError, match="'flip' from step 'b'"):
            store.execute_transition("ann", FLOW, "flip")
        history = store.get_flow_history("ann", FLOW)
    other.close()
    assert [(h.transition, h.success) for h in history[1:]] == [("flip", True), ("flip", False)]


def test_conflicts_past_the_retry_limit_raise(store_url: str) -> None:
    with FlowStore(store_url) as store:
        store.create_flow(LOOP)
        store.reset_flow("ann", FLOW)
    other = FlowStore(store_url)
    racing = threading.Event()  # not while the store checks its clock on opening

    def clock() -> datetime:
        if racing.is_set():
            other.execute_transition("ann", FLOW, "tick")  # every attempt loses the race
        return datetime.now(UTC)

    with FlowStore(store_url, clock=clock, max_retries=3) as store:
        racing.set()
        with pytest.raises(ConcurrencyConflictError) as caught:
            store.execute_transition("ann", FLOW, "flip")
        assert caught.value.details["attempts"] == 3
        state = store.get_flow_state("ann", FLOW)
        other.sync_projections()  # another writer's rows reach the tables shortly after its writes
        history = store.get_flow_history("ann", FLOW)
    other.close()
    # Only the other writer's three ticks were written: the reset, then tick x3, and no flip.
    assert state is not None
    assert (state.step, state.version) == ("a", 4)
    assert [h.transition for h in history] == ["", "tick", "tick", "tick"]


def _process_worker(url: str, user: str, count: int, barrier: Any, out: Any) -> None:
    out.put(tick(url, user, count, barrier))


@pytest.mark.slow
def test_two_processes_on_postgres_lose_no_update(pg_server: PostgresServer) -> None:
    store_url = pg_server.create_database()
    with FlowStore(store_url) as store:
        store.create_flow(LOOP)
        store.reset_flow("shared", FLOW)
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    barrier = context.Barrier(2)
    per_process = 40
    processes = [
        context.Process(
            target=_process_worker, args=(store_url, "shared", per_process, barrier, queue)
        )
        for _ in range(2)
    ]
    for process in processes:
        process.start()
    results = [queue.get(timeout=120) for _ in processes]
    for process in processes:
        process.join(timeout=60)
        assert process.exitcode == 0
    assert results == [per_process, per_process]
    with FlowStore(store_url) as store:
        state = store.get_flow_state("shared", FLOW)
        assert state is not None
        assert state.version == 1 + 2 * per_process
        assert len(accepted_transitions(store, "shared")) == 2 * per_process
