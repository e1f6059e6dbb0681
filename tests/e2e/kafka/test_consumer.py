"""`FlowEventConsumer`: typed envelopes, replays dropped, offsets committed after processing."""

from __future__ import annotations

from pathlib import Path

from flowstore import FlowStore
from flowstore.adapters.kafka.consumer import FlowEventConsumer
from flowstore.adapters.kafka.envelope import FlowEventEnvelope
from flowstore.adapters.kafka.publisher import KafkaPublisher
from flowstore.adapters.kafka.tracking import PublisherTracking
from tests.e2e.kafka.conftest import drive, wait_until

# tansu completes a group's first join after session_timeout_ms / 2: keep it short in tests.
GROUP = {"session_timeout_ms": 6000, "heartbeat_interval_ms": 1000}


def publish_twice(store: FlowStore, bootstrap: str, topic: str) -> None:
    """Publish the log, then publish it all again (as a publisher that lost its position would)."""
    publisher = KafkaPublisher(store, bootstrap, topic, batch=100)
    try:
        publisher.lock.acquire()
        publisher.publish_pending()
        PublisherTracking(store.config).reset(topic, 0)
        publisher.publish_pending()
    finally:
        publisher.close()


def collect(consumer: FlowEventConsumer, count: int) -> list[FlowEventEnvelope]:
    got: list[FlowEventEnvelope] = []

    def enough() -> bool:
        got.extend(consumer.poll(0.2))
        return len(got) >= count

    wait_until(enough, f"{count} envelopes")
    return got


def test_replays_are_dropped_and_every_event_comes_once_in_order(
    tmp_path: Path, bootstrap: str, topic: str
) -> None:
    with FlowStore(f"sqlite:///{tmp_path / 'a.db'}") as store:
        drive(store, 30)
        publish_twice(store, bootstrap, topic)
        expected = [FlowEventEnvelope.of(n, e) for n, e in store.read_events(1, 10_000)]
    with FlowEventConsumer(bootstrap, topic) as consumer:  # no group: every partition assigned
        got = collect(consumer, len(expected))
        assert consumer.poll(0.3) == []
        assert consumer.duplicates == len(expected)
        assert consumer.delivered == len(expected)
    assert sorted(got, key=lambda e: e.notification_id) == expected
    by_aggregate: dict[object, list[int]] = {}
    for envelope in got:
        by_aggregate.setdefault(envelope.aggregate_id, []).append(envelope.aggregate_version)
    assert all(v == list(range(1, len(v) + 1)) for v in by_aggregate.values())


def test_a_group_member_resumes_after_the_last_commit(
    tmp_path: Path, bootstrap: str, topic: str
) -> None:
    with FlowStore(f"sqlite:///{tmp_path / 'a.db'}") as store:
        drive(store, 10)
        publisher = KafkaPublisher(store, bootstrap, topic)
        publisher.lock.acquire()
        publisher.publish_pending()
        total = store.log_position()
        first_part: list[FlowEventEnvelope] = []
        with FlowEventConsumer(
            bootstrap, topic, group_id="billing", consumer_config=GROUP
        ) as consumer:
            for envelope in consumer:
                first_part.append(envelope)
                consumer.commit()  # after "processing" each one
                if len(first_part) == 10:
                    break
        drive(store, 5, prefix="more")
        publisher.publish_pending()
        publisher.close()
        total_after = store.log_position()
    with FlowEventConsumer(bootstrap, topic, group_id="billing", consumer_config=GROUP) as again:
        rest = collect(again, total_after - 10)
        again.commit()
    ids = [e.notification_id for e in first_part + rest]
    assert sorted(ids) == list(range(1, total_after + 1))  # nothing twice, nothing lost
    assert total < total_after
