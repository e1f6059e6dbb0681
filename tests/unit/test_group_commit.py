"""Group commit hands each waiting command its outcome directly: a command committed in another
thread's group returns without taking the write lock (followers used to queue for the lock one
after another, each only to find its command done, while the next group and the projector
waited behind them), and a leader that fails leaves no follower waiting."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

import pytest

from flowstore.groupcommit import GroupCommit


class _CountingLock:
    """A write lock that counts who took it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.takers: list[str] = []

    def __enter__(self) -> None:
        self._lock.acquire()
        self.takers.append(threading.current_thread().name)

    def __exit__(self, *exc: object) -> None:
        self._lock.release()


class _Recorder:
    """Inserts that number the events in order; the first waits at a gate until it is opened."""

    def __init__(self) -> None:
        self.inserts: list[list[str]] = []
        self.inside = threading.Event()
        self.gate = threading.Event()
        self._next = 1

    def insert_events(self, stored: Sequence[Any], **_: Any) -> list[int]:
        self.inserts.append(list(stored))
        if len(self.inserts) == 1:
            self.inside.set()
            assert self.gate.wait(timeout=30)
        ids = list(range(self._next, self._next + len(stored)))
        self._next += len(stored)
        return ids


class _QueueWatch:
    """The group's queue lock, telling when `expected` threads other than the first have left it
    (a follower leaves it once its command is queued)."""

    def __init__(self, lock: Any, expected: int) -> None:
        self._lock = lock
        self._left: set[str] = set()
        self._expected = expected
        self.queued = threading.Event()

    def __enter__(self) -> None:
        self._lock.acquire()

    def __exit__(self, *exc: object) -> None:
        self._lock.release()
        name = threading.current_thread().name
        if name != "a":
            self._left.add(name)
            if len(self._left) >= self._expected:
                self.queued.set()


def _group(lock: Any) -> tuple[GroupCommit, _Recorder]:
    recorder = _Recorder()
    # Events stand for themselves.
    mapper = SimpleNamespace(to_stored_events=lambda events, keys: list(events))
    app = SimpleNamespace(mapper=mapper, recorder=recorder)
    return GroupCommit(app, lock), recorder  # type: ignore[arg-type]


def _run(group: GroupCommit, name: str, results: dict[str, Any]) -> threading.Thread:
    def append() -> None:
        try:
            results[name] = group.append([name])  # type: ignore[list-item]
        except BaseException as exc:
            results[name] = exc

    thread = threading.Thread(target=append, name=name)
    thread.start()
    return thread


def _behind_a_commit(
    group: GroupCommit, recorder: _Recorder, names: Sequence[str]
) -> dict[str, Any]:
    """Thread "a" commits alone (its insert held at the recorder's gate) while threads `names`
    queue behind it; then the gate opens. What each call returned (or raised), once all ended."""
    watch = _QueueWatch(group._queue_lock, expected=len(names))
    group._queue_lock = watch  # type: ignore[assignment]
    results: dict[str, Any] = {}
    first = _run(group, "a", results)
    assert recorder.inside.wait(timeout=30)  # a commits alone, holding the write lock
    others = [_run(group, name, results) for name in names]
    assert watch.queued.wait(timeout=30)  # the others queued behind a's commit
    recorder.gate.set()
    for thread in (first, *others):
        thread.join(timeout=30)
        assert not thread.is_alive()  # nobody waits forever
    return results


def test_commands_queued_behind_a_commit_go_in_one_group_whose_followers_skip_the_lock() -> None:
    lock = _CountingLock()
    group, recorder = _group(lock)
    results = _behind_a_commit(group, recorder, ("b", "c"))
    assert recorder.inserts == [["a"], ["b", "c"]]  # b and c: one insert
    assert results == {"a": [1], "b": [2], "c": [3]}  # each its own ids
    # Taken once per group: by a, then by whoever led b's and c's group; the one it committed
    # for returned without the lock.
    assert len(lock.takers) == 2
    assert lock.takers[0] == "a"


def test_a_leader_interrupted_before_its_commit_fails_alone_and_hands_the_lead_on() -> None:
    class _Failing(_CountingLock):
        def __enter__(self) -> None:
            super().__enter__()
            if len(self.takers) == 2:  # the second group's leader: as if interrupted there
                self._lock.release()
                raise KeyboardInterrupt

    lock = _Failing()
    group, recorder = _group(lock)
    results = _behind_a_commit(group, recorder, ("b", "c"))
    failed = [name for name in ("b", "c") if isinstance(results[name], KeyboardInterrupt)]
    assert len(failed) == 1  # whichever led next; its events were never written
    (done,) = {"b", "c"} - set(failed)
    assert results["a"] == [1]
    assert results[done] == [2]  # queued behind it: led by itself, committed
    assert recorder.inserts == [["a"], [done]]
    results.clear()
    last = _run(group, "d", results)
    last.join(timeout=30)
    assert results == {"d": [3]}  # and the group leads on afterwards


@pytest.mark.parametrize("threads", [2, 4])
def test_every_concurrent_append_returns_its_own_ids_after_its_commit(threads: int) -> None:
    lock = _CountingLock()
    group, recorder = _group(lock)
    recorder.gate.set()
    per_thread = 200
    got: dict[str, list[int]] = {}

    def work(t: int) -> None:
        for i in range(per_thread):
            name = f"{t}-{i}"
            ids = group.append([name])  # type: ignore[list-item]
            got[name] = list(ids)
            # Returned only after its own insert: the recorder has seen it.
            assert any(name in insert for insert in recorder.inserts)

    workers = [threading.Thread(target=work, args=(t,), name=f"w{t}") for t in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)
        assert not worker.is_alive()
    assert len(got) == threads * per_thread
    order = [name for insert in recorder.inserts for name in insert]
    assert sorted(order) == sorted(got)  # each command inserted exactly once
    assert {name: [position + 1] for position, name in enumerate(order)} == got
    assert len(lock.takers) == len(recorder.inserts)  # the lock: once per group, by its leader


def test_a_lone_writer_never_yields_and_a_leader_after_a_crowded_group_does(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import flowstore.groupcommit as module

    yields: list[str] = []
    monkeypatch.setattr(
        module,
        "time",
        SimpleNamespace(sleep=lambda _: yields.append(threading.current_thread().name)),
    )
    lock = _CountingLock()
    group, recorder = _group(lock)
    recorder.gate.set()
    for i in range(5):
        assert group.append([f"alone-{i}"]) == [i + 1]  # type: ignore[list-item]
    assert yields == []  # nothing to wait for: no GIL handed away

    group, recorder = _group(lock)
    _behind_a_commit(group, recorder, ("b", "c"))
    # a led alone; whoever led b's and c's group yielded first (others were writing), once.
    assert len(yields) == 1
    assert yields[0] in ("b", "c")


def test_a_follower_interrupted_while_it_waits_still_leads_when_handed_the_lead(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import flowstore.groupcommit as module

    class _Interrupted:
        """A follower's lock whose first wait is interrupted (a signal in the main thread)."""

        def __init__(self) -> None:
            self._lock = threading.Lock()
            self._calls = 0

        def acquire(self) -> bool:
            self._calls += 1
            if self._calls == 2:  # the first wait (the first call takes it, at once)
                raise KeyboardInterrupt
            return self._lock.acquire()

        def release(self) -> None:
            self._lock.release()

    lock = _CountingLock()
    group, recorder = _group(lock)
    monkeypatch.setattr(module, "threading", SimpleNamespace(Lock=_Interrupted))
    results = _behind_a_commit(group, recorder, ("b",))
    assert results["a"] == [1]
    assert isinstance(results["b"], KeyboardInterrupt)  # raised once its part was done:
    assert recorder.inserts == [["a"], ["b"]]  # handed the lead, it led its group
    monkeypatch.undo()
    results.clear()
    last = _run(group, "d", results)
    last.join(timeout=30)
    assert results == {"d": [3]}  # nobody left waiting for a leader that was gone
