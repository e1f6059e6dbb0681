"""`execute_transitions` is the same transitions one by one, only in one transaction per batch.

Same results and errors in request order, same states, histories and statistics, and the same log:
event for event, the same types, instances, versions and fields (only `elapsed_ms`, wall time,
differs), whatever mix of valid, refused and invalid requests a batch holds.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flowstore import FlowError, FlowStore
from flowstore.domain import DomainEvent, instance_id
from flowstore.testing import Clock, Internals, ring_flow
from flowstore.views import instance_state

FLOW = "ring"
USERS = ["ann", "bob", "cat"]
BAD_USERS = ["", " ", "a\x00b", "erased:x", 7]
"""Refused before anything is read or written (each an `InvalidArgumentError`)."""
LIMIT = 64
"""Both stores' `max_payload_bytes`: a payload can be too large."""


class _Name(str):
    """A str subclass: a batch checks such an id every time (only exact strings are memoised)."""

    __slots__ = ()


_PAYLOADS = (
    st.none()
    | st.fixed_dictionaries({"n": st.integers(0, 9)})
    | st.fixed_dictionaries({"deep": st.fixed_dictionaries({"k": st.lists(st.integers(0, 3))})})
    | st.sampled_from(["text", {"t": (1, 2)}, {"big": "x" * LIMIT}, {"nul": "\x00"}])
)
_REQUESTS = st.lists(
    st.tuples(
        st.sampled_from(USERS) | st.sampled_from(BAD_USERS),
        st.sampled_from([FLOW, FLOW, FLOW, FLOW, "missing", ""]),
        st.sampled_from(["tick", "flip", "flop", "finish", "nope", "", _Name("tick"), _Name(" ")]),
        _PAYLOADS,
    ),
    min_size=1,
    max_size=25,
)


def _outcome(result: Any) -> Any:
    if isinstance(result, FlowError):
        return type(result).__name__, result.code, result.message
    return result.model_dump()


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


def _logged(store: FlowStore, after: int) -> list[tuple[str, Any, int, dict[str, Any]]]:
    """The log's events after position `after`: type, instance, version and fields."""
    events: list[DomainEvent] = [event for _, event in store.read_events(after + 1, 10_000)]
    return [
        (
            type(event).__name__,
            event.originator_id,
            event.originator_version,
            event.model_dump(exclude={"elapsed_ms"}),
        )
        for event in events
    ]


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
    with (
        FlowStore(store_url, clock=clock, max_payload_bytes=LIMIT) as batched,
        FlowStore(other_url, clock=clock, max_payload_bytes=LIMIT) as single,
    ):
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
    def check(requests: list[tuple[Any, str, str, Any]], batch_size: int) -> None:
        prefix = f"x{next(examples)}-"  # fresh users each example, in the same two stores
        calls = [
            (prefix + user if user in USERS else user, flow, name, payload)
            for user, flow, name, payload in requests
        ]
        before = batched.log_position(), single.log_position()
        results = batched.execute_transitions(calls, batch_size=batch_size)
        expected = []
        for call in calls:
            try:
                expected.append(single.execute_transition(*call))
            except FlowError as error:
                expected.append(error)
        assert [_outcome(r) for r in results] == [_outcome(r) for r in expected]
        assert _logged(batched, before[0]) == _logged(single, before[1])
        users = sorted({user for user, *_ in calls if isinstance(user, str) and user[:1] == "x"})
        assert _seen(batched, users) == _seen(single, users)
        # The instances cached after the batch are the log's (the next command trusts them), and
        # what the tables say (`get_user_flows`: rows folded by other code, `projections.ops`).
        commands = Internals(batched).commands
        for user in users:
            cached = Internals(batched).cached_instance(user, FLOW)
            assert cached == commands.get_instance(instance_id(user, FLOW))
        batched.sync_projections()
        last = {(who, flow): r for r, (who, flow, *_) in zip(results, calls, strict=True)}
        for user in users:
            projected = {state.flow: state for state in batched.get_user_flows(user)}.get(FLOW)
            answer = last.get((user, FLOW))
            if answer is not None and not isinstance(answer, FlowError):
                assert projected == answer
            cached = Internals(batched).cached_instance(user, FLOW)
            assert projected == (instance_state(cached) if cached and cached.is_live else None)

    check()
    assert batched.verify_projections() == []
    assert single.verify_projections() == []
