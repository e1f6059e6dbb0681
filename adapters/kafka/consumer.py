"""Reading flowstore events back from Kafka: `FlowEventConsumer` and `read_topic`.

    with FlowEventConsumer("127.0.0.1:9092", group_id="billing") as consumer:
        for envelope in consumer:          # FlowEventEnvelope, duplicates already dropped
            handle(envelope)
            consumer.commit()              # manual: after processing, never before

Delivery is at least once (the publisher resends after a crash), and the first copy of every event
arrives in its aggregate's order, so dropping every event whose (aggregate id, version) is not newer
than the last one seen gives each aggregate's events exactly once, in order. The last versions seen
live in `seen`, a mapping the caller may back with its own storage (say, next to its read model) so
that the guarantee survives a restart; by default it is a dict in memory.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator, MutableMapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self
from uuid import UUID

from kafka import KafkaConsumer, TopicPartition
from kafka.errors import KafkaError
from kafka.structs import OffsetAndMetadata

from flowstore.adapters.kafka.envelope import EnvelopeError, FlowEventEnvelope
from flowstore.adapters.kafka.publisher import (
    KafkaUnavailableError,
    bootstrap_from_env,
    topic_from_env,
)

__all__ = ["FlowEventConsumer", "TopicMessage", "read_topic"]


@dataclass(frozen=True)
class TopicMessage:
    """One message as it sits on the topic."""

    partition: int
    offset: int
    key: bytes | None
    value: bytes

    def envelope(self) -> FlowEventEnvelope:
        """The message's envelope (raises `EnvelopeError` if it is not one)."""
        return FlowEventEnvelope.parse(self.value)


def _partitions(consumer: KafkaConsumer, topic: str, timeout: float) -> list[TopicPartition]:
    deadline = time.monotonic() + timeout
    while True:
        found = consumer.partitions_for_topic(topic)
        if found:
            return [TopicPartition(topic, p) for p in sorted(found)]
        if time.monotonic() > deadline or topic not in consumer.topics():
            raise KafkaUnavailableError(f"topic {topic!r} not found")
        # Metadata arrives asynchronously: ask again (poll drives the client's network I/O).
        consumer.poll(timeout_ms=100)


def read_topic(
    bootstrap: str | None = None, topic: str | None = None, *, timeout: float = 30.0
) -> Iterator[TopicMessage]:
    """Every message on the topic now: each partition in offset order (partitions interleaved).

    Reads by partition assignment (no consumer group, nothing committed) from the beginning until
    every partition has reached the end offset taken at the start and one more fetch brings
    nothing; raises `KafkaUnavailableError` if the brokers cannot be reached or no progress is made
    for `timeout` seconds.
    """
    servers, name = bootstrap_from_env(bootstrap), topic_from_env(topic)
    try:
        consumer = KafkaConsumer(
            bootstrap_servers=servers,
            enable_auto_commit=False,
            group_id=None,
            fetch_max_wait_ms=100,
            allow_auto_create_topics=False,  # reading a misspelt topic must not create it
        )
    except KafkaError as exc:
        raise KafkaUnavailableError(f"cannot reach Kafka at {servers}: {exc!r}") from None
    try:
        partitions = _partitions(consumer, name, min(timeout, 10.0))
        # A lower bound only: the test broker (tansu 0.6) reports the base offset of the last
        # batch + 1 as the end offset, so the read goes on until a fetch past it comes back empty.
        ends: dict[TopicPartition, int] = consumer.end_offsets(partitions)
        consumer.assign(partitions)
        consumer.seek_to_beginning(*partitions)
        last_progress = time.monotonic()
        while True:
            batches = consumer.poll(timeout_ms=200, max_records=10_000)
            for tp, records in batches.items():
                for record in records:
                    yield TopicMessage(tp.partition, record.offset, record.key, record.value)
            if batches:
                last_progress = time.monotonic()
            elif all(consumer.position(tp) >= ends[tp] for tp in partitions):
                return
            elif time.monotonic() - last_progress > timeout:
                raise KafkaUnavailableError(f"reading {name!r} made no progress for {timeout} s")
    except KafkaError as exc:
        raise KafkaUnavailableError(f"reading {name!r} failed: {exc!r}") from None
    finally:
        consumer.close()


class FlowEventConsumer:
    """Typed flowstore events from a topic, duplicates dropped, offsets committed by the caller.

    With `group_id`, partitions are shared with the group's other members and `commit()` stores
    the offsets in the group. Without it, every partition is assigned to this consumer and nothing
    is committed (fast: no group to join; the way tools and tests read).
    `from_beginning`: where to start when the group has no committed offset (or without a group).
    `skip_invalid`: count and skip messages that are not envelopes instead of raising
    `EnvelopeError`.
    """

    def __init__(
        self,
        bootstrap: str | None = None,
        topic: str | None = None,
        *,
        group_id: str | None = None,
        from_beginning: bool = True,
        seen: MutableMapping[UUID, int] | None = None,
        skip_invalid: bool = False,
        poll_timeout: float = 0.5,
        consumer_config: dict[str, Any] | None = None,
    ) -> None:
        self.bootstrap = bootstrap_from_env(bootstrap)
        self.topic = topic_from_env(topic)
        self.group_id = group_id
        self.seen: MutableMapping[UUID, int] = {} if seen is None else seen
        self.skip_invalid = skip_invalid
        self.poll_timeout = poll_timeout
        self.delivered = 0
        """Envelopes yielded."""
        self.duplicates = 0
        """Messages dropped because their (aggregate id, version) was not newer than seen."""
        self.invalid = 0
        """Messages skipped because they were not envelopes (with `skip_invalid`)."""
        self._pending: dict[TopicPartition, int] = {}
        self._stopping = threading.Event()
        settings: dict[str, Any] = {
            "bootstrap_servers": self.bootstrap,
            "group_id": group_id,
            "enable_auto_commit": False,
            "auto_offset_reset": "earliest" if from_beginning else "latest",
            # kafka-python 2.x's default, stated: 3.x raised it to 45 s, and brokers that hold a
            # group's first join for half the session timeout (tansu) then take 22 s to start.
            "session_timeout_ms": 10_000,
            "allow_auto_create_topics": False,
            **(consumer_config or {}),
        }
        try:
            self._consumer = KafkaConsumer(**settings)
        except KafkaError as exc:
            raise KafkaUnavailableError(
                f"cannot reach Kafka at {self.bootstrap}: {exc!r}"
            ) from None
        if group_id is not None:
            self._consumer.subscribe([self.topic])
        else:
            partitions = _partitions(self._consumer, self.topic, 10.0)
            self._consumer.assign(partitions)
            if from_beginning:
                self._consumer.seek_to_beginning(*partitions)
            else:
                self._consumer.seek_to_end(*partitions)

    def poll(self, timeout: float | None = None) -> list[FlowEventEnvelope]:
        """The next envelopes that arrive within `timeout` seconds (maybe none), duplicates dropped.

        They count as delivered: the next `commit()` covers them.
        """
        return list(self._envelopes(timeout))

    def __iter__(self) -> Iterator[FlowEventEnvelope]:
        """Envelopes as they arrive, until `stop()`; `commit()` covers every one yielded."""
        while not self._stopping.is_set():
            yield from self._envelopes(self.poll_timeout)

    def _envelopes(self, timeout: float | None) -> Iterator[FlowEventEnvelope]:
        wait = self.poll_timeout if timeout is None else timeout
        batches = self._consumer.poll(timeout_ms=int(wait * 1000))
        for tp, records in batches.items():
            for record in records:
                # Counted before the caller sees it: commit() after processing covers it.
                self._pending[tp] = record.offset + 1
                try:
                    envelope = FlowEventEnvelope.parse(record.value)
                except EnvelopeError:
                    if not self.skip_invalid:
                        raise
                    self.invalid += 1
                    continue
                last = self.seen.get(envelope.aggregate_id, 0)
                if envelope.aggregate_version <= last:
                    self.duplicates += 1
                    continue
                self.seen[envelope.aggregate_id] = envelope.aggregate_version
                self.delivered += 1
                yield envelope

    def commit(self) -> None:
        """Commit the offsets of everything returned so far (with a group; else nothing to do)."""
        if self.group_id is None or not self._pending:
            return
        offsets = {tp: OffsetAndMetadata(offset, "", -1) for tp, offset in self._pending.items()}
        self._consumer.commit(offsets=offsets)
        self._pending.clear()

    def stop(self) -> None:
        """End the iteration after the current poll (safe to call from another thread)."""
        self._stopping.set()

    def close(self) -> None:
        """Leave the group (uncommitted work is delivered again to the next member) and close."""
        self._stopping.set()
        with contextlib.suppress(KafkaError):
            self._consumer.close(autocommit=False)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
