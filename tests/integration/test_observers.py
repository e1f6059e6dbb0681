"""A store's observers (flowstore.telemetry) hear every command path: single, batched, expiry,
rebuild; on SQLite and PostgreSQL."""

from __future__ import annotations

from collections import Counter

from flowstore import FlowStore
from flowstore.telemetry import StoreObserver
from tests.flows import Clock, linear


class Recorder(StoreObserver):
    def __init__(self) -> None:
        self.commands: Counter[tuple[str, str]] = Counter()
        self.progress: list[tuple[int, int]] = []
        self.running: list[bool] = []
        self.expired_counts: list[int] = []
        self.projected_events = 0

    def command(self, kind: str, outcome: str, seconds: float) -> None:
        self.commands[kind, outcome] += 1

    def rebuild(self, done: int, total: int) -> None:
        self.progress.append((done, total))

    def rebuild_running(self, running: bool) -> None:
        self.running.append(running)

    def expired(self, count: int) -> None:
        self.expired_counts.append(count)

    def projected(self, first: int, last: int, count: int, began_ns: int) -> None:
        assert first <= last
        self.projected_events += count


def test_batches_count_each_request_and_expiry_and_rebuild_are_told(
    store_url: str, clock: Clock
) -> None:
    with FlowStore(store_url, clock=clock) as store:
        store.create_flow(linear("f", 3, ttl=60))
        recorder = Recorder()
        remove = store.add_observer(recorder)
        results = store.execute_transitions(
            [("ann", "f", "next", None), ("bob", "f", "nope", None), ("cid", "gone", "next", None)]
        )
        assert [type(r).__name__ for r in results] == [
            "FlowState",
            "InvalidTransitionError",
            "FlowNotFoundError",
        ]
        assert recorder.commands == {("transition", "accepted"): 1, ("transition", "rejected"): 2}

        clock.advance(61)
        assert store.purge_expired_flows() == 2  # ann's and bob's (a rejection starts the run)
        assert recorder.expired_counts == [2]
        assert recorder.commands["expire", "accepted"] == 2

        head = store.log_position()
        store.rebuild_projections()
        assert recorder.running == [True, False]
        assert recorder.progress[0] == (0, head)
        assert recorder.progress[-1] == (head, head)
        assert recorder.projected_events > 0  # the live projector's batches
        remove()
        store.execute_transition("dan", "f", "next")
        assert recorder.commands["transition", "accepted"] == 1  # removed: not told
