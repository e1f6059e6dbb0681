"""The lean batch path keeps its guarantees: conflicts retried, nothing shared with the caller, ids
counted right, the collector paused only meanwhile."""

from __future__ import annotations

import gc
from collections import Counter

from flowstore import FlowError, FlowState, FlowStore
from flowstore.domain import instance_id
from flowstore.telemetry import StoreObserver
from flowstore.testing import Internals, ring_flow

FLOW = "ring"


class _Commands(StoreObserver):
    def __init__(self) -> None:
        self.counted: Counter[tuple[str, str]] = Counter()

    def command(self, kind: str, outcome: str, seconds: float) -> None:
        self.counted[kind, outcome] += 1


def _states(results: list[FlowState | FlowError]) -> list[tuple[str, int]]:
    assert all(isinstance(r, FlowState) for r in results), results
    return [(r.step, r.version) for r in results if isinstance(r, FlowState)]


def test_a_batch_that_meets_another_writer_is_applied_again_one_by_one(store_url: str) -> None:
    with FlowStore(store_url) as ours, FlowStore(store_url) as theirs:
        ours.create_flow(ring_flow(FLOW))
        ours.execute_transitions([("ann", FLOW, "tick", None), ("bob", FLOW, "tick", None)])
        theirs.execute_transition("ann", FLOW, "flip")  # our cached ann (v2) is stale now
        counted = _Commands()
        ours.add_observer(counted)
        results = ours.execute_transitions(
            [("ann", FLOW, "flop", None), ("bob", FLOW, "flip", None), ("ann", FLOW, "tick", None)]
        )
        # Decided again on the fresh state: flop is only valid from b, where the other store left ann.
        assert _states(results) == [("a", 4), ("b", 3), ("a", 5)]
        assert counted.counted == {
            ("transition", "conflict-retried"): 3,
            ("transition", "accepted"): 3,
        }
        for store in (ours, theirs):
            store.sync_projections()
            assert store.verify_projections() == []
        assert [e.originator_version for _, e in ours.read_events(1, 100)] == [
            1, 1, 1, 2, 1, 2, 3, 4, 3, 5,  # definition, catalog, ann and bob, theirs, ours
        ]  # fmt: skip


def test_what_the_caller_does_with_its_payload_later_changes_nothing(store_url: str) -> None:
    with FlowStore(store_url) as store:
        store.create_flow(ring_flow(FLOW))
        single = {"form": {"name": "Ann"}}
        batched = {"form": {"name": "Bob"}}
        answer = store.execute_transition("ann", FLOW, "tick", single)
        [batch_answer] = store.execute_transitions([("bob", FLOW, "tick", batched)])
        single["form"]["name"] = "changed"
        batched["form"]["name"] = "changed"
        assert answer.payload == {"form": {"name": "Ann"}}
        assert isinstance(batch_answer, FlowState)
        assert batch_answer.payload == {"form": {"name": "Bob"}}
        # The next transitions merge their payloads into the state as it was stored.
        after = store.execute_transitions([("ann", FLOW, "tick", {"n": 1})])
        assert isinstance(after[0], FlowState)
        assert after[0].payload == {"form": {"name": "Ann"}, "n": 1}
        assert store.execute_transition("bob", FLOW, "tick").payload == {"form": {"name": "Bob"}}
        # Nor does what it does with the states it was given.
        assert after[0].payload is not None
        after[0].payload["form"] = "changed"
        assert store.execute_transition("ann", FLOW, "tick").payload == {
            "form": {"name": "Ann"},
            "n": 1,
        }


def test_the_ids_of_an_append_of_many_events_are_their_positions(store_url: str) -> None:
    with FlowStore(store_url) as store:
        store.create_flow(ring_flow(FLOW))
        store.execute_transitions([("ann", FLOW, "tick", None), ("bob", FLOW, "tick", None)])
        ann = instance_id("ann", FLOW)
        started, ticked = [e for _, e in store.read_events(1, 100) if e.originator_id == ann]
        # Three appends of two events in one group, the middle one conflicting (ann's first two
        # versions again): the ids the others get are the positions their events are read at.
        ticks = [ticked.model_copy(update={"originator_version": v}) for v in (3, 4, 5, 6)]
        committed = Internals(store).commit_group([ticks[:2], [started, ticked], ticks[2:]])
        assert [error is None for _, error in committed] == [True, False, True]
        positions = {
            e.originator_version: position
            for position, e in store.read_events(1, 100)
            if e.originator_id == ann
        }
        assert [list(ids or []) for ids, _ in committed] == [
            [positions[3], positions[4]],
            [],
            [positions[5], positions[6]],
        ]
        assert store.log_position() == positions[6]


def test_the_collector_is_paused_while_a_batch_is_applied_and_only_then(store_url: str) -> None:
    with FlowStore(store_url) as store:
        store.create_flow(ring_flow(FLOW))
        during: list[bool] = []
        store.on("*", lambda event: during.append(gc.isenabled()))
        assert gc.isenabled()
        store.execute_transitions([("ann", FLOW, "tick", None), ("bob", FLOW, "tick", None)])
        assert during  # the reactions run in the batch, after its commit
        assert not any(during)
        assert gc.isenabled()
        store.execute_transition("cat", FLOW, "tick")
        assert all(during[-2:])  # a single command leaves it alone
        gc.disable()  # the application's choice is left as it is
        try:
            store.execute_transitions([("dan", FLOW, "tick", None)])
            assert not gc.isenabled()
        finally:
            gc.enable()


def test_a_batch_looks_again_for_definitions_newer_than_those_it_has(store_url: str) -> None:
    with FlowStore(store_url, definition_refresh=3600) as ours, FlowStore(store_url) as theirs:
        ours.create_flow(ring_flow(FLOW))
        ours.execute_transition("bob", FLOW, "tick")  # ours keeps version 1 for an hour
        theirs.update_flow(FLOW, {"config": {"v": 2}})
        ours.reset_flow("ann", FLOW)  # on version 2, the newest
        results = ours.execute_transitions(
            [("bob", FLOW, "tick", None), ("ann", FLOW, "tick", None)]
        )
        assert [(r.step, r.definition_version) for r in results if isinstance(r, FlowState)] == [
            ("a", 1),
            ("a", 2),
        ]
