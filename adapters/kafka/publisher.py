"""The publisher: follows the store's log and sends every event to a Kafka topic, at least once.

    publisher = KafkaPublisher(store, "127.0.0.1:9092")          # topic flowstore.events
    publisher.run(stop)                                           # a worker: until stop is set
    embedded = start_embedded_publisher(store, "127.0.0.1:9092")  # a background thread
    embedded.stop()

At least once, never a gap: pages of events are read from the tracking position and sent (key =
the event's aggregate id, see `envelope.message_key`) with `acks=all`; a page's position is
recorded once the broker acknowledged all its messages, and so every earlier one. The next page
is sent meanwhile, so the producer's pipeline never runs dry between pages (only the log's last
page is flushed). A round that stalls (a send, an acknowledgement or a flush not done within
`flush_timeout`) first records the longest run of events the broker has acknowledged, so the
position never waits for a stalled send of the next page. A crash anywhere resends from the last
recorded position (at most the two pages in flight): duplicates, no gaps. Messages are written
from the events read as plain data (`FlowStore.read_plain_events`, `envelope.message_bytes`): no
pydantic event is built.

Per-key order: one request in flight per connection and unlimited retries with no delivery timeout,
so the producer retries a partition's batches in order and never drops one while later ones get
through; a page that is resent after a crash follows its first copy. The first time each event
appears in a partition is therefore in version order; consumers drop the replays by (aggregate id,
version), see `FlowEventConsumer`.

Broker down or slow: sends and flushes wait in short rounds (`flush_timeout`) while the producer reconnects
with exponential backoff; between rounds the status reports the lag and the error. The store keeps
accepting commands meanwhile; the publisher catches up when the broker is back. Topics are created
by the publisher (`ensure_topic`), never auto-created by the producer, so a broker that lost its
topics gets them back with the right number of partitions.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from types import TracebackType
from typing import Any, Self

from kafka import KafkaProducer
from kafka.admin import KafkaAdminClient, NewTopic
from kafka.errors import KafkaError, KafkaTimeoutError, TopicAlreadyExistsError

from flowstore import FlowStore
from flowstore.adapters.kafka.envelope import message_bytes, message_key
from flowstore.adapters.kafka.tracking import PublisherLock, PublisherTracking
from flowstore.codec import PlainEvent
from flowstore.errors import KafkaUnavailableError, PublisherLockError

__all__ = [
    "BOOTSTRAP_ENV",
    "DEFAULT_PARTITIONS",
    "DEFAULT_TOPIC",
    "TOPIC_ENV",
    "EmbeddedPublisher",
    "KafkaPublisher",
    "KafkaUnavailableError",
    "PublisherLockError",
    "PublisherStatus",
    "embedded_publisher_from_env",
    "ensure_topic",
    "kafka_publisher",
    "start_embedded_publisher",
]

DEFAULT_TOPIC = "flowstore.events"
DEFAULT_PARTITIONS = 6
BOOTSTRAP_ENV = "FLOWSTORE_KAFKA_BOOTSTRAP"
"""Environment variable naming the brokers (`host:port[,host:port]`) when none is passed."""
TOPIC_ENV = "FLOWSTORE_KAFKA_TOPIC"
"""Environment variable naming the topic when none is passed (default `flowstore.events`)."""

_Page = tuple[Sequence[tuple[int, PlainEvent]], list[tuple[bytes, bytes]]]
"""Events of the log and their messages (key, value)."""
_NO_PAGE: _Page = ([], [])

# A week: in effect "never give up on a batch". Expiring a batch is what could let a later batch
# of the same partition overtake it; the publisher reports a stalled broker instead.
_DELIVERY_TIMEOUT_MS = 7 * 24 * 3600 * 1000
_MAX_BACKOFF = 5.0


@dataclass(frozen=True)
class PublisherStatus:
    """A snapshot of a publisher, for progress lines and monitoring."""

    topic: str
    state: str
    """"starting", "waiting for lock", "publishing", "caught up", "waiting for broker" (down or
    slow: a send or flush round timed out), "failing" (the broker refused a message, or the
    database failed; retried with backoff) or "stopped"."""
    position: int
    """Notification id of the last event recorded in the database as acknowledged by the broker,
    with every earlier one; reported "waiting for broker", it includes every acknowledgement the
    producer had received when that round stalled."""
    log_position: int
    """Notification id of the newest event in the log when last looked at."""
    published: int = 0
    """Messages acknowledged by the broker since this publisher started (resends included)."""
    failures: int = 0
    """Stalled or failed rounds since this publisher started."""
    last_error: str | None = None
    rate: float = 0.0
    """Events per second over the last page."""

    @property
    def lag(self) -> int:
        """Events in the log not yet acknowledged by the broker."""
        return max(0, self.log_position - self.position)


def bootstrap_from_env(bootstrap: str | None) -> str:
    """The brokers to use: the ones given, else `$FLOWSTORE_KAFKA_BOOTSTRAP`."""
    value = bootstrap or os.environ.get(BOOTSTRAP_ENV)
    if not value:
        raise KafkaUnavailableError(f"no Kafka brokers given (pass them or set ${BOOTSTRAP_ENV})")
    return value


def topic_from_env(topic: str | None) -> str:
    """The topic to use: the one given, else `$FLOWSTORE_KAFKA_TOPIC`, else `flowstore.events`."""
    return topic or os.environ.get(TOPIC_ENV) or DEFAULT_TOPIC


def ensure_topic(
    bootstrap: str,
    topic: str,
    *,
    partitions: int = DEFAULT_PARTITIONS,
    replication_factor: int = 1,
    timeout: float = 5.0,
) -> bool:
    """Create `topic` if it does not exist; True if this call created it."""
    try:
        admin = KafkaAdminClient(
            bootstrap_servers=bootstrap, request_timeout_ms=int(timeout * 1000)
        )
    except KafkaError as exc:
        raise KafkaUnavailableError(f"cannot reach Kafka at {bootstrap}: {exc!r}") from None
    try:
        admin.create_topics([NewTopic(topic, partitions, replication_factor)])
    except TopicAlreadyExistsError:
        return False
    except KafkaError as exc:
        raise KafkaUnavailableError(f"cannot create topic {topic!r}: {exc!r}") from None
    finally:
        admin.close()
    return True


def producer_settings(bootstrap: str, **overrides: Any) -> dict[str, Any]:
    """The kafka-python producer settings the publisher uses (ordering and durability first)."""
    return {
        "bootstrap_servers": bootstrap,
        "acks": "all",
        # One request in flight: a retried batch cannot land after a later one of its partition.
        "max_in_flight_requests_per_connection": 1,
        "delivery_timeout_ms": _DELIVERY_TIMEOUT_MS,
        "allow_auto_create_topics": False,
        "linger_ms": 5,
        "batch_size": 256 * 1024,
        "reconnect_backoff_max_ms": 1000,
        "max_block_ms": 1000,
        **overrides,
    }


class _StopRequestedError(Exception):
    """Raised inside a page when the publisher was asked to stop while the broker stalled."""


class _RefusedError(Exception):
    """Raised when the broker refused a message for good: publishing starts over."""


@dataclass(frozen=True, eq=False)  # eq=False: one page is one object (`list.remove` by identity)
class _Sent:
    """A page handed to the producer: its events, their messages' futures (one per message handed
    over so far, in order), when it was read."""

    events: Sequence[tuple[int, Any]]
    futures: list[Any]
    began: float

    @property
    def position(self) -> int:
        """The notification id of its last event."""
        return int(self.events[-1][0])


def acknowledged_run(pages: Sequence[_Sent]) -> int:
    """The notification id of the last event of the longest run from the first page's first event
    on whose messages are all acknowledged, 0 if its first one is not; a refused message or one not
    yet handed to the producer ends the run."""
    position = 0
    for page in pages:
        for index, (number, _) in enumerate(page.events):
            if index == len(page.futures):  # not handed to the producer yet
                return position
            future = page.futures[index]
            if not future.is_done or future.failed():
                return position
            position = number
    return position


class KafkaPublisher:
    """Publishes a store's log to a topic, resuming from its position in the store's database.

    `run(stop)` waits for the topic's publisher lock, then follows the log until `stop` is set.
    `on_status` is called with a `PublisherStatus` after every page and every stalled round.
    """

    def __init__(
        self,
        store: FlowStore,
        bootstrap: str | None = None,
        topic: str | None = None,
        *,
        partitions: int = DEFAULT_PARTITIONS,
        replication_factor: int = 1,
        batch: int = 500,
        poll_interval: float = 0.2,
        flush_timeout: float = 1.0,
        producer_config: dict[str, Any] | None = None,
        on_status: Callable[[PublisherStatus], None] | None = None,
    ) -> None:
        self.store = store
        self.bootstrap = bootstrap_from_env(bootstrap)
        self.topic = topic_from_env(topic)
        self.partitions = partitions
        self.replication_factor = replication_factor
        self.batch = batch
        self.poll_interval = poll_interval
        self.flush_timeout = flush_timeout
        self._producer_config = producer_settings(
            self.bootstrap,
            max_block_ms=int(flush_timeout * 1000),
            **(producer_config or {}),
        )
        self._on_status = on_status
        self.tracking = PublisherTracking(store.config, store.engine)
        self.lock = PublisherLock(store.config, self.topic, store_key=str(id(store)))
        self._producer: KafkaProducer | None = None
        # Pages handed to the producer and not recorded yet, oldest first (at most two): what a
        # stalled round records as far as the broker acknowledged it.
        self._unrecorded: list[_Sent] = []
        self._topic_checked_at: float | None = None
        self._backoff = 0.1
        self._status = PublisherStatus(self.topic, "starting", 0, 0)
        self._status_lock = threading.Lock()

    # Lifecycle

    def run(self, stop: threading.Event, *, drain_timeout: float = 0.0) -> None:
        """Wait for the lock, then publish until `stop` is set; release the lock at the end.

        With `drain_timeout`, a stop first publishes what the log holds at that moment, for at most
        that many seconds (the embedded publisher does this on `close()`).
        """
        try:
            while not stop.is_set():
                self._set(state="waiting for lock")
                if not self.lock.acquire(stop):
                    return
                self._set(
                    state="publishing",
                    position=self.tracking.position(self.topic),
                    log_position=self.store.log_position(),
                )
                try:
                    self._follow(stop)
                except PublisherLockError:
                    # Another publisher may be sending already: wait for the lock again.
                    self.close_producer()
                    self.lock.release()
            if drain_timeout > 0 and self.lock.held:
                deadline = threading.Event()
                timer = threading.Timer(drain_timeout, deadline.set)
                timer.start()
                try:
                    self.publish_pending(deadline)
                finally:
                    timer.cancel()
        finally:
            self.close_producer(timeout=self.flush_timeout)
            self.lock.release()
            self._set(state="stopped")

    def _follow(self, stop: threading.Event) -> None:
        notifier = self.store.log_notifier
        while not stop.is_set():
            generation = notifier.generation  # before reading: no append goes unnoticed
            try:
                published = self.publish_pending(stop)
            except PublisherLockError:
                raise
            except Exception as exc:  # the database went away, say: report, back off, go on
                self._set(
                    state="failing", failures=self.status().failures + 1, last_error=repr(exc)
                )
                try:
                    self._sleep(stop)
                except _StopRequestedError:
                    return
                continue
            if not published and not stop.is_set():
                if notifier.pushes:  # PostgreSQL: wake on the next append (poll as a fallback)
                    notifier.wait(generation, self.poll_interval)
                else:
                    stop.wait(self.poll_interval)  # SQLite cannot notify: poll the log's end

    def close(self) -> None:
        """Release the producer, the lock and the tracking connections."""
        self.close_producer(timeout=self.flush_timeout)
        self.lock.release()
        self.tracking.close()

    def close_producer(self, timeout: float = 0.0) -> None:
        """Close the producer; batches still unsent after `timeout` are dropped (resent later)."""
        producer, self._producer = self._producer, None
        if producer is not None:
            with contextlib.suppress(Exception):
                producer.close(timeout=timeout)

    def status(self) -> PublisherStatus:
        """The latest status snapshot."""
        with self._status_lock:
            return self._status

    def _set(self, **changes: Any) -> None:
        with self._status_lock:
            self._status = replace(self._status, **changes)
            status = self._status
        if self._on_status is not None:
            self._on_status(status)

    # Publishing

    def publish_pending(self, stop: threading.Event | None = None) -> int:
        """Publish every event after the recorded position up to the log's end; return how many.

        Needs the lock: `run` takes it; call `lock.acquire()` first when calling this directly.
        """
        if not self.lock.check():
            raise PublisherLockError(f"the publisher lock for {self.topic!r} is not held")
        stop = stop or threading.Event()
        if self._topic_checked_at is None:
            self._ensure_topic()
        position = self.tracking.position(self.topic)
        try:
            return self._publish_from(position, stop)
        finally:
            self._unrecorded.clear()  # what was not recorded is read and sent again next time

    def _publish_from(self, position: int, stop: threading.Event) -> int:
        """Publish from `position` on: each page is sent while the broker still acknowledges the
        one before, whose position is recorded once all its messages (and so all earlier ones)
        are acknowledged; the producer's pipeline never runs dry between pages."""
        total = 0
        sent: _Sent | None = None  # the page whose acknowledgements are awaited
        page = self._page(position + 1)
        while True:
            events, messages = page
            if events and not self.lock.check():  # lost while reading (a partition): send nothing
                raise PublisherLockError(f"the publisher lock for {self.topic!r} is not held")
            try:
                futures: list[Any] = []
                if events:
                    # Visible to a stalled round before the sends: one that stalls in the middle
                    # of this page records the page before it (and this page's acknowledged part).
                    self._unrecorded.append(_Sent(events, futures, time.perf_counter()))
                    self._send(messages, futures, stop)
                # The next page is read while the broker acknowledges this one (and the one
                # before): it changes nothing until the pages before it are recorded.
                upcoming = self._page(events[-1][0] + 1) if len(events) == self.batch else _NO_PAGE
                if sent is not None:
                    total += self._record(sent, stop)
                    position = sent.position
                sent = self._unrecorded[-1] if events else None
                if sent is not None and not upcoming[0]:  # the log's end: this page too, now
                    self._flush(stop)
                    total += self._record(sent, stop)
                    position, sent = sent.position, None
            except _StopRequestedError:  # stopped while the broker stalled: pages not recorded
                return total
            except _RefusedError:
                # The broker refused a message for good (too large, not authorised...). Start
                # over from the last recorded position with a fresh producer: duplicates, never
                # a gap.
                self.close_producer()
                self._unrecorded.clear()
                try:
                    self._sleep(stop)
                except _StopRequestedError:
                    return total
                # A stalled round may have recorded more than this loop knows of.
                position = max(position, self.status().position)
                sent, page = None, self._page(position + 1)
                continue
            if sent is None:
                self._set(
                    state="caught up", position=position, log_position=self.store.log_position()
                )
                return total
            page = upcoming

    def _record(self, sent: _Sent, stop: threading.Event) -> int:
        """Wait until the broker acknowledged every message of `sent`, then record its position;
        return how many events it held."""
        self._acknowledged(sent.futures, stop)
        if not self.lock.check():  # someone else may publish now: do not record
            raise PublisherLockError(f"the publisher lock for {self.topic!r} is not held")
        self.tracking.advance(self.topic, sent.position)
        self._unrecorded.remove(sent)
        self._backoff = 0.1
        elapsed = time.perf_counter() - sent.began
        head = self.store.log_position()
        self._set(
            state="caught up" if head <= sent.position else "publishing",
            position=sent.position,
            log_position=head,
            published=self.status().published + len(sent.events),
            rate=len(sent.events) / elapsed if elapsed > 0 else 0.0,
        )
        return len(sent.events)

    def _page(self, start: int) -> _Page:
        """Up to `batch` events of the log from `start` on, and their messages (key, value).

        The events are read as plain data and their messages written from their fields
        (`message_bytes`): no pydantic event is built.
        """
        events = self.store.read_plain_events(start, self.batch)
        return events, [(message_key(event), message_bytes(n, event)) for n, event in events]

    def _send(
        self, messages: Sequence[tuple[bytes, bytes]], futures: list[Any], stop: threading.Event
    ) -> None:
        """Hand every message to the producer (which sends them in the background), appending
        their futures to `futures` as it goes."""
        producer = self._ensure_producer(stop)
        sent = 0
        while sent < len(messages):
            key, value = messages[sent]
            try:
                futures.append(producer.send(self.topic, key=key, value=value))
            except KafkaTimeoutError as exc:  # no metadata yet, or the buffer is full
                # What was appended stays queued in the producer and is retried by it; the
                # next round continues with the message that could not be appended.
                self._stalled(exc, stop)
                continue
            sent += 1

    def _flush(self, stop: threading.Event) -> None:
        """Send what the producer holds now rather than after its linger."""
        producer = self._ensure_producer(stop)
        while True:
            try:
                producer.flush(timeout=self.flush_timeout)
                return
            except KafkaTimeoutError as exc:
                self._stalled(exc, stop)

    def _acknowledged(self, futures: Sequence[Any], stop: threading.Event) -> None:
        """Wait until the broker answered every message; `_RefusedError` if it refused one."""
        for future in futures:
            while not future.is_done:
                try:
                    future.get(timeout=self.flush_timeout)
                except KafkaTimeoutError as exc:
                    if not future.is_done:  # no answer yet: the broker is down or slow
                        self._stalled(exc, stop)
                except Exception:
                    break  # answered: a refusal, seen below
            if future.failed():
                self._set(
                    state="failing",
                    failures=self.status().failures + 1,
                    last_error=repr(future.exception),
                )
                raise _RefusedError

    def _ensure_producer(self, stop: threading.Event) -> KafkaProducer:
        while self._producer is None:
            try:
                self._producer = KafkaProducer(**self._producer_config)
            except KafkaError as exc:  # NoBrokersAvailable: the broker is down at start-up
                self._stalled(exc, stop, sleep=True)
        return self._producer

    def _stalled(self, exc: Exception, stop: threading.Event, *, sleep: bool = False) -> None:
        # Before reporting the stall, and before `_ensure_topic` (which may wait for the broker
        # too): a page the broker acknowledged is not left unrecorded behind a stalled send.
        position = self._record_acknowledged()
        status = self.status()
        self._set(
            state="waiting for broker",
            position=max(position, status.position),
            failures=status.failures + 1,
            last_error=repr(exc),
            log_position=self.store.log_position(),
        )
        if stop.is_set():
            raise _StopRequestedError
        self._ensure_topic()
        if sleep:
            self._sleep(stop)

    def _record_acknowledged(self) -> int:
        """Record the last event of the longest run of unrecorded events whose messages the
        broker has all acknowledged (so far); return it (0 if there is none)."""
        position = acknowledged_run(self._unrecorded)
        if position and self.lock.check():  # not held: someone else may publish, record nothing
            self.tracking.advance(self.topic, position)
            return position
        return 0

    def _sleep(self, stop: threading.Event) -> None:
        if stop.wait(self._backoff):
            raise _StopRequestedError
        self._backoff = min(self._backoff * 2, _MAX_BACKOFF)

    def _ensure_topic(self) -> None:
        # Before the first page, and now and then while the broker stalls: a restarted broker may
        # have lost the topic, and the producer never auto-creates it.
        now = time.monotonic()
        if self._topic_checked_at is not None and now - self._topic_checked_at < 2:
            return
        self._topic_checked_at = now
        with contextlib.suppress(KafkaUnavailableError):
            ensure_topic(
                self.bootstrap,
                self.topic,
                partitions=self.partitions,
                replication_factor=self.replication_factor,
                timeout=self.flush_timeout,
            )


class EmbeddedPublisher:
    """A `KafkaPublisher` running in a daemon thread of the application's process."""

    def __init__(self, publisher: KafkaPublisher, *, drain_timeout: float = 5.0) -> None:
        self.publisher = publisher
        self.drain_timeout = drain_timeout
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(
            target=self._run, name=f"flowstore-kafka-{publisher.topic}", daemon=True
        )

    def _run(self) -> None:
        try:
            self.publisher.run(self._stop, drain_timeout=self.drain_timeout)
        except BaseException as exc:  # kept for stop() to re-raise in the owner's thread
            self._error = exc

    def start(self) -> Self:
        """Start the thread."""
        self._thread.start()
        return self

    def status(self) -> PublisherStatus:
        """The publisher's latest status (lag, state, last error)."""
        return self.publisher.status()

    @property
    def alive(self) -> bool:
        """Whether the thread is running."""
        return self._thread.is_alive()

    def stop(self, timeout: float | None = None) -> None:
        """Publish what the log holds now (up to `drain_timeout`), then stop and release all."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout if timeout is not None else self.drain_timeout + 30)
        self.publisher.close()
        if self._error is not None:
            raise self._error

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def embedded_publisher_from_env(store: FlowStore, **options: Any) -> EmbeddedPublisher | None:
    """Start an embedded publisher if `$FLOWSTORE_KAFKA_BOOTSTRAP` is set (else None).

    For long-running entry points (an HTTP server, an application's start-up): one line to honour
    the environment. The topic comes from `$FLOWSTORE_KAFKA_TOPIC` (default `flowstore.events`).
    """
    if not os.environ.get(BOOTSTRAP_ENV):
        return None
    return start_embedded_publisher(store, **options)


def kafka_publisher(
    bootstrap: str | None = None,
    topic: str | None = None,
    *,
    drain_timeout: float = 5.0,
    **options: Any,
) -> Callable[[FlowStore], EmbeddedPublisher]:
    """A publisher factory for `FlowStore(publisher=...)` (and the `flowstore.publishers` entry point
    `kafka`, which `FlowStore(kafka=...)` uses): arguments as for `start_embedded_publisher`."""

    def start(store: FlowStore) -> EmbeddedPublisher:
        return start_embedded_publisher(
            store, bootstrap, topic, drain_timeout=drain_timeout, **options
        )

    return start


def start_embedded_publisher(
    store: FlowStore,
    bootstrap: str | None = None,
    topic: str | None = None,
    *,
    drain_timeout: float = 5.0,
    **options: Any,
) -> EmbeddedPublisher:
    """Start publishing `store`'s log in a background thread; `stop()` it before closing the store.

    `bootstrap` defaults to `$FLOWSTORE_KAFKA_BOOTSTRAP`, `topic` to `$FLOWSTORE_KAFKA_TOPIC` or
    `flowstore.events`; `options` go to `KafkaPublisher`.
    """
    publisher = KafkaPublisher(store, bootstrap, topic, **options)
    return EmbeddedPublisher(publisher, drain_timeout=drain_timeout).start()
