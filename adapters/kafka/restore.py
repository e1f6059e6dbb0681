"""Rebuilding an empty store from a topic: `restore_from_kafka`.

Every message is read (by partition assignment), replays are dropped by (aggregate id, version),
each aggregate's versions are checked to run 1..n without a hole, and the events are appended with
`FlowStore.import_events` in the source log's order (the envelopes' notification ids), so the
projections (state, history, statistics, funnel) come out exactly as in the source store.

The envelopes are held in memory until the check has passed: a topic with a hole restores nothing.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from uuid import UUID

from flowstore import FlowStore, InvalidArgumentError
from flowstore.adapters.kafka.consumer import read_topic
from flowstore.adapters.kafka.envelope import FlowEventEnvelope
from flowstore.adapters.kafka.publisher import bootstrap_from_env, topic_from_env
from flowstore.domain import DomainEvent
from flowstore.errors import TopicIncompleteError

__all__ = ["RestoreReport", "TopicIncompleteError", "restore_from_kafka"]

_SHOWN = 20


@dataclass(frozen=True)
class RestoreReport:
    """What a restore read and wrote."""

    topic: str
    messages: int
    """Messages read from the topic."""
    events: int
    """Events appended to the store."""
    duplicates: int
    """Messages dropped as replays of an event already read."""
    aggregates: int
    seconds: float


def restore_from_kafka(
    store: FlowStore,
    bootstrap: str | None = None,
    topic: str | None = None,
    *,
    batch: int = 500,
    progress: Callable[[str, int], None] | None = None,
) -> RestoreReport:
    """Fill the empty `store` with every event on `topic`; its projections follow.

    Raises `InvalidArgumentError` if the store already has events and `TopicIncompleteError`
    (naming the holes) if an aggregate's versions do not run from 1 without a gap.
    `progress(phase, count)` is called while reading ("read") and writing ("write").
    """
    began = time.perf_counter()
    servers, name = bootstrap_from_env(bootstrap), topic_from_env(topic)
    if store.log_position() != 0:
        raise InvalidArgumentError(
            "store", store.config.display, "already has events; restore needs an empty store"
        )
    by_aggregate: dict[UUID, dict[int, FlowEventEnvelope]] = {}
    messages = duplicates = 0
    for message in read_topic(servers, name):
        envelope = message.envelope()
        messages += 1
        versions = by_aggregate.setdefault(envelope.aggregate_id, {})
        if envelope.aggregate_version in versions:
            duplicates += 1
        else:
            versions[envelope.aggregate_version] = envelope
        if progress and messages % 1000 == 0:
            progress("read", messages)
    holes = [
        f"{aggregate} lacks version(s) {_missing(set(versions))}"
        for aggregate, versions in by_aggregate.items()
        if set(versions) != set(range(1, max(versions) + 1))
    ]
    if holes:
        more = f"; and {len(holes) - _SHOWN} more" if len(holes) > _SHOWN else ""
        shown = "; ".join(holes[:_SHOWN]) + more
        raise TopicIncompleteError(
            f"topic {name!r} cannot be restored: {len(holes)} aggregate(s) have holes: {shown}",
            topic=name,
            holes=holes,
        )
    ordered = sorted(
        (e for versions in by_aggregate.values() for e in versions.values()),
        key=lambda e: e.notification_id,
    )
    written = 0

    def events() -> Iterator[DomainEvent]:
        nonlocal written
        for envelope in ordered:
            yield envelope.to_event()
            written += 1
            if progress and written % 1000 == 0:
                progress("write", written)

    appended = store.import_events(events(), batch=batch)
    return RestoreReport(
        topic=name,
        messages=messages,
        events=appended,
        duplicates=duplicates,
        aggregates=len(by_aggregate),
        seconds=time.perf_counter() - began,
    )


def _missing(versions: set[int]) -> str:
    gaps = sorted(set(range(1, max(versions) + 1)) - versions)
    text = ", ".join(map(str, gaps[:10]))
    return text + (", ..." if len(gaps) > 10 else "")
