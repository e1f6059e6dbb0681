"""AsyncFlowStore: FlowStore's calls as coroutines on bounded worker threads, safe to cancel."""

from __future__ import annotations

import asyncio
import inspect
import threading
from datetime import UTC, datetime
from pathlib import Path

import pytest

from flowstore import AsyncFlowStore, FlowNotFoundError, FlowStore, InvalidTransitionError
from flowstore.aio import worker_threads
from flowstore.storage import parse_url
from tests.flows import linear

# Calls that do no I/O stay plain methods: registering a listener returns at once.
_SYNC_ON_PURPOSE = {"add_observer", "on", "on_definition_change"}
# These also take coroutine handlers (and the follower comes back as an AsyncFollower).
_OTHER_TYPES = {"follow", "on"}


def _public_members(cls: type) -> dict[str, object]:
    return {name: member for name, member in inspect.getmembers(cls) if not name.startswith("_")}


def test_every_public_call_of_flowstore_has_an_async_twin_with_the_same_signature() -> None:
    sync, aio = _public_members(FlowStore), _public_members(AsyncFlowStore)
    for name, member in sync.items():
        assert name in aio, f"AsyncFlowStore lacks {name}"
        twin = aio[name]
        if isinstance(member, property):
            assert isinstance(twin, property), name
            continue
        assert callable(member), name
        mine, theirs = inspect.signature(twin), inspect.signature(member)  # type: ignore[arg-type]
        if name in _OTHER_TYPES:  # same parameters, names, kinds and defaults
            assert [(p.name, p.kind, p.default) for p in mine.parameters.values()] == [
                (p.name, p.kind, p.default) for p in theirs.parameters.values()
            ], name
        else:
            assert mine == theirs, name
        if name in _SYNC_ON_PURPOSE:
            assert not inspect.iscoroutinefunction(twin), name
        else:
            assert inspect.iscoroutinefunction(twin), f"AsyncFlowStore.{name} is not a coroutine"


def test_the_pool_is_sized_to_what_the_database_serves_at_once() -> None:
    assert worker_threads(parse_url("postgresql://u@h/db")) == 5  # eventsourcing's pool size
    assert worker_threads(parse_url("postgresql://u@h/db?pool_size=3&max_overflow=1")) == 3
    assert worker_threads(parse_url("sqlite:///flowstore.db")) == 2
    assert worker_threads(parse_url("memory://")) == 1


@pytest.fixture
def astore(store: FlowStore) -> AsyncFlowStore:
    """The conftest store (both backends) behind an async store."""
    store.create_flow(linear("line"))
    return AsyncFlowStore.wrap(store)


def test_calls_give_the_sync_stores_results_and_errors(astore: AsyncFlowStore) -> None:
    async def main() -> None:
        state = await astore.execute_transition("u1", "line", "next")
        assert state.step == "s1"
        assert state == await astore.get_flow_state("u1", "line")
        assert state == astore.store.get_flow_state("u1", "line")
        history = await astore.get_flow_history("u1", "line")
        assert history == astore.store.get_flow_history("u1", "line")
        assert (await astore.get_flow_statistics("line")).total_flows == 1
        with pytest.raises(FlowNotFoundError):
            await astore.execute_transition("u1", "nope", "next")
        with pytest.raises(InvalidTransitionError):
            await astore.execute_transition("u1", "line", "back")
        assert await astore.log_position() == astore.store.log_position()

    asyncio.run(main())


def test_calls_run_on_at_most_threads_worker_threads(astore: AsyncFlowStore) -> None:
    bounded = AsyncFlowStore.wrap(astore.store, threads=2)
    lock = threading.Condition()
    running, most, callers = 0, 0, set()
    release = threading.Event()

    def log_position() -> int:
        nonlocal running, most
        with lock:
            callers.add(threading.get_ident())
            running += 1
            most = max(most, running)
            lock.notify_all()
        release.wait()
        with lock:
            running -= 1
        return 0

    def busy() -> None:
        with lock:
            lock.wait_for(lambda: running == 2)

    bounded.store.log_position = log_position  # type: ignore[method-assign]

    async def main() -> None:
        loop_thread = threading.get_ident()
        calls = [asyncio.ensure_future(bounded.log_position()) for _ in range(6)]
        await asyncio.to_thread(busy)  # both workers busy; the other four calls wait in the queue
        release.set()
        assert await asyncio.gather(*calls) == [0] * 6
        assert loop_thread not in callers

    asyncio.run(main())
    assert most == 2
    assert len(callers) == 2


class _GateClock:
    """A UTC clock that, once armed, holds the first worker-thread caller until released."""

    def __init__(self) -> None:
        self.armed = False
        self.entered = threading.Event()
        self.release = threading.Event()

    def __call__(self) -> datetime:
        if self.armed and threading.current_thread().name.startswith("flowstore-aio"):
            self.armed = False
            self.entered.set()
            self.release.wait()
        return datetime(2026, 1, 1, tzinfo=UTC)


@pytest.fixture
def gated(store_url: str) -> tuple[str, _GateClock]:
    """A database with the `line` flow, and a clock to hold a command in the middle."""
    with FlowStore(store_url) as setup:
        setup.create_flow(linear("line"))
    return store_url, _GateClock()


def test_a_command_cancelled_while_running_is_finished_whole(
    gated: tuple[str, _GateClock],
) -> None:
    url, clock = gated

    async def main() -> None:
        async with AsyncFlowStore(url, clock=clock) as astore:
            await astore.execute_transition("u1", "line", "next")  # s1
            clock.armed = True
            command = asyncio.ensure_future(astore.execute_transition("u1", "line", "next"))
            await asyncio.to_thread(clock.entered.wait)  # the worker is inside the command
            command.cancel()
            with pytest.raises(asyncio.CancelledError):
                await command
            clock.release.set()
        # close() waited for the worker: the command committed as a whole.

    asyncio.run(main())
    with FlowStore(url) as reopened:
        state = reopened.get_flow_state("u1", "line")
        assert state is not None
        assert state.step == "s2"
        assert [h.to_step for h in reopened.get_flow_history("u1", "line")] == ["s0", "s1", "s2"]


def test_a_command_cancelled_before_a_worker_took_it_never_runs(
    gated: tuple[str, _GateClock],
) -> None:
    url, clock = gated

    async def main() -> None:
        async with AsyncFlowStore(url, clock=clock, threads=1) as astore:
            clock.armed = True
            first = asyncio.ensure_future(astore.execute_transition("u1", "line", "next"))
            await asyncio.to_thread(clock.entered.wait)  # the only worker is busy
            queued = asyncio.ensure_future(astore.execute_transition("u2", "line", "next"))
            await asyncio.sleep(0)  # let the queued call reach the executor
            queued.cancel()
            clock.release.set()
            assert (await first).step == "s1"
            with pytest.raises(asyncio.CancelledError):
                await queued

    asyncio.run(main())
    with FlowStore(url) as reopened:
        assert reopened.get_flow_state("u2", "line") is None
        assert reopened.get_flow_history("u2", "line") == []


def test_open_and_the_async_context_manager_close_the_store(tmp_path: Path) -> None:
    async def main() -> None:
        async with await AsyncFlowStore.open(f"sqlite:///{tmp_path / 'a.db'}") as astore:
            await astore.create_flow(linear("line"))
            assert [f.flow for f in await astore.list_flows()] == ["line"]
        with pytest.raises(RuntimeError):  # the worker pool is shut down
            await astore.list_flows()

    asyncio.run(main())
