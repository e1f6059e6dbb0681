"""The store in every process model: threads sharing one, processes forked from one (gunicorn
--preload, Celery prefork, multiprocessing), a store sent to a forkserver or spawn worker, and its
lifecycle (closed stores, paths, clocks)."""

from __future__ import annotations

import multiprocessing
import pickle
import threading
from datetime import datetime
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import pytest

from flowstore import (
    ConcurrencyConflictError,
    FlowStore,
    InvalidArgumentError,
    StoreClosedError,
)
from flowstore.commands import Commands
from tests.flows import linear

LOOP = "loop"


def _loop_flow() -> dict[str, Any]:
    flow = linear(LOOP, 2)
    flow["steps"]["s0"]["transitions"]["tick"] = {"transition": "tick", "step": "s0"}
    return flow


# Threads of one process


def test_threads_on_one_instance_never_conflict(
    store_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    retries: list[int] = []
    original = Commands.backoff

    def counted(self: Commands, attempt: int) -> None:
        retries.append(attempt)
        original(self, attempt)

    monkeypatch.setattr(Commands, "backoff", counted)
    threads, each = 6, 25
    errors: list[BaseException] = []
    with FlowStore(store_url, max_retries=1) as store:  # one conflict would raise
        store.create_flow(_loop_flow())
        store.execute_transition("ann", LOOP, "tick")
        start = threading.Barrier(threads)

        def tick() -> None:
            start.wait()
            for _ in range(each):
                try:
                    store.execute_transition("ann", LOOP, "tick")
                except BaseException as exc:
                    errors.append(exc)

        workers = [threading.Thread(target=tick) for _ in range(threads)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        assert errors == []
        assert retries == []
        state = store.get_flow_state("ann", LOOP)
        assert state is not None
        assert state.version == 2 + threads * each  # the start, the first tick, every other tick


def test_threads_batching_and_single_commands_on_shared_instances_never_conflict(
    store_url: str,
) -> None:
    with FlowStore(store_url, max_retries=1) as store:
        store.create_flow(_loop_flow())
        users = [f"u{i}" for i in range(5)]
        for user in users:
            store.execute_transition(user, LOOP, "tick")
        failures: list[Any] = []

        def batches() -> None:
            for _ in range(10):
                results = store.execute_transitions([(u, LOOP, "tick", None) for u in users])
                failures.extend(r for r in results if isinstance(r, ConcurrencyConflictError))

        def singles() -> None:
            for _ in range(10):
                for user in users:
                    try:
                        store.execute_transition(user, LOOP, "tick")
                    except ConcurrencyConflictError as exc:
                        failures.append(exc)

        workers = [threading.Thread(target=f) for f in (batches, singles, batches, singles)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        assert failures == []
        for user in users:
            state = store.get_flow_state(user, LOOP)
            assert state is not None
            assert state.version == 2 + 40


# Processes forked from a process that opened the store


def _child_work(store: FlowStore, index: int, answers: Connection) -> None:
    """In a child: write, then read the tables (which once hung there for 60 s)."""
    try:
        user = f"child-{index}"
        store.execute_transition(user, LOOP, "next")
        flows = store.get_user_flows(user)
        history = store.get_flow_history(user, LOOP)
        answers.send(("ok", [f.step for f in flows], len(history)))
    except BaseException as exc:  # reported to the parent, which fails the test with it
        answers.send(("error", repr(exc), 0))
    finally:
        answers.close()


def _run_children(context: str, store: FlowStore, count: int = 3) -> list[Any]:
    ctx = multiprocessing.get_context(context)
    results = []
    processes = []
    for index in range(count):
        receive, send = ctx.Pipe(duplex=False)
        process = ctx.Process(target=_child_work, args=(store, index, send))
        process.start()
        send.close()
        processes.append((process, receive))
    for process, receive in processes:
        results.append(receive.recv())  # waits for the child's answer (EOFError if it died)
        process.join()
        assert process.exitcode == 0
    return results


@pytest.mark.parametrize("context", ["fork", "forkserver"])
def test_a_store_opened_before_the_processes_start_works_in_each_of_them(
    store_url: str, context: str
) -> None:
    with FlowStore(store_url) as store:
        store.create_flow(linear(LOOP, 3))
        store.execute_transition("parent", LOOP, "next")
        assert store.get_user_flows("parent")  # the parent's connections are open and used
        results = _run_children(context, store)
        assert results == [("ok", ["s1"], 2)] * 3
        # The parent's own connections still work after the children used and closed theirs.
        store.execute_transition("parent", LOOP, "next")
        assert [f.step for f in store.get_user_flows("parent")] == ["s2"]
        assert [f.step for f in store.get_user_flows("child-2")] == ["s1"]
        assert store.verify_projections() == []


def test_a_forked_child_closes_only_its_own_connections(store_url: str) -> None:
    ctx = multiprocessing.get_context("fork")
    with FlowStore(store_url) as store:
        store.create_flow(linear(LOOP, 3))

        def close_in_child(answers: Connection) -> None:
            store.close()
            answers.send("closed")

        receive, send = ctx.Pipe(duplex=False)
        process = ctx.Process(target=close_in_child, args=(send,))
        process.start()
        assert receive.recv() == "closed"
        process.join()
        store.execute_transition("ann", LOOP, "next")
        assert [f.step for f in store.get_user_flows("ann")] == ["s1"]


def test_a_store_pickles_as_its_url_and_options(tmp_path: Path) -> None:
    with FlowStore(f"sqlite:///{tmp_path / 'p.db'}", max_retries=3) as store:
        store.create_flow(linear(LOOP))
        with pickle.loads(pickle.dumps(store)) as copy:
            assert copy is not store
            assert copy.max_retries == 3
            assert copy.get_flow(LOOP).flow == LOOP
    with FlowStore("memory://") as memory, pytest.raises(TypeError, match="memory://"):
        pickle.dumps(memory)


# Lifecycle


def test_a_closed_store_raises_store_closed(tmp_path: Path) -> None:
    store = FlowStore(f"sqlite:///{tmp_path / 'c.db'}")
    store.create_flow(linear(LOOP))
    store.close()
    for call in (
        lambda: store.get_flow(LOOP),
        lambda: store.execute_transition("ann", LOOP, "next"),
        lambda: store.get_user_flows("ann"),
        lambda: store.list_flows(),
        store.close,
    ):
        with pytest.raises(StoreClosedError) as caught:
            call()
        assert caught.value.code == "STORE_CLOSED"
    with FlowStore(f"sqlite:///{tmp_path / 'c.db'}") as again:
        assert again.get_flow(LOOP).flow == LOOP


def test_closing_twice_through_with_raises_store_closed(tmp_path: Path) -> None:
    with pytest.raises(StoreClosedError), FlowStore(f"sqlite:///{tmp_path / 'w.db'}") as store:
        store.close()


def test_a_path_opens_that_sqlite_file(tmp_path: Path) -> None:
    path = tmp_path / "by-path.db"
    with FlowStore(path) as store:
        store.create_flow(linear(LOOP))
    assert path.exists()
    with FlowStore(f"sqlite:///{path}") as same:
        assert same.get_flow(LOOP).flow == LOOP
    with pytest.raises(InvalidArgumentError):
        FlowStore(42)  # type: ignore[arg-type]


def test_a_naive_clock_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgumentError, match="timezone-aware"):
        FlowStore(f"sqlite:///{tmp_path / 'n.db'}", clock=datetime.now)
    with pytest.raises(InvalidArgumentError):
        FlowStore(f"sqlite:///{tmp_path / 'n.db'}", clock="now")  # type: ignore[arg-type]
    assert not (tmp_path / "n.db").exists()  # refused before anything was opened
