"""The write path hands this process's committed events to its live projector (`Recent`).

The projector takes them as they were appended instead of reading and decoding them again; what it
writes must be exactly what a read of the log gives (`verify_projections`, which folds the log
itself, finds no difference), whatever else is in the log, and an erasure must leave nothing of
the user anywhere in the tables or the buffer.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from flowstore import FlowStore, StorageUnavailableError
from flowstore.domain import InstanceEvent
from flowstore.keys import ERASED_USER_PREFIX
from flowstore.testing import Internals, memory_store
from tests.flows import ring

SECRET = "handoff-secret-5e0d"


@contextmanager
def rows_read_back(store: FlowStore) -> Iterator[list[int]]:
    """Inside the block, the notification ids of every row read from the log's total order."""
    recorder = Internals(store).recorder
    select = recorder.select_notifications
    ids: list[int] = []

    def counted(*args: Any, **kwargs: Any) -> Any:
        page = select(*args, **kwargs)
        if not kwargs.get("topics"):  # the key cache's look for erasures reads only FlowErased
            ids.extend(n.id for n in page)
        return page

    recorder.select_notifications = counted
    try:
        yield ids
    finally:
        del recorder.select_notifications


def table_text(store: FlowStore) -> str:
    """Every row of every live table, as one text to search."""
    return repr(store.read_model().snapshot())


def test_the_projector_takes_its_own_events_without_reading_them_back(store_url: str) -> None:
    with FlowStore(store_url) as store:
        store.create_flow(ring("loop"))
        store.sync_projections()
        start = store.log_position()
        with rows_read_back(store) as read_back:
            # Paused, so that no catch-up runs between a commit and its hand-over (it would
            # read that event from the log, correctly, and this test would be about timing).
            with Internals(store).paused_projections():
                for i in range(30):
                    store.execute_transition(
                        f"user-{i % 3}", "loop", "tick", {"n": i, "who": SECRET}
                    )
            store.sync_projections()
        ours = set(range(start + 1, store.log_position() + 1))
        assert len(ours) >= 30
        assert ours.isdisjoint(read_back)  # none decoded again (all of them, before)
        assert store.verify_projections() == []
        state = store.get_flow_state("user-2", "loop")
        assert state is not None
        assert state.payload == {"n": 29, "who": SECRET}


def test_events_of_another_store_between_ours_are_read_from_the_log(store_url: str) -> None:
    with FlowStore(store_url) as ours, FlowStore(store_url) as theirs:
        ours.create_flow(ring("loop"))
        theirs.sync_projections()
        for i in range(12):
            writer = ours if i % 3 else theirs  # their ids interrupt the runs of ours
            writer.execute_transition(f"user-{i % 4}", "loop", "tick", {"n": i})
        ours.sync_projections()
        assert ours.verify_projections() == []
        for user in range(4):
            state = ours.get_flow_state(f"user-{user}", "loop")
            assert state is not None
            assert state.version == 4


def test_a_failed_or_conflicting_append_hands_nothing_over(store_url: str) -> None:
    with FlowStore(store_url) as ours, FlowStore(store_url) as theirs:
        ours.create_flow(ring("loop"))
        ours.execute_transition("ann", "loop", "tick", {"n": 0})
        ours.sync_projections()
        theirs.execute_transition("ann", "loop", "tick", {"n": 1})  # ours' cached state is stale
        before = ours.log_position()
        internals = Internals(ours)
        recent = internals.recent
        assert recent is not None
        with internals.paused_projections():
            # Our first attempt conflicts (it is retried on the fresh state); the next fails.
            ours.execute_transition("ann", "loop", "tick", {"n": 2})
            with (
                internals.failing_appends(StorageUnavailableError("x", "y", "down")),
                pytest.raises(StorageUnavailableError),
            ):
                ours.execute_transition("ann", "loop", "tick", {"n": 3})
            kept = [(position, e) for position, e in recent.held() if position > before]
        # Only the retried append (v2 was ours, v3 theirs), at its committed id, as logged there.
        assert [(e.originator_version, getattr(e, "payload", None)) for _, e in kept] == [
            (4, {"n": 2})
        ]
        [(position, event)] = kept
        [(logged_at, logged)] = ours.read_events(position, 1)
        assert (logged_at, logged) == (position, event)
        ours.sync_projections()
        assert ours.verify_projections() == []


def test_a_payload_the_caller_changes_afterwards_is_not_what_is_projected(store_url: str) -> None:
    with FlowStore(store_url) as store:
        store.create_flow(ring("loop"))
        payload: dict[str, Any] = {"form": {"plan": "pro"}, "tags": ["a"]}
        with Internals(store).paused_projections():
            store.execute_transition("ann", "loop", "tick", payload)
            payload["form"]["plan"] = "free"  # the caller's objects, changed after the call
            payload["tags"].append("b")
        state = store.get_flow_state("ann", "loop")
        assert state is not None
        assert state.payload == {"form": {"plan": "pro"}, "tags": ["a"]}
        assert store.verify_projections() == []


def test_after_erase_user_nothing_of_the_user_is_in_the_tables_or_the_buffer(
    store_url: str,
) -> None:
    with FlowStore(store_url) as store:
        store.create_flow(ring("loop"))
        store.create_flow(ring("other"))
        store.execute_transition("bob", "loop", "tick", {"note": "bob-note"})
        # Buffered, not projected yet, when the erasure begins.
        with Internals(store).paused_projections():
            for flow in ("loop", "other", "loop"):
                store.execute_transition("ann", flow, "tick", {"note": SECRET})
        assert store.erase_user("ann") == 2
        recent = Internals(store).recent
        assert recent is not None
        kept = recent.held()
        assert not [e for _, e in kept if isinstance(e, InstanceEvent) and e.user_id == "ann"]
        store.sync_projections()
        text = table_text(store)
        assert SECRET not in text
        assert repr("ann") not in text
        assert "bob-note" in text
        assert store.verify_projections() == []


def test_an_event_whose_key_was_erased_elsewhere_is_read_from_the_log(store_url: str) -> None:
    """A key this process learns was erased elsewhere leaves its cache: its events buffered
    meanwhile are read from the log (anonymised), not projected as they were appended."""
    # The eraser projects nothing: its live projector (woken at once by PostgreSQL's NOTIFY)
    # would read Ann's event from the log before the shred, with the key still there, and write
    # it into the tables this test reads (once in a CI run). A real erasure appends `FlowErased`,
    # whose fold deletes such rows; this test shreds the key alone.
    with (
        FlowStore(store_url) as ours,
        FlowStore(store_url, live_projections=False) as eraser,
    ):
        ours.create_flow(ring("loop"))
        internals = Internals(ours)
        with internals.paused_projections():
            ours.execute_transition("ann", "loop", "tick", {"note": SECRET})
            [subject] = Internals(eraser).keys.shred("ann")  # gone from the key table
            internals.keys.forget(subject)  # what ours does on reading the FlowErased
        ours.sync_projections()
        text = table_text(ours)
        assert SECRET not in text
        assert repr("ann") not in text
        state = ours.get_flow_state("ann", "loop")  # found by instance id, naming a stand-in
        assert state is not None
        assert state.payload is None
        assert state.user_id.startswith(ERASED_USER_PREFIX)
        assert ours.verify_projections() == []


def test_an_event_whose_key_is_no_longer_cached_is_not_handed_over() -> None:
    with memory_store() as store:
        store.create_flow(ring("loop"))
        internals = Internals(store)
        with internals.paused_projections():
            store.execute_transition("ann", "loop", "tick", {"note": SECRET})
            recent = internals.recent
            assert recent is not None
            held = recent.held()
            assert held
            internals.keys._by_subject.clear()  # as a full cache starts afresh (no erasure)
            assert recent.take(held[0][0], 1000) == []
        assert store.verify_projections() == []
        state = store.get_flow_state("ann", "loop")
        assert state is not None
        assert state.payload == {"note": SECRET}  # read from the log, with the key it still has
