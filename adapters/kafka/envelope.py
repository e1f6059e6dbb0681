"""The message every flowstore event travels in on Kafka: a versioned JSON envelope (orjson).

One message per event. The key is the id of the aggregate the event belongs to (`message_key`):
a user's flow instance for instance events, the flow definition or the catalog otherwise, so each
aggregate's events stay in order on one partition. The value is a `FlowEventEnvelope`, camelCase on
the wire like the rest of flowstore's JSON; `data` holds the event's own fields, so that
`envelope.to_event()` rebuilds exactly the event in the log (same ids, versions and timestamp).

    envelope = FlowEventEnvelope.parse(message.value)   # one call for consumers

The JSON Schema is `envelope.schema.json` beside this module (`python -m flowstore.adapters.kafka` writes it
again from the model; a test checks they agree).
"""

from __future__ import annotations

import json
from datetime import datetime
from hashlib import sha1
from pathlib import Path
from typing import Any, Literal, cast
from uuid import UUID, uuid5

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.alias_generators import to_camel

from flowstore import domain
from flowstore.codec import PlainEvent
from flowstore.domain import DomainEvent, InstanceEvent, id_text
from flowstore.errors import EnvelopeError

__all__ = [
    "EVENT_TYPES",
    "SCHEMA_PATH",
    "SCHEMA_VERSION",
    "EnvelopeError",
    "FlowEventEnvelope",
    "envelope_schema",
    "message_bytes",
    "message_key",
    "schema_text",
]

SCHEMA_VERSION: Literal[1] = 1
"""Bumped on an incompatible change of the envelope; added fields do not bump it."""

SCHEMA_PATH = Path(__file__).with_name("envelope.schema.json")

# Event ids are derived, not random: a message published twice carries the same event id.
_EVENT_ID_NAMESPACE = UUID("0b6d7f52-61a4-5d1e-8c6b-2f4e9a7c3d10")


def _event_classes() -> dict[str, type[DomainEvent]]:
    # Built from the domain module itself, so a new event class is published and restored
    # without touching this adapter. The two base classes are never appended on their own.
    found: dict[str, type[DomainEvent]] = {}
    for name in domain.__all__:
        value = getattr(domain, name)
        if (
            isinstance(value, type)
            and issubclass(value, DomainEvent)
            and value not in (DomainEvent, InstanceEvent)
        ):
            found[value.__name__] = value
    return found


EVENT_TYPES: dict[str, type[DomainEvent]] = _event_classes()
"""Event type name (the envelope's `eventType`) -> the `flowstore.domain` event class."""

# Fields that live at the envelope's top level rather than in `data`.
_LIFTED = ("user_id", "flow_id", "definition_version")
_COMMON = {"originator_id", "originator_version", "timestamp"}


def message_bytes(notification_id: int, event: DomainEvent | PlainEvent) -> bytes:
    """The message value of an event: `FlowEventEnvelope.of(...).to_bytes()`, byte for byte.

    The event may come as plain data (`FlowStore.read_plain_events`: its class name and fields),
    as the publisher reads it. Instance events (nearly the whole log) skip the envelope model:
    their fields are plain JSON values and datetimes, which orjson writes as pydantic's JSON mode
    does (UTC as "Z"), so the envelope is written straight from the event's fields, five times
    faster. Other events (a definition holds a nested model) go through the model.
    """
    if type(event) is tuple:
        kind, fields = event
        cls = EVENT_TYPES.get(kind)
        if cls is None:
            raise EnvelopeError(f"unknown event type {kind!r}", event_type=kind)
    else:
        domain_event = cast(DomainEvent, event)
        cls, kind, fields = type(domain_event), type(domain_event).__name__, domain_event.__dict__
    data = _DATA_FIELDS.get(cls)
    if data is None:
        if type(event) is tuple:  # fields of a validated event: the model need not check them
            event = cls.model_construct(**fields)
        return FlowEventEnvelope.of(notification_id, cast(DomainEvent, event)).to_bytes()
    oid, version = fields["originator_id"], fields["originator_version"]
    return orjson.dumps(
        {
            "schemaVersion": SCHEMA_VERSION,
            "eventId": _event_id(f"{id_text(oid)}:{version}"),
            "eventType": kind,
            "aggregateId": oid,
            "aggregateVersion": version,
            "instanceId": oid,
            "instanceVersion": version,
            "userId": fields["user_id"],
            "flowId": fields["flow_id"],
            "definitionVersion": fields["definition_version"],
            "notificationId": notification_id,
            "timestamp": fields["timestamp"],
            "data": {camel: fields[name] for name, camel in data},
        },
        option=orjson.OPT_UTC_Z,
    )


_DATA_FIELDS: dict[type[DomainEvent], list[tuple[str, str]]] = {
    cls: [(name, to_camel(name)) for name in cls.model_fields if name not in {*_COMMON, *_LIFTED}]
    for cls in EVENT_TYPES.values()
    if issubclass(cls, InstanceEvent)
}
"""Each instance event class's own fields (what `data` holds), in the model's order."""


def message_key(event: DomainEvent | PlainEvent) -> bytes:
    """The Kafka key of an event: its aggregate's id (the instance id for instance events)."""
    if type(event) is tuple:
        return id_text(event[1]["originator_id"]).encode()
    return id_text(cast(DomainEvent, event).originator_id).encode()


def _event_id(name: str) -> str:
    """`str(uuid5(namespace, name))` of the envelopes' namespace, without building the `UUID`
    (its constructor is most of `uuid5`'s 4 µs; a publisher writes one per message)."""
    # Version 5 ids are SHA-1 by definition (RFC 4122): a name's digest, not a secret's.
    digest = bytearray(sha1(_NAMESPACE_BYTES + name.encode(), usedforsecurity=False).digest()[:16])
    digest[6] = (digest[6] & 0x0F) | 0x50  # version 5
    digest[8] = (digest[8] & 0x3F) | 0x80  # the RFC 4122 variant
    h = digest.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


_NAMESPACE_BYTES = _EVENT_ID_NAMESPACE.bytes


class FlowEventEnvelope(BaseModel):
    """One flowstore event as published on Kafka (schema version 1).

    `aggregateId`/`aggregateVersion` order and deduplicate every event; for instance events they
    equal `instanceId`/`instanceVersion` and `userId` is set. Definition and catalog events have no
    user or instance (null); their aggregate is the flow definition or the catalog.
    """

    model_config = ConfigDict(frozen=True, alias_generator=to_camel, populate_by_name=True)

    schema_version: Literal[1] = Field(
        SCHEMA_VERSION, description="Version of this envelope; bumped only on incompatible change"
    )
    event_id: UUID = Field(description="Stable id of the event: the same on every redelivery")
    event_type: str = Field(description="Class of the event, e.g. TransitionExecuted")
    aggregate_id: UUID = Field(description="Aggregate the event belongs to (the Kafka key)")
    aggregate_version: int = Field(description="Position of the event in its aggregate, from 1")
    instance_id: UUID | None = Field(description="The user's flow instance (instance events)")
    instance_version: int | None = Field(description="The instance's version after the event")
    user_id: str | None = Field(description="The user (instance events)")
    flow_id: str | None = Field(description="The flow the event is about")
    definition_version: int | None = Field(
        description="Version of the flow definition the instance runs on (or that was defined)"
    )
    notification_id: int = Field(description="Position in the source store's log (total order)")
    timestamp: datetime = Field(description="When it happened (UTC)")
    data: dict[str, Any] = Field(description="The event's own fields, camelCase keys")

    @classmethod
    def parse(cls, value: bytes | str) -> FlowEventEnvelope:
        """Parse a message value; raise `EnvelopeError` if it is not an envelope."""
        try:
            return cls.model_validate(orjson.loads(value))
        except (orjson.JSONDecodeError, ValidationError) as exc:
            raise EnvelopeError(f"not a flowstore event envelope: {exc}") from None

    @classmethod
    def of(cls, notification_id: int, event: DomainEvent) -> FlowEventEnvelope:
        """The envelope of an event read from the log at `notification_id`."""
        state = event.model_dump(mode="json", by_alias=True, exclude=_COMMON)
        lifted = {name: state.pop(name, None) for name in _LIFTED}
        if isinstance(event, domain.FlowDefined):
            lifted["definition_version"] = event.version
        is_instance = isinstance(event, InstanceEvent)
        return cls(
            event_id=uuid5(
                _EVENT_ID_NAMESPACE, f"{event.originator_id}:{event.originator_version}"
            ),
            event_type=type(event).__name__,
            aggregate_id=event.originator_id,
            aggregate_version=event.originator_version,
            instance_id=event.originator_id if is_instance else None,
            instance_version=event.originator_version if is_instance else None,
            notification_id=notification_id,
            timestamp=event.timestamp,
            data={to_camel(key): value for key, value in state.items()},
            **lifted,
        )

    def to_bytes(self) -> bytes:
        """The message value: camelCase JSON (orjson)."""
        return orjson.dumps(self.model_dump(mode="json", by_alias=True))

    def to_event(self) -> DomainEvent:
        """The exact `flowstore.domain` event this envelope carries (for `FlowStore.import_events`)."""
        cls = EVENT_TYPES.get(self.event_type)
        if cls is None:
            raise EnvelopeError(
                f"unknown event type {self.event_type!r}; known: {sorted(EVENT_TYPES)}",
                event_type=self.event_type,
            )
        names = {to_camel(name): name for name in cls.model_fields}
        state: dict[str, Any] = {names.get(key, key): value for key, value in self.data.items()}
        for name in _LIFTED:
            if name in cls.model_fields:
                state[name] = getattr(self, name)
        state |= {
            "originator_id": self.aggregate_id,
            "originator_version": self.aggregate_version,
            "timestamp": self.timestamp,
        }
        try:
            return cls.model_validate(state)
        except ValidationError as exc:
            raise EnvelopeError(f"{self.event_type} envelope has bad data: {exc}") from None


def envelope_schema() -> dict[str, Any]:
    """The envelope's JSON Schema, as generated from the model (wire names, camelCase)."""
    schema = FlowEventEnvelope.model_json_schema(by_alias=True)
    schema["$id"] = "urn:flowstore:flow-event-envelope:1"
    schema["title"] = "FlowEventEnvelope"
    return schema


def schema_text() -> str:
    """The contents `envelope.schema.json` must have (sorted keys, two-space indent)."""
    return json.dumps(envelope_schema(), indent=2, sort_keys=True) + "\n"
