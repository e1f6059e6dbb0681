"""The envelope: every event survives the trip, the schema file matches the model."""

from __future__ import annotations

import contextlib
import json
from datetime import UTC, datetime, timedelta, timezone
from uuid import UUID, uuid5

import jsonschema
import pytest
from hypothesis import given
from hypothesis import strategies as st

from flowstore import FlowError, FlowStore, domain
from flowstore.adapters.kafka.envelope import (
    _EVENT_ID_NAMESPACE,
    EVENT_TYPES,
    SCHEMA_PATH,
    EnvelopeError,
    FlowEventEnvelope,
    _event_id,
    envelope_schema,
    message_bytes,
    message_key,
    schema_text,
)
from flowstore.codec import OrjsonTranscoder, PlainEvent, PydanticMapper
from flowstore.domain import DomainEvent, InstanceEvent
from tests.flows import Clock, linear, onboarding
from tests.owlmeans import owl_flow
from tests.strategies import payloads

FLOW = "user-onboarding"


def every_kind_of_event() -> tuple[list[tuple[int, DomainEvent]], list[tuple[int, PlainEvent]]]:
    clock = Clock(datetime(2026, 3, 1, 12, 0, 0, 123456, tzinfo=UTC))
    with FlowStore("memory://", clock=clock) as store:
        store.create_flow(onboarding())
        store.create_flow(linear("short", 2, ttl=1))
        store.execute_transition("ann", FLOW, "start", {"nested": {"a": [1, 2.5, None]}, "é": "ü"})
        with contextlib.suppress(FlowError):
            store.execute_transition("ann", FLOW, "no-such-transition")
        store.update_flow(FLOW, {"config": {"x": 1}})
        store.set_flow_state("ann", {"flow": FLOW, "step": "welcome", "ok": False})
        store.reset_flow("bob", "short")
        store.execute_transition("bob", "short", "next")
        store.reset_flow("cy", FLOW)
        store.clear_flow_state("cy", FLOW)
        store.reset_flow("dee", "short")
        clock.advance(5)
        store.purge_expired_flows()
        store.delete_flow("short")
        store.reset_flow("eve", FLOW)
        store.erase_user("eve")
        # The OwlMeans model's events and fields: target, entity, ok/message, back, hand-over.
        store.create_flow(owl_flow("_oa"))
        store.reset_flow("fay", "_oa", service="portal", entity_id="org-1")
        store.execute_transition("fay", "_oa", "signup", {"k": 1}, ok=False, message="retry")
        store.go_back("fay", "_oa")
        store.execute_transition("fay", "_oa", "signin")
        store.adopt_state_token("gus", store.state_token("fay", "_oa"), sender="idp")
        return store.read_events(1, 1000), store.read_plain_events(1, 1000)


EVENTS, PLAIN = every_kind_of_event()


def test_the_registry_names_every_concrete_event_class_of_the_domain() -> None:
    classes = {
        value
        for value in vars(domain).values()
        if isinstance(value, type)
        and issubclass(value, DomainEvent)
        and value not in (DomainEvent, InstanceEvent)
    }
    assert set(EVENT_TYPES.values()) == classes
    assert all(EVENT_TYPES[cls.__name__] is cls for cls in classes)


def test_the_sample_log_has_every_event_type_the_commands_make() -> None:
    made = {type(event).__name__ for _, event in EVENTS}
    assert made >= set(EVENT_TYPES) - {"FlowMigrated"}


@pytest.mark.parametrize(("notification_id", "event"), EVENTS, ids=lambda v: str(v)[:24])
def test_every_event_survives_the_round_trip_exactly(
    notification_id: int, event: DomainEvent
) -> None:
    envelope = FlowEventEnvelope.of(notification_id, event)
    parsed = FlowEventEnvelope.parse(envelope.to_bytes())
    assert parsed == envelope
    assert parsed.to_event() == event
    assert parsed.notification_id == notification_id
    assert parsed.aggregate_id == event.originator_id
    assert message_key(event) == str(event.originator_id).encode()
    jsonschema.validate(json.loads(envelope.to_bytes()), envelope_schema())


def test_instance_events_carry_user_flow_and_instance_definition_events_do_not() -> None:
    for notification_id, event in EVENTS:
        envelope = FlowEventEnvelope.of(notification_id, event)
        if isinstance(event, InstanceEvent):
            assert (envelope.user_id, envelope.flow_id) == (event.user_id, event.flow_id)
            assert envelope.instance_id == envelope.aggregate_id == event.originator_id
            assert envelope.instance_version == event.originator_version
            assert envelope.definition_version == event.definition_version
        else:
            assert envelope.user_id is None
            assert envelope.instance_id is None
            assert envelope.instance_version is None


def test_the_wire_format_is_camel_case_and_ids_are_stable() -> None:
    notification_id, event = EVENTS[2]
    wire = json.loads(FlowEventEnvelope.of(notification_id, event).to_bytes())
    assert set(wire) == {
        "schemaVersion", "eventId", "eventType", "aggregateId", "aggregateVersion",
        "instanceId", "instanceVersion", "userId", "flowId", "definitionVersion",
        "notificationId", "timestamp", "data",
    }  # fmt: skip
    assert wire["schemaVersion"] == 1
    assert wire["timestamp"] == "2026-03-01T12:00:00.123456Z"
    again = FlowEventEnvelope.of(notification_id, event)
    assert again.event_id == FlowEventEnvelope.parse(json.dumps(wire)).event_id


def test_the_schema_file_is_the_one_the_model_generates() -> None:
    assert SCHEMA_PATH.read_text() == schema_text(), "run: python -m flowstore.adapters.kafka"


@pytest.mark.parametrize(
    "value",
    [b"", b"not json", b"[]", b'{"eventType": "FlowStarted"}', b'{"schemaVersion": 2}'],
)
def test_anything_else_is_refused_with_an_envelope_error(value: bytes) -> None:
    with pytest.raises(EnvelopeError):
        FlowEventEnvelope.parse(value)


def test_an_unknown_event_type_parses_but_cannot_become_an_event() -> None:
    notification_id, event = EVENTS[2]
    envelope = FlowEventEnvelope.of(notification_id, event).model_copy(
        update={"event_type": "FlowTeleported"}
    )
    parsed = FlowEventEnvelope.parse(envelope.to_bytes())
    with pytest.raises(EnvelopeError, match="unknown event type"):
        parsed.to_event()


def test_an_envelope_from_before_the_owlmeans_fields_still_becomes_its_event() -> None:
    """A TransitionExecuted published by an older flowstore (no ok/message/previous/rules)."""
    executed = next(e for _, e in EVENTS if isinstance(e, domain.TransitionExecuted))
    old = FlowEventEnvelope.of(1, executed).to_bytes()
    data = json.loads(old)
    for name in ("ok", "message", "previous", "rules"):
        del data["data"][name]
    event = FlowEventEnvelope.parse(json.dumps(data)).to_event()
    assert isinstance(event, domain.TransitionExecuted)
    assert (event.ok, event.message, event.previous, event.rules) == (True, None, None, 1)


@pytest.mark.parametrize(("notification_id", "event"), EVENTS, ids=lambda v: str(v)[:24])
def test_the_publishers_message_is_the_envelope_byte_for_byte(
    notification_id: int, event: DomainEvent
) -> None:
    assert message_bytes(notification_id, event) == (
        FlowEventEnvelope.of(notification_id, event).to_bytes()
    )


@pytest.mark.parametrize(
    ("read", "plain"),
    list(zip(EVENTS, PLAIN, strict=True)),
    # Names that are the same in every process (xdist workers compare them): no times, no ids.
    ids=[f"{n}-{type(event).__name__}" for n, event in EVENTS],
)
def test_the_message_of_an_event_read_as_plain_data_is_the_envelope_byte_for_byte(
    read: tuple[int, DomainEvent], plain: tuple[int, PlainEvent]
) -> None:
    (notification_id, event), (same_id, fields) = read, plain
    assert same_id == notification_id
    assert message_key(fields) == message_key(event)
    assert message_bytes(notification_id, fields) == (
        FlowEventEnvelope.of(notification_id, event).to_bytes()
    )


_ZONES = st.sampled_from(
    [UTC, None, timezone(timedelta(hours=2)), timezone(-timedelta(hours=5, minutes=30))]
)
_MOMENTS = st.builds(
    lambda moment, zone: moment.replace(tzinfo=zone),
    st.datetimes(min_value=datetime(1970, 1, 2), max_value=datetime(2200, 1, 1)),
    _ZONES,
)
_INSTANCE_EVENTS = [e for _, e in EVENTS if isinstance(e, InstanceEvent)] + [
    domain.FlowMigrated(
        originator_id=EVENTS[2][1].originator_id,
        originator_version=9,
        timestamp=datetime(2026, 3, 1, tzinfo=UTC),
        user_id="ann",
        flow_id=FLOW,
        definition_version=2,
        from_version=1,
        to_version=2,
        from_step="welcome",
        to_step="profile",
        service="portal",
    )
]


@given(
    st.sampled_from(_INSTANCE_EVENTS),
    st.integers(1, 2**53),
    _MOMENTS,
    st.none() | _MOMENTS,
    payloads,
    st.floats(allow_nan=False, allow_infinity=False),
)
def test_the_publishers_message_is_the_envelope_for_any_field_values(
    event: DomainEvent,
    notification_id: int,
    timestamp: datetime,
    expires_at: datetime | None,
    payload: dict[str, object] | None,
    elapsed_ms: float,
) -> None:
    changes = {"timestamp": timestamp, "expires_at": expires_at, "payload": payload}
    changes["elapsed_ms"] = elapsed_ms
    event = event.model_copy(update={k: v for k, v in changes.items() if k in event.__dict__})
    envelope = FlowEventEnvelope.of(notification_id, event).to_bytes()
    assert message_bytes(notification_id, event) == envelope
    # As the publisher reads it: stored, then decoded to plain data (its own timestamps' zones).
    plain = _MAPPER.to_plain_event(_MAPPER.to_stored_event(event))
    assert message_bytes(notification_id, plain) == envelope


_MAPPER = PydanticMapper(transcoder=OrjsonTranscoder())


@given(st.uuids(), st.integers(0, 2**63), st.text(max_size=40))
def test_an_event_id_is_the_uuid5_of_its_instance_and_version(
    instance: UUID, version: int, name: str
) -> None:
    """The publisher writes event ids without building `UUID`s: the same text as `uuid5`."""
    for text in (f"{instance}:{version}", name):
        assert _event_id(text) == str(uuid5(_EVENT_ID_NAMESPACE, text))
