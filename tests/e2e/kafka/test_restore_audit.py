"""`flowstore restore --from-kafka` rebuilds an equal store; `flowstore audit` finds every gap."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import pytest
from kafka import KafkaProducer

from flowstore import FlowStore
from flowstore.adapters.cli import main
from flowstore.adapters.errors import DIFFERENCES_EXIT_CODE
from flowstore.adapters.kafka.audit import audit_topic
from flowstore.adapters.kafka.consumer import TopicMessage, read_topic
from flowstore.adapters.kafka.envelope import FlowEventEnvelope
from flowstore.adapters.kafka.publisher import KafkaPublisher, ensure_topic
from flowstore.adapters.kafka.restore import TopicIncompleteError, restore_from_kafka
from flowstore.adapters.kafka.tracking import PublisherTracking
from flowstore.domain import instance_id
from tests.e2e.kafka.conftest import FLOW, drive
from tests.flows import Clock

USERS = 40


def rounded(value: Any) -> Any:
    """Floats to 9 significant digits: statistics sum floats in batch order, which may differ."""
    if isinstance(value, float):
        return float(f"{value:.9g}")
    if isinstance(value, dict):
        return {k: rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [rounded(v) for v in value]
    return value


def everything(store: FlowStore) -> dict[str, Any]:
    """What a user of the store can read: states, histories, statistics, funnel, definitions."""
    users = [f"u{i}" for i in range(USERS)]
    return rounded(
        {
            "states": [
                s.to_dict() if (s := store.get_flow_state(u, FLOW)) else None for u in users
            ],
            "user_flows": [[s.to_dict() for s in store.get_user_flows(u)] for u in users],
            "histories": [[h.to_dict() for h in store.get_flow_history(u, FLOW)] for u in users],
            "statistics": store.get_flow_statistics(FLOW).to_dict(),
            "all_statistics": store.get_flow_statistics().to_dict(),
            "funnel": [f.to_dict() for f in store.get_flow_funnel(FLOW)],
            "flows": [f.to_seed() for f in store.list_flows()],
            "log": len(store.read_events(1, 100_000)),
        }
    )


def published(url: str, bootstrap: str, topic: str, clock: Clock) -> FlowStore:
    store = FlowStore(url, clock=clock)
    drive(store, USERS, clock=clock)
    store.update_flow(FLOW, {"config": {"v": 2}})
    publisher = KafkaPublisher(store, bootstrap, topic, batch=64)
    publisher.lock.acquire()
    publisher.publish_pending()
    publisher.close()
    return store


@pytest.fixture
def clock() -> Clock:
    return Clock()


def test_restore_from_kafka_gives_a_store_equal_to_the_original(
    store_url: str, tmp_path: Path, bootstrap: str, topic: str, clock: Clock,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    source_url = f"sqlite:///{tmp_path / 'source.db'}"
    with published(source_url, bootstrap, topic, clock) as source:
        # Replays on the topic (a publisher that restarted) must not matter.
        tracking = PublisherTracking(source.config)
        tracking.reset(topic, 40)
        tracking.close()
        again = KafkaPublisher(source, bootstrap, topic)
        again.lock.acquire()
        again.publish_pending()
        again.close()
        original = everything(source)
    code = main(
        ["--url", store_url, "--json", "restore", "--from-kafka", "--bootstrap", bootstrap,
         "--topic", topic]
    )  # fmt: skip
    report = json.loads(capsys.readouterr().out)
    assert code == 0
    assert report["duplicates"] == report["messages"] - report["events"] > 0
    with FlowStore(store_url, clock=clock) as restored:
        assert everything(restored) == original
        assert restored.verify_projections() == []


def test_restore_refuses_a_store_with_events_and_a_topic_with_a_hole(
    tmp_path: Path, bootstrap: str, topic: str, clock: Clock
) -> None:
    with published(f"sqlite:///{tmp_path / 'a.db'}", bootstrap, topic, clock) as source:
        with pytest.raises(ValueError, match="restore needs an empty store"):
            restore_from_kafka(source, bootstrap, topic)
        holed = copy_topic(bootstrap, topic, drop=lambda m, e: e.aggregate_version == 2)
        with FlowStore(f"sqlite:///{tmp_path / 'b.db'}") as empty:
            with pytest.raises(TopicIncompleteError, match="lacks version"):
                restore_from_kafka(empty, bootstrap, holed)
            assert empty.log_position() == 0  # nothing written


def copy_topic(
    bootstrap: str,
    topic: str,
    *,
    drop: Any = lambda message, envelope: False,
    swap: tuple[int, int] | None = None,
) -> str:
    """Copy `topic` to a new topic, message by message, same keys and partitions, leaving out
    the messages `drop` picks and exchanging the two messages at notification ids `swap`."""
    messages: list[TopicMessage] = sorted(read_topic(bootstrap, topic), key=lambda m: m.offset)
    copy = f"{topic}-copy"
    ensure_topic(bootstrap, copy)
    by_id = {FlowEventEnvelope.parse(m.value).notification_id: i for i, m in enumerate(messages)}
    if swap:
        i, j = by_id[swap[0]], by_id[swap[1]]
        assert messages[i].partition == messages[j].partition
        messages[i], messages[j] = messages[j], messages[i]
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all")
    for message in messages:
        if not drop(message, FlowEventEnvelope.parse(message.value)):
            producer.send(copy, key=message.key, value=message.value, partition=message.partition)
    producer.flush()
    producer.close()
    return copy


def audit(
    url: str, bootstrap: str, topic: str, capsys: pytest.CaptureFixture[str]
) -> tuple[int, Any]:
    code = main(["--url", url, "--json", "audit", "--bootstrap", bootstrap, "--topic", topic])
    return code, json.loads(capsys.readouterr().out)


def test_audit_passes_a_complete_topic_and_counts_duplicates(
    tmp_path: Path, bootstrap: str, topic: str, clock: Clock,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    url = f"sqlite:///{tmp_path / 'a.db'}"
    published(url, bootstrap, topic, clock).close()
    code, report = audit(url, bootstrap, topic, capsys)
    assert (code, report["ok"], report["findings"], report["unpublished"]) == (0, True, [], 0)
    twice = copy_topic(bootstrap, topic)
    copy_again = copy_topic(bootstrap, topic)  # appends to the same copy: every event twice
    assert copy_again == twice
    code, report = audit(url, bootstrap, twice, capsys)
    assert code == 0
    assert report["ok"]
    assert report["duplicates"] == report["checked"]
    assert {f["problem"] for f in report["findings"]} == {"duplicated"}


def test_audit_reports_a_deleted_message_and_exits_non_zero(
    tmp_path: Path, bootstrap: str, topic: str, clock: Clock,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    url = f"sqlite:///{tmp_path / 'a.db'}"
    with published(url, bootstrap, topic, clock) as store:
        victim_id, victim = store.read_events(1, 1000)[100]
    copy = copy_topic(bootstrap, topic, drop=lambda m, e: e.notification_id == victim_id)
    code, report = audit(url, bootstrap, copy, capsys)
    assert code == DIFFERENCES_EXIT_CODE
    assert report["findings"] == [
        {
            "aggregateId": str(victim.originator_id),
            "userId": getattr(victim, "user_id", None),
            "flowId": FLOW,
            "problem": "missing",
            "versions": [victim.originator_version],
        }
    ]
    main(["--url", url, "audit", "--bootstrap", bootstrap, "--topic", copy])
    text = capsys.readouterr().out
    assert f"missing: version(s) {victim.originator_version}" in text
    assert "1 gap(s)" in text


def test_audit_reports_a_reordered_message(
    tmp_path: Path, bootstrap: str, topic: str, clock: Clock,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    url = f"sqlite:///{tmp_path / 'a.db'}"
    with published(url, bootstrap, topic, clock) as store:
        events = store.read_events(1, 1000)
    # Two consecutive events of one instance (same key, same partition), exchanged.
    (first_id, first), (second_id, _) = next(
        (a, b)
        for a, b in itertools.pairwise(events)
        if a[1].originator_id == b[1].originator_id and getattr(a[1], "user_id", None)
    )
    copy = copy_topic(bootstrap, topic, swap=(first_id, second_id))
    code, report = audit(url, bootstrap, copy, capsys)
    assert code == DIFFERENCES_EXIT_CODE
    assert [(f["aggregateId"], f["problem"], f["versions"]) for f in report["findings"]] == [
        (str(first.originator_id), "out of order", [first.originator_version])
    ]


def test_audit_counts_only_what_the_publisher_recorded_as_due(
    tmp_path: Path, bootstrap: str, topic: str, clock: Clock,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    url = f"sqlite:///{tmp_path / 'a.db'}"
    with published(url, bootstrap, topic, clock) as store:
        head = store.log_position()
        drive(store, 3, prefix="late")  # not published yet: lag, not a gap
        later = store.log_position() - head
    code, report = audit(url, bootstrap, topic, capsys)
    assert (code, report["upTo"], report["unpublished"]) == (0, head, later)


def test_audit_of_a_topic_that_does_not_exist_fails_without_creating_it(
    tmp_path: Path, bootstrap: str, topic: str, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"sqlite:///{tmp_path / 'a.db'}"
    FlowStore(url, kafka=False).close()  # a store to audit (read-only commands create none)
    code = main(["--url", url, "audit", "--bootstrap", bootstrap, "--topic", topic])
    assert code == 9  # KAFKA_UNAVAILABLE
    assert f"error[KAFKA_UNAVAILABLE]: topic {topic!r} not found" in capsys.readouterr().err
    assert ensure_topic(bootstrap, topic)  # created now, by us: it did not exist


def test_an_erasure_travels_the_stream_to_audits_and_restores(
    store_url: str, tmp_path: Path, bootstrap: str, topic: str, clock: Clock
) -> None:
    source_url = f"sqlite:///{tmp_path / 'source.db'}"
    with published(source_url, bootstrap, topic, clock) as source:
        # u0's events went out before the erasure (with their user id), the erasure after it.
        assert source.erase_user("u0") == 1
        publisher = KafkaPublisher(source, bootstrap, topic)
        publisher.lock.acquire()
        publisher.publish_pending()
        publisher.close()
        erasures = [
            e
            for m in read_topic(bootstrap, topic)
            if (e := FlowEventEnvelope.parse(m.value)).event_type == "FlowErased"
        ]
        assert len(erasures) == 1
        assert erasures[0].aggregate_id == instance_id("u0", FLOW)  # consumers delete by key
        # The log now reads u0's events anonymised; the topic's older copies are not "changed".
        report = audit_topic(source, bootstrap, topic)
        assert (report.ok, report.findings) == (True, [])
        original = everything(source)
    with FlowStore(store_url, clock=clock) as restored:
        restore_from_kafka(restored, bootstrap, topic)
        assert everything(restored) == original
        assert restored.get_flow_state("u0", FLOW) is None
        # The restore shredded u0's key too: the user id is nowhere in its log any more.
        users = {getattr(e, "user_id", None) for _, e in restored.read_events(1, 100_000)}
        assert "u0" not in users
        assert "u1" in users
        assert restored.verify_projections() == []
