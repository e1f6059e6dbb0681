"""Reacting to flows: in-process `on` handlers after commit, durable `follow`ers exactly once."""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
import textwrap
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Connection, create_engine, text

from flowstore import (
    AsyncFlowStore,
    FlowStore,
    FollowerBusyError,
    InvalidArgumentError,
    InvalidTransitionError,
)
from flowstore.domain import (
    DomainEvent,
    FlowCompleted,
    InstanceEvent,
    TransitionExecuted,
    TransitionRejected,
)
from flowstore.reactions import event_step
from flowstore.storage import StorageConfigError
from tests.flows import Clock, linear

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def line(store: FlowStore) -> FlowStore:
    """The conftest store (both backends) with the three-step `line` flow (s0 -> s1 -> s2)."""
    store.create_flow(linear("line"))
    return store


# In-process reactions (`on`)


def test_handlers_see_their_kind_flow_and_step_after_the_commit(
    line: FlowStore, store_url: str
) -> None:
    seen: dict[str, list[InstanceEvent]] = {"taken": [], "entered_s2": [], "done": [], "all": []}
    committed: list[bool] = []
    with FlowStore(store_url) as other:  # another reader: sees committed events only

        def taken(event: InstanceEvent) -> None:
            seen["taken"].append(event)
            state = other.get_flow_state(event.user_id, event.flow_id)
            committed.append(state is not None and state.version >= event.originator_version)

        line.on("transition_taken", taken, flow="line")
        line.on("step_entered", seen["entered_s2"].append, step="s2")
        line.on("flow_completed", seen["done"].append)
        line.on("*", seen["all"].append, flow="onboarding-that-is-not-line")
        line.execute_transition("u1", "line", "next")
        line.execute_transition("u1", "line", "next")
    assert [(e.from_step, e.to_step) for e in seen["taken"]] == [("s0", "s1"), ("s1", "s2")]
    assert all(isinstance(e, TransitionExecuted) for e in seen["taken"])
    assert committed == [True, True]
    assert [type(e) for e in seen["entered_s2"]] == [TransitionExecuted]
    assert [(type(e), e.step) for e in seen["done"]] == [(FlowCompleted, "s2")]  # type: ignore[attr-defined]
    assert seen["all"] == []


def test_a_failing_handler_is_logged_and_the_command_stands(
    line: FlowStore, caplog: pytest.LogCaptureFixture
) -> None:
    rejected: list[InstanceEvent] = []

    def broken(event: InstanceEvent) -> None:
        raise RuntimeError("mail server down")

    line.on("transition_taken", broken)
    line.on("transition_rejected", rejected.append)
    with caplog.at_level(logging.ERROR, logger="flowstore.reactions"):
        state = line.execute_transition("u1", "line", "next")
    assert state.step == "s1"
    assert line.get_flow_state("u1", "line") == state
    assert "mail server down" in caplog.text
    with pytest.raises(InvalidTransitionError):  # the rejection is recorded, then raised
        line.execute_transition("u1", "line", "back")
    assert [type(e) for e in rejected] == [TransitionRejected]


def test_a_handler_may_run_commands_of_its_own(line: FlowStore) -> None:
    line.create_flow(linear("welcome", 2))

    def welcome(event: InstanceEvent) -> None:
        line.execute_transition(event.user_id, "welcome", "next")

    remove = line.on("flow_completed", welcome, flow="line")
    line.execute_transition("u1", "line", "next")
    line.execute_transition("u1", "line", "next")
    welcomed = line.get_flow_state("u1", "welcome")
    assert welcomed is not None
    assert welcomed.step == "s1"
    remove()
    line.reset_flow("u1", "line")
    line.execute_transition("u1", "line", "next")
    line.execute_transition("u1", "line", "next")
    assert len(line.get_flow_history("u1", "welcome")) == 2  # start + one transition


def test_expiry_and_erasure_are_reacted_to(line: FlowStore, clock: Clock) -> None:
    line.create_flow(linear("short", ttl=10))
    ended: list[tuple[str, str, str | None]] = []
    line.on("flow_expired", lambda e: ended.append(("expired", e.user_id, event_step(e))))
    line.on("flow_erased", lambda e: ended.append(("erased", e.user_id, event_step(e))))
    line.execute_transition("u1", "short", "next")
    line.execute_transition("u2", "line", "next")
    clock.advance(11)
    assert line.purge_expired_flows() == 1
    assert line.erase_user("u2") == 1
    assert ended == [("expired", "u1", "s1"), ("erased", "u2", "s1")]


def test_coroutine_handlers_belong_to_the_async_store(line: FlowStore) -> None:
    seen: list[InstanceEvent] = []
    done = asyncio.Event()

    async def handler(event: InstanceEvent) -> None:
        seen.append(event)
        done.set()

    async def follow_handler(event: DomainEvent, connection: Connection) -> None:
        pass

    with pytest.raises(InvalidArgumentError):
        line.on("transition_taken", handler)  # its coroutine would never be awaited
    with pytest.raises(InvalidArgumentError):
        line.follow("async-only", follow_handler, start=False)

    async def main() -> None:
        astore = AsyncFlowStore.wrap(line)
        astore.on("transition_taken", handler)
        await astore.execute_transition("u1", "line", "next")
        await asyncio.wait_for(done.wait(), timeout=30)

    asyncio.run(main())
    assert [type(e) for e in seen] == [TransitionExecuted]


def test_a_handler_returning_an_awaitable_rolls_back(line: FlowStore, store_url: str) -> None:
    sa_url = _effects_table(store_url)

    async def record(event: DomainEvent, connection: Connection) -> None:
        _record(event, connection)

    def disguised(event: DomainEvent, connection: Connection) -> Any:
        return record(event, connection)

    follower = line.follow("disguised", disguised, start=False)
    with pytest.raises(TypeError):
        follower.catch_up()
    assert follower.position() == 0
    assert not _effects(sa_url)
    follower.stop()


def test_bad_registrations_are_refused(line: FlowStore) -> None:
    with pytest.raises(InvalidArgumentError):
        line.on("step_left", print)
    with pytest.raises(InvalidArgumentError):
        line.on("step_entered", "not callable")  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError):
        line.on("step_entered", print, flow="")


# Durable followers (`follow`)


def _effects_table(url: str) -> str:
    """Create the app's `effects` table in the store's database; return its SQLAlchemy URL."""
    sa_url = url.replace("postgresql://", "postgresql+psycopg://", 1)
    engine = create_engine(sa_url)
    with engine.begin() as conn:
        conn.execute(
            text("CREATE TABLE effects (event_id VARCHAR(64) NOT NULL, version INTEGER NOT NULL)")
        )
    engine.dispose()
    return sa_url


def _record(event: DomainEvent, connection: Connection) -> None:
    connection.execute(
        text("INSERT INTO effects (event_id, version) VALUES (:id, :v)"),
        {"id": str(event.originator_id), "v": event.originator_version},
    )


def _ignore(event: DomainEvent, connection: Connection) -> None:
    pass


def _effects(sa_url: str) -> Counter[tuple[str, int]]:
    engine = create_engine(sa_url)
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT event_id, version FROM effects")).all()
    engine.dispose()
    return Counter((row[0], row[1]) for row in rows)


def _log_events(store: FlowStore) -> set[tuple[str, int]]:
    return {(str(e.originator_id), e.originator_version) for _, e in store.read_events(1, 10**6)}


def test_a_follower_applies_each_event_once_and_resumes(line: FlowStore, store_url: str) -> None:
    sa_url = _effects_table(store_url)
    line.execute_transition("u1", "line", "next")
    follower = line.follow("effects", _record, start=False)
    assert follower.catch_up() == len(line.read_events(1, 10**6))
    assert follower.position() == line.log_position()
    follower.stop()
    line.execute_transition("u2", "line", "next")
    line.execute_transition("u1", "line", "next")
    with FlowStore(store_url) as restarted:  # a new process, same name: resumes
        again = restarted.follow("effects", _record, start=False)
        assert again.catch_up() > 0
        assert again.catch_up() == 0
        again.stop()
    effects = _effects(sa_url)
    assert set(effects) == _log_events(line)
    assert set(effects.values()) == {1}


def test_a_failing_handler_rolls_its_event_back_and_is_retried(
    line: FlowStore, store_url: str
) -> None:
    sa_url = _effects_table(store_url)
    line.execute_transition("u1", "line", "next")
    calls = 0

    def flaky(event: DomainEvent, connection: Connection) -> None:
        nonlocal calls
        calls += 1
        _record(event, connection)
        if calls == 2:
            raise RuntimeError("boom")

    follower = line.follow("flaky", flaky, start=False)
    with pytest.raises(RuntimeError, match="boom"):
        follower.catch_up()
    assert len(_effects(sa_url)) == 1  # the second event's row rolled back with its position
    follower.catch_up()
    effects = _effects(sa_url)
    assert set(effects) == _log_events(line)
    assert set(effects.values()) == {1}
    follower.stop()


def test_one_follower_per_name_is_active(line: FlowStore) -> None:
    first = line.follow("solo", _ignore, start=False)
    second = line.follow("solo", _ignore, start=False)
    assert first.lock.try_acquire()
    with pytest.raises(FollowerBusyError):
        second.catch_up()
    first.stop()
    assert second.catch_up() >= 0
    second.stop()


def test_a_running_follower_is_stopped_by_close(store_url: str) -> None:
    sa_url = None
    with FlowStore(store_url) as store:
        store.create_flow(linear("line"))
        sa_url = _effects_table(store_url)
        follower = store.follow("bg", _record)
        store.execute_transition("u1", "line", "next")
    # close() stopped it: the lock is free and the position is where it stopped.
    with FlowStore(store_url) as reopened:
        again = reopened.follow("bg", _record, start=False)
        again.catch_up()
        again.stop()
        assert again.position() == reopened.log_position()
        assert set(_effects(sa_url)) == _log_events(reopened)
    assert not follower.lock.held


def test_names_and_databases_are_checked() -> None:
    with FlowStore("memory://") as store, pytest.raises(StorageConfigError):
        store.follow("x", _record)
    with FlowStore("memory://") as store, pytest.raises(InvalidArgumentError):
        store.follow("bad name!", _record)


def test_the_async_follower_takes_coroutine_handlers(line: FlowStore, store_url: str) -> None:
    sa_url = _effects_table(store_url)
    line.execute_transition("u1", "line", "next")

    async def main() -> None:
        astore = AsyncFlowStore.wrap(line)
        seen: list[str] = []

        async def handler(event: DomainEvent, connection: Connection) -> None:
            await asyncio.sleep(0)  # it may await
            seen.append(type(event).__name__)
            _record(event, connection)

        async with await astore.follow("async", handler, start=False) as follower:
            assert await follower.catch_up() == len(seen) > 0
            assert await follower.position() == await astore.log_position()

    asyncio.run(main())
    assert set(_effects(sa_url)) == _log_events(line)


_CHILD = textwrap.dedent(
    """
    import os, random, signal, sys
    from sqlalchemy import text
    from flowstore import FlowStore

    url, seed = sys.argv[1], int(sys.argv[2])
    chance = random.Random(seed)

    def handler(event, connection):
        connection.execute(
            text("INSERT INTO effects (event_id, version) VALUES (:id, :v)"),
            {"id": str(event.originator_id), "v": event.originator_version},
        )
        if chance.random() < 0.1:  # die with the row written and the position not yet moved
            os.kill(os.getpid(), signal.SIGKILL)

    with FlowStore(url, live_projections=False) as store:
        follower = store.follow("effects", handler, start=False)
        follower.catch_up()
        follower.stop()
    """
)


@pytest.mark.slow
def test_kill_9_at_random_points_leaves_each_events_row_exactly_once(
    line: FlowStore, store_url: str
) -> None:
    sa_url = _effects_table(store_url)
    line.execute_transitions([(f"u{i}", "line", "next", {"i": i}) for i in range(40)])
    line.execute_transitions([(f"u{i}", "line", "next", None) for i in range(0, 40, 2)])
    kills = 0
    for seed in range(500):
        child = subprocess.run(
            [sys.executable, "-c", _CHILD, store_url, str(seed)],
            cwd=ROOT,
            env=_child_env(),
            capture_output=True,
            timeout=120,
            check=False,
        )
        if child.returncode == 0:
            break
        assert child.returncode == -9, child.stderr.decode()
        kills += 1
    else:
        pytest.fail("the follower never caught up")
    assert kills > 3
    effects = _effects(sa_url)
    assert set(effects) == _log_events(line)
    assert set(effects.values()) == {1}


def _child_env() -> dict[str, Any]:
    import os

    return {**os.environ, "PYTHONPATH": str(ROOT)}


_HANDLER_MODULE = """
from sqlalchemy import text

def record(event, connection):
    connection.execute(
        text("INSERT INTO effects (event_id, version) VALUES (:id, :v)"),
        {"id": str(event.originator_id), "v": event.originator_version},
    )

async def record_async(event, connection):
    record(event, connection)
"""


def _cli(url: str, cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "flowstore.adapters.cli", "--url", url, "--json", *args],
        cwd=cwd,
        env=_child_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_the_cli_runs_a_follower_with_a_handler_of_the_app(
    line: FlowStore, store_url: str, tmp_path: Path
) -> None:
    sa_url = _effects_table(store_url)
    line.execute_transition("u1", "line", "next")
    (tmp_path / "my_reactions.py").write_text(_HANDLER_MODULE)
    done = _cli(
        store_url, tmp_path, "follow", "audit", "--handler", "my_reactions:record", "--once"
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["position"] == line.log_position()
    assert set(_effects(sa_url)) == _log_events(line)
    args = ("follow", "audit-async", "--handler", "my_reactions:record_async", "--once")
    done_async = _cli(store_url, tmp_path, *args)
    assert done_async.returncode == 0, done_async.stderr
    assert set(_effects(sa_url).values()) == {2}  # once by each follower
    bad = _cli(store_url, tmp_path, "follow", "audit", "--handler", "my_reactions", "--once")
    assert bad.returncode == 2  # a usage error, found before the database is opened
    assert "must be module:function" in bad.stderr
    missing = _cli(store_url, tmp_path, "follow", "audit", "--handler", "nope:record", "--once")
    assert missing.returncode == 5
    assert "INVALID_ARGUMENT" in missing.stdout + missing.stderr  # --json: the error as JSON


def test_a_standby_takes_over_when_the_active_follower_stops(
    line: FlowStore, store_url: str
) -> None:
    sa_url = _effects_table(store_url)
    line.execute_transition("u1", "line", "next")
    [(_, last)] = line.read_events(line.log_position(), 1)
    caught_up = threading.Event()

    def record(event: DomainEvent, connection: Connection) -> None:
        _record(event, connection)
        if (event.originator_id, event.originator_version) == (
            last.originator_id,
            last.originator_version,
        ):
            caught_up.set()

    active = line.follow("shift", record, start=False)
    assert active.lock.try_acquire()
    standby = line.follow("shift", record, interval=0.01)  # waits for the name
    assert not caught_up.is_set()
    active.stop()  # releases it: the standby takes over
    assert caught_up.wait(timeout=60)
    standby.stop()
    effects = _effects(sa_url)
    assert set(effects) == _log_events(line)
    assert set(effects.values()) == {1}
