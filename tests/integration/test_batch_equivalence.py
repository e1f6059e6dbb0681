"""`execute_transitions` is the same transitions one by one, only in one transaction per batch."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flowstore import FlowError, FlowStore
from flowstore.testing import Clock, ring_flow

FLOW = "ring"

_REQUESTS = st.lists(
    st.tuples(
        st.sampled_from(["ann", "bob", "cat"]),
        st.sampled_from(["tick", "flip", "flop", "finish", "nope"]),
        st.none() | st.fixed_dictionaries({"n": st.integers(0, 9)}),
    ),
    min_size=1,
    max_size=25,
)


def _outcome(result: Any) -> Any:
    if isinstance(result, FlowError):
        return type(result).__name__, result.code
    return result.step, result.status, result.payload, result.version, result.ok


def _seen(store: FlowStore, users: list[str]) -> Any:
    """What the store says of these users and of the flow (response times aside: wall time)."""
    statistics = store.get_flow_statistics(FLOW).model_dump()
    statistics["performance_metrics"] = None
    states, histories = {}, {}
    for user in users:
        state = store.get_flow_state(user, FLOW)
        states[user] = None if state is None else _outcome(state)
        histories[user] = [
            (h.kind, h.from_step, h.to_step, h.transition, h.success, h.payload, h.error)
            for h in store.get_flow_history(user, FLOW)
        ]
    return states, histories, statistics


@pytest.fixture
def pair(
    store_url: str, tmp_path: Any, request: pytest.FixtureRequest
) -> Iterator[tuple[FlowStore, FlowStore]]:
    """Two stores on two databases of the backend, with one clock that does not move."""
    clock = Clock()
    if store_url.startswith("sqlite"):
        other_url = f"sqlite:///{tmp_path / 'other.db'}"
    else:
        other_url = request.getfixturevalue("pg_server").create_database()
    with FlowStore(store_url, clock=clock) as batched, FlowStore(other_url, clock=clock) as single:
        for store in (batched, single):
            store.create_flow(ring_flow(FLOW))
        yield batched, single


def test_a_batch_equals_its_transitions_one_by_one(pair: tuple[FlowStore, FlowStore]) -> None:
    batched, single = pair
    examples = itertools.count()

    @settings(
        max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
    )
    @given(_REQUESTS, st.integers(1, 8))
    def check(requests: list[tuple[str, str, dict[str, Any] | None]], batch_size: int) -> None:
        prefix = f"x{next(examples)}-"  # fresh users each example, in the same two stores
        calls = [(prefix + user, FLOW, name, payload) for user, name, payload in requests]
        results = batched.execute_transitions(calls, batch_size=batch_size)
        expected = []
        for call in calls:
            try:
                expected.append(single.execute_transition(*call))
            except FlowError as error:
                expected.append(error)
        assert [_outcome(r) for r in results] == [_outcome(r) for r in expected]
        users = sorted({user for user, *_ in calls})
        assert _seen(batched, users) == _seen(single, users)

    check()
    assert batched.verify_projections() == []
    assert single.verify_projections() == []
