"""flowstore.testing: the helpers users test their own flows with."""

from __future__ import annotations

from datetime import timedelta

import pytest
from eventsourcing.persistence import OperationalError

from flowstore import FlowState, StorageUnavailableError
from flowstore.testing import (
    Clock,
    Internals,
    linear_flow,
    memory_store,
    onboarding_flow,
    ring_flow,
)


def test_a_memory_store_runs_a_linear_flow_on_a_clock_the_test_moves() -> None:
    clock = Clock()
    with memory_store(clock=clock) as store:
        store.create_flow(linear_flow("signup", steps=3))
        first = store.execute_transition("ann", "signup", "next")
        clock.advance(90)
        second = store.execute_transition("ann", "signup", "next")
        assert isinstance(second, FlowState)
        assert (first.step, second.step) == ("s1", "s2")
        assert second.updated_at - first.updated_at == timedelta(seconds=90)
        assert store.get_flow_history("ann", "signup")[-1].to_step == "s2"


def test_the_shipped_flows_are_valid_definitions() -> None:
    with memory_store() as store:
        for definition in (onboarding_flow(), linear_flow("l"), ring_flow("r")):
            assert store.get_flow(store.create_flow(definition)).flow == definition["flow"]
    assert onboarding_flow() is not onboarding_flow()  # a fresh copy each time


def test_internals_fail_the_appends_of_the_block_only() -> None:
    with memory_store() as store:
        store.create_flow(linear_flow("signup"))
        with (
            Internals(store).failing_appends(OperationalError("disk I/O error")),
            pytest.raises(StorageUnavailableError),
        ):
            store.execute_transition("ann", "signup", "next")
        assert store.get_flow_state("ann", "signup") is None  # nothing written
        assert store.execute_transition("ann", "signup", "next").step == "s1"  # restored
