"""Comparing a topic with the log: `audit_topic` finds missing, duplicated, out-of-order events.

For every aggregate (a user's flow instance, a flow definition, the catalog) the topic's messages
are taken in partition order and checked against the log:

- missing: a version the log has (up to the publisher's recorded position) and the topic lacks;
- out of order: a version whose first copy comes after the first copy of a later version;
- changed: a version whose message differs from the event in the log (except events of erased
  users: their copies on the topic predate the erasure, the log's now read anonymised);
- extra: a version the log does not have (a topic of another store?);
- split: the aggregate's messages sit on more than one partition (their order is not defined);
- duplicated: a version sent more than once. At least once delivery allows this (consumers drop
  replays), so duplicates are reported but are not a gap.

Only what the publisher has recorded as acknowledged must be on the topic: events after its position
are reported as unpublished (lag), not missing. Pass `up_to` to choose another limit; a topic with
no publisher position (a copy) is compared with the whole log.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field
from uuid import UUID

from flowstore import FlowStore
from flowstore.adapters.kafka.consumer import read_topic
from flowstore.adapters.kafka.envelope import EnvelopeError, FlowEventEnvelope
from flowstore.adapters.kafka.publisher import bootstrap_from_env, topic_from_env
from flowstore.adapters.kafka.tracking import PublisherTracking
from flowstore.keys import ERASED_USER_PREFIX

__all__ = ["PROBLEMS", "AuditFinding", "AuditReport", "audit_topic"]

PROBLEMS = ("missing", "out of order", "changed", "extra", "split", "duplicated")
"""Every problem an audit reports; all but "duplicated" are gaps."""

_PAGE = 1000


@dataclass(frozen=True)
class AuditFinding:
    """One problem with one aggregate's events on the topic."""

    aggregate_id: UUID
    user_id: str | None
    flow_id: str | None
    problem: str
    """One of `PROBLEMS`."""
    versions: tuple[int, ...]
    """The versions concerned (for "duplicated", each extra copy once)."""

    @property
    def is_gap(self) -> bool:
        """Whether a consumer would miss or misorder events because of it."""
        return self.problem != "duplicated"

    def describe(self) -> str:
        """One readable line."""
        who = (
            f"user={self.user_id!r} flow={self.flow_id!r}"
            if self.user_id
            else (f"flow={self.flow_id!r}" if self.flow_id else "catalog")
        )
        shown = ", ".join(map(str, self.versions[:20])) + (
            ", ..." if len(self.versions) > 20 else ""
        )
        return f"{self.aggregate_id} ({who}): {self.problem}: version(s) {shown}"


@dataclass(frozen=True)
class AuditReport:
    """What an audit compared and found."""

    topic: str
    messages: int
    """Messages on the topic."""
    checked: int
    """Events of the log that must be on the topic (notification ids up to `up_to`)."""
    up_to: int
    unpublished: int
    """Events of the log after `up_to` (the publisher's lag)."""
    findings: list[AuditFinding] = field(default_factory=list)
    unreadable: list[tuple[int, int]] = field(default_factory=list)
    """(partition, offset) of messages that are not envelopes."""

    @property
    def duplicates(self) -> int:
        """Extra copies on the topic."""
        return sum(len(f.versions) for f in self.findings if f.problem == "duplicated")

    @property
    def ok(self) -> bool:
        """No gap: every event up to `up_to` is on the topic once or more, in order, unchanged."""
        return not self.unreadable and not any(f.is_gap for f in self.findings)

    def count(self, problem: str) -> int:
        """How many aggregates have `problem`."""
        return sum(1 for f in self.findings if f.problem == problem)


def _digest(envelope: FlowEventEnvelope) -> bytes:
    return hashlib.blake2b(envelope.to_bytes(), digest_size=16).digest()


@dataclass
class _Seen:
    user_id: str | None
    flow_id: str | None
    first: list[int] = field(default_factory=list)
    copies: Counter[int] = field(default_factory=Counter)
    digests: dict[int, bytes] = field(default_factory=dict)
    partitions: set[int] = field(default_factory=set)


def audit_topic(
    store: FlowStore,
    bootstrap: str | None = None,
    topic: str | None = None,
    *,
    up_to: int | None = None,
) -> AuditReport:
    """Compare `topic` with `store`'s log (see the module docstring for what is reported)."""
    servers, name = bootstrap_from_env(bootstrap), topic_from_env(topic)
    if up_to is None:
        tracking = PublisherTracking(store.config, store.engine)
        try:
            up_to = tracking.position(name) if tracking.known(name) else store.log_position()
        finally:
            tracking.close()
    seen: dict[UUID, _Seen] = {}
    unreadable: list[tuple[int, int]] = []
    messages = 0
    for message in read_topic(servers, name):
        messages += 1
        try:
            envelope = message.envelope()
        except EnvelopeError:
            unreadable.append((message.partition, message.offset))
            continue
        entry = seen.setdefault(envelope.aggregate_id, _Seen(envelope.user_id, envelope.flow_id))
        version = envelope.aggregate_version
        entry.partitions.add(message.partition)
        if version not in entry.copies:
            entry.first.append(version)
            entry.digests[version] = _digest(envelope)
        entry.copies[version] += 1

    # Per aggregate and version: the event's digest, and whether it must be on the topic by now.
    expected: dict[UUID, dict[int, tuple[bytes | None, bool]]] = {}
    owners: dict[UUID, tuple[str | None, str | None]] = {}
    checked = unpublished = 0
    start = 1
    while page := store.read_events(start, _PAGE):
        for notification_id, event in page:
            envelope = FlowEventEnvelope.of(notification_id, event)
            erased = (envelope.user_id or "").startswith(ERASED_USER_PREFIX)
            expected.setdefault(event.originator_id, {})[event.originator_version] = (
                None if erased else _digest(envelope),
                notification_id <= up_to,
            )
            owners.setdefault(event.originator_id, (envelope.user_id, envelope.flow_id))
            if notification_id <= up_to:
                checked += 1
            else:
                unpublished += 1
        start = page[-1][0] + 1

    findings = [
        finding
        for aggregate in sorted(set(seen) | set(expected), key=str)
        for finding in _compare(
            aggregate, seen.get(aggregate), expected.get(aggregate, {}), owners.get(aggregate)
        )
    ]
    return AuditReport(
        topic=name,
        messages=messages,
        checked=checked,
        up_to=up_to,
        unpublished=unpublished,
        findings=findings,
        unreadable=unreadable,
    )


def _compare(
    aggregate: UUID,
    topic: _Seen | None,
    log: dict[int, tuple[bytes | None, bool]],
    owner: tuple[str | None, str | None] | None,
) -> list[AuditFinding]:
    """The findings for one aggregate: its copies on the topic against its events in the log."""
    user_id, flow_id = (topic.user_id, topic.flow_id) if topic else owner or (None, None)
    on_topic = topic.copies if topic else Counter[int]()
    found: dict[str, list[int]] = {
        "missing": [v for v, (_, due) in log.items() if due and v not in on_topic]
    }
    if topic is not None:
        found["out of order"] = _late(topic.first)
        found["changed"] = [
            v for v, d in topic.digests.items() if v in log and log[v][0] not in (d, None)
        ]
        found["extra"] = [v for v in topic.first if v not in log]
        found["split"] = list(topic.first) if len(topic.partitions) > 1 else []
        found["duplicated"] = [v for v, n in on_topic.items() for _ in range(n - 1)]
    return [
        AuditFinding(aggregate, user_id, flow_id, problem, tuple(sorted(versions)))
        for problem, versions in found.items()
        if versions
    ]


def _late(first: list[int]) -> list[int]:
    """Versions whose first copy came after the first copy of a higher version."""
    late, highest = [], 0
    for version in first:
        if version < highest:
            late.append(version)
        highest = max(highest, version)
    return sorted(late)
