"""Followers of the log wake on other processes' appends on PostgreSQL (LISTEN/NOTIFY)."""

from __future__ import annotations

from flowstore import FlowStore
from tests.flows import ring


def test_a_store_hears_another_stores_appends_on_postgres_and_polls_on_sqlite(
    store_url: str,
) -> None:
    with FlowStore(store_url) as writer, FlowStore(store_url, live_projections=False) as follower:
        notifier = follower.log_notifier
        assert notifier.pushes == store_url.startswith("postgresql")
        writer.create_flow(ring("r"))
        seen = notifier.generation
        writer.execute_transition("ann", "r", "tick")
        if notifier.pushes:
            # No timeout decides this: a notification arrives, or the test's timeout fails it.
            while not notifier.wait(seen, 60):
                pass
            assert notifier.generation > seen
        else:
            assert notifier.generation == seen == 0  # SQLite cannot notify: followers poll


def test_a_live_projector_catches_up_on_another_stores_appends_when_notified(
    store_url: str,
) -> None:
    with FlowStore(store_url) as reader, FlowStore(store_url) as writer:
        writer.create_flow(ring("r"))
        if not reader.log_notifier.pushes:
            return
        seen = reader.log_notifier.generation
        writer.execute_transition("bob", "r", "tick")
        while not reader.log_notifier.wait(seen, 60):
            pass
        # The nudge reached the projector: it catches up without this process writing anything.
        while reader.projection_position() < writer.log_position():
            reader.log_notifier.wait(reader.log_notifier.generation, 0.05)
        assert reader.get_flow_state("bob", "r") is not None
