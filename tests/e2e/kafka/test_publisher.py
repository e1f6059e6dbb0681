"""The publisher against a real broker: nothing lost, order per key, one publisher at a time,
kill -9 and broker restarts survived."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from flowstore import FlowStore
from flowstore.adapters.kafka.publisher import (
    KafkaPublisher,
    PublisherStatus,
    embedded_publisher_from_env,
    ensure_topic,
    start_embedded_publisher,
)
from flowstore.adapters.kafka.tracking import PublisherTracking
from flowstore.storage import parse_url
from tests.e2e.kafka.broker import TansuBroker
from tests.e2e.kafka.conftest import check_topic, drive, wait_until
from tests.flows import linear

CLI = [sys.executable, "-m", "flowstore.adapters.cli"]


def test_every_event_arrives_once_keyed_by_aggregate_in_order(
    store_url: str, bootstrap: str, topic: str
) -> None:
    with FlowStore(store_url) as store:
        drive(store, 60)
        publisher = KafkaPublisher(store, bootstrap, topic, batch=50)
        try:
            assert publisher.lock.acquire()
            assert publisher.publish_pending() == store.log_position()
            status = publisher.status()
        finally:
            publisher.close()
        assert (status.state, status.position, status.lag) == ("caught up", store.log_position(), 0)
        check = check_topic(bootstrap, topic, store)
    assert check.keys_match
    assert check.duplicates == 0


def test_the_embedded_publisher_follows_live_writes_and_drains_on_stop(
    tmp_path: Path, bootstrap: str, topic: str
) -> None:
    with FlowStore(f"sqlite:///{tmp_path / 'a.db'}") as store:
        embedded = start_embedded_publisher(store, bootstrap, topic, poll_interval=0.01)
        try:
            drive(store, 20, seed=1)
            wait_until(lambda: embedded.status().position == store.log_position(), "catch-up")
            drive(store, 20, seed=2, prefix="late")  # written while it runs...
        finally:
            embedded.stop()  # ...and published before stop() returns
        assert not embedded.alive
        assert PublisherTracking(store.config).position(topic) == store.log_position()
        check_topic(bootstrap, topic, store)


def test_a_second_publisher_waits_for_the_first(store_url: str, bootstrap: str, topic: str) -> None:
    with FlowStore(store_url) as store:
        drive(store, 5)
        first = start_embedded_publisher(store, bootstrap, topic, poll_interval=0.01)
        wait_until(lambda: first.status().state == "caught up", "the first publisher")
        second = start_embedded_publisher(store, bootstrap, topic, poll_interval=0.01)
        try:
            wait_until(lambda: second.status().state == "waiting for lock", "the second to wait")
            drive(store, 5, prefix="more")
            wait_until(lambda: first.status().position == store.log_position(), "first")
            assert second.status().state == "waiting for lock"
            assert second.status().published == 0
            first.stop()
            drive(store, 5, prefix="after")
            wait_until(lambda: second.status().position == store.log_position(), "second")
        finally:
            first.stop()
            second.stop()
        assert second.status().published > 0
        check = check_topic(bootstrap, topic, store)
    assert check.duplicates == 0  # the hand-over resent nothing


def test_a_publisher_killed_at_random_points_leaves_no_gap(
    store_url: str, bootstrap: str, topic: str
) -> None:
    rng = random.Random(5)
    with FlowStore(store_url) as store:
        drive(store, 120)
        head = store.log_position()
    tracking = PublisherTracking(parse_url(store_url))
    env = {**os.environ, "FLOWSTORE_URL": store_url, "FLOWSTORE_KAFKA_BOOTSTRAP": bootstrap}
    # Pages of 3: the work takes long enough for two kills even when this process is starved
    # for a while between seeing progress and killing (with 7, a busy CI could lose the race).
    args = [*CLI, "publish", "--topic", topic, "--batch", "3", "--interval", "0.01"]
    kills = 0
    while tracking.position(topic) < head and kills < 6:
        before = tracking.position(topic)
        worker = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wait_until(lambda: tracking.position(topic) > before, "the worker to publish a page")  # noqa: B023
        threading.Event().wait(rng.uniform(0, 0.05))  # then die at a random point of the work
        worker.send_signal(signal.SIGKILL)
        worker.wait()
        kills += 1
    assert kills >= 2, "the worker finished before it could be killed twice"
    worker = subprocess.Popen(
        [*args, "--report-every", "0"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert worker.stdout is not None
    assert "stop with Ctrl-C or SIGTERM" in worker.stdout.readline()  # its handler is in place
    wait_until(lambda: tracking.position(topic) == head, "the last worker to catch up")
    worker.send_signal(signal.SIGTERM)
    out, err = worker.communicate(timeout=30)
    assert worker.returncode == 0, err
    assert "lag 0" in out
    assert f"stopped at event {head} of {head}" in out
    tracking.close()
    with FlowStore(store_url) as store:
        check = check_topic(bootstrap, topic, store)
    # Each kill may resend the pages in flight (the one awaiting its acknowledgements and the
    # one sent after it): duplicates are allowed, and counted here.
    print(f"{kills} kills, {check.messages} messages, {check.duplicates} duplicates")
    assert check.duplicates <= kills * 2 * 7


def test_a_broker_stopped_and_restarted_mid_run_loses_nothing(
    tmp_path: Path, own_broker: TansuBroker, topic: str
) -> None:
    statuses: list[PublisherStatus] = []
    with FlowStore(f"sqlite:///{tmp_path / 'a.db'}") as store:
        embedded = start_embedded_publisher(
            store, own_broker.bootstrap, topic, poll_interval=0.01, flush_timeout=0.3,
            on_status=statuses.append,
        )  # fmt: skip
        try:
            drive(store, 30, seed=1)
            wait_until(lambda: embedded.status().position == store.log_position(), "phase 1")
            before = embedded.status().position
            # The broker keeps its topics in memory: read what it has before it goes.
            check_topic(own_broker.bootstrap, topic, store)
            own_broker.stop()
            drive(store, 30, seed=2, prefix="down")  # the store keeps accepting commands
            wait_until(lambda: embedded.status().state == "waiting for broker", "the stall")
            assert embedded.status().lag > 0
            assert embedded.status().position == before  # nothing recorded without an ack
            own_broker.start_again()
            wait_until(lambda: embedded.status().position == store.log_position(), "catch-up")
        finally:
            embedded.stop()
        # The restarted broker came back empty: everything after `before` must be on it.
        check = check_topic(own_broker.bootstrap, topic, store, since=before)
    assert check.keys_match
    assert any(s.state == "waiting for broker" and s.last_error for s in statuses)


def test_publish_once_creates_the_topic_and_reports_progress(
    tmp_path: Path, bootstrap: str, topic: str
) -> None:
    url = f"sqlite:///{tmp_path / 'a.db'}"
    with FlowStore(url) as store:
        drive(store, 10)
        head = store.log_position()
    env = {**os.environ, "FLOWSTORE_KAFKA_BOOTSTRAP": bootstrap}
    done = subprocess.run(
        [*CLI, "--url", url, "--json", "publish", "--once", "--topic", topic],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {
        "topic": topic, "position": head, "logPosition": head, "lag": 0,
        "published": head, "failures": 0,
    }  # fmt: skip
    assert "caught up" in done.stderr
    assert not ensure_topic(bootstrap, topic)  # it exists already


def test_without_brokers_the_cli_says_so() -> None:
    env = {k: v for k, v in os.environ.items() if k != "FLOWSTORE_KAFKA_BOOTSTRAP"}
    done = subprocess.run(
        [*CLI, "--url", "memory://", "publish", "--once"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 9  # KAFKA_UNAVAILABLE: unavailable, like the database
    assert "error[KAFKA_UNAVAILABLE]" in done.stderr
    assert "FLOWSTORE_KAFKA_BOOTSTRAP" in done.stderr


def test_a_worker_started_while_the_broker_is_down_waits_and_stops_on_sigterm(
    tmp_path: Path, own_broker: TansuBroker, topic: str
) -> None:
    url = f"sqlite:///{tmp_path / 'a.db'}"
    with FlowStore(url) as store:
        drive(store, 5)
    own_broker.stop()
    env = {**os.environ, "FLOWSTORE_URL": url, "FLOWSTORE_KAFKA_BOOTSTRAP": own_broker.bootstrap}
    worker = subprocess.Popen(
        [*CLI, "publish", "--topic", topic, "--report-every", "0.2"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert worker.stdout is not None
    assert "stop with Ctrl-C or SIGTERM" in worker.stdout.readline()
    line = worker.stdout.readline()
    while "waiting for broker" not in line:  # lag and the error are reported while it waits
        line = worker.stdout.readline()
        assert line, "the worker ended without reporting the stall"
    assert "published up to event 0 of" in line
    assert "lag 0" not in line
    worker.send_signal(signal.SIGTERM)
    out, err = worker.communicate(timeout=30)
    assert worker.returncode == 0, err
    assert "stopped at event 0 of" in out
    assert PublisherTracking(parse_url(url)).position(topic) == 0


def test_the_environment_starts_an_embedded_publisher(
    monkeypatch: pytest.MonkeyPatch, bootstrap: str, topic: str
) -> None:
    monkeypatch.delenv("FLOWSTORE_KAFKA_BOOTSTRAP", raising=False)
    with FlowStore("memory://") as store:
        assert embedded_publisher_from_env(store) is None
        monkeypatch.setenv("FLOWSTORE_KAFKA_BOOTSTRAP", bootstrap)
        monkeypatch.setenv("FLOWSTORE_KAFKA_TOPIC", topic)
        drive(store, 3)
        embedded = embedded_publisher_from_env(store, poll_interval=0.01)
        assert embedded is not None
        embedded.stop()
        assert embedded.status().position == store.log_position()
        check_topic(bootstrap, topic, store)


def test_flowstore_kafka_option_publishes_and_close_drains(
    store_url: str, bootstrap: str, topic: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("FLOWSTORE_KAFKA_BOOTSTRAP", raising=False)
    with FlowStore(store_url, kafka={"bootstrap": bootstrap, "topic": topic}) as store:
        drive(store, 4)
        head = store.log_position()
    # close() stopped the publisher only after it had sent everything the log held
    assert PublisherTracking(parse_url(store_url)).position(topic) == head
    with FlowStore(store_url, kafka=False) as store:
        check_topic(bootstrap, topic, store)


def test_flowstore_reads_the_bootstrap_from_the_environment_unless_told_not_to(
    bootstrap: str, topic: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    url = f"sqlite:///{tmp_path / 'env.db'}"
    monkeypatch.setenv("FLOWSTORE_KAFKA_BOOTSTRAP", bootstrap)
    monkeypatch.setenv("FLOWSTORE_KAFKA_TOPIC", topic)
    with FlowStore(url, kafka=False) as store:
        drive(store, 2)
    assert PublisherTracking(parse_url(url)).position(topic) == 0
    with FlowStore(url) as store:
        head = store.log_position()
    assert PublisherTracking(parse_url(url)).position(topic) == head


def test_the_package_exports_what_it_lists() -> None:
    import flowstore.adapters.kafka as package

    assert len(set(package.__all__)) == len(package.__all__)
    for name in package.__all__:
        assert getattr(package, name) is not None, name


class _RecordingProducer:
    """Stands in for KafkaProducer: records sends and flushes, acknowledges everything."""

    calls: list[tuple[str, object]] = []

    def __init__(self, **config: object) -> None:
        pass

    def send(self, topic: str, *, key: bytes, value: bytes) -> _Acknowledged:
        self.calls.append(("send", (key, value)))
        return _Acknowledged()

    def flush(self, timeout: float | None = None) -> None:
        self.calls.append(("flush", None))

    def close(self, timeout: float | None = None) -> None:
        pass


class _Acknowledged:
    is_done = True

    def failed(self) -> bool:
        return False


def test_each_page_is_sent_while_the_broker_acknowledges_the_one_before(
    store_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The producer's pipeline never runs dry between pages: a page is sent (and the next one
    read) before the previous page's acknowledgements are awaited and its position recorded;
    only the log's last page is flushed. Messages are the envelope's bytes, every event once, in
    log order, pages recorded one by one in order (at least once: a page is recorded only once
    it and every page before it are acknowledged)."""
    from flowstore.adapters.kafka import publisher as module
    from flowstore.adapters.kafka.envelope import FlowEventEnvelope, message_key

    monkeypatch.setattr(module, "KafkaProducer", _RecordingProducer)
    monkeypatch.setattr(_RecordingProducer, "calls", [])
    with FlowStore(store_url, live_projections=False) as store:
        store.create_flow(linear("f", 2))
        for n in range(11):
            store.reset_flow(f"u{n}", "f")
        reads = []
        read_plain_events = store.read_plain_events

        def recording_read(start: int, limit: int = 1000) -> list[tuple[int, Any]]:
            _RecordingProducer.calls.append(("read", start))
            reads.append(start)
            return read_plain_events(start, limit)

        monkeypatch.setattr(store, "read_plain_events", recording_read)
        publisher = KafkaPublisher(store, "127.0.0.1:1", "t", batch=5)
        publisher._topic_checked_at = float("inf")  # no admin client: the topic "exists"
        advance = publisher.tracking.advance

        def recording_advance(topic: str, position: int) -> None:
            _RecordingProducer.calls.append(("record", position))
            advance(topic, position)

        monkeypatch.setattr(publisher.tracking, "advance", recording_advance)
        publisher.lock.acquire()
        try:
            assert publisher.publish_pending() == store.log_position() == 13
            assert publisher.tracking.position("t") == 13
        finally:
            publisher.close()
        log = store.read_events(1, 100)
    kinds = [kind for kind, _ in _RecordingProducer.calls]
    # Pages of 5, 5 and 3.
    assert kinds == [
        *["read", *["send"] * 5],
        *["read", *["send"] * 5],
        *["read", "record", *["send"] * 3],
        *["record", "flush", "record"],
    ]
    recorded = [value for kind, value in _RecordingProducer.calls if kind == "record"]
    assert recorded == [5, 10, 13]
    sent = [value for kind, value in _RecordingProducer.calls if kind == "send"]
    assert sent == [(message_key(e), FlowEventEnvelope.of(n, e).to_bytes()) for n, e in log]
    assert reads == [1, 6, 11]
