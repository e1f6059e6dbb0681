"""The mapper stores an instance event from its values (no `model_dump`): the same bytes."""

from __future__ import annotations

import orjson
from eventsourcing.persistence import StoredEvent
from eventsourcing.utils import get_topic
from hypothesis import assume, given

from flowstore.codec import OrjsonTranscoder, PydanticMapper
from flowstore.domain import DomainEvent, InstanceEvent
from flowstore.keys import ERASED_USER_PREFIX, PERSONAL_FIELDS, MemoryKeyStore
from tests.unit.test_codec import events, mapper


@given(events)
def test_an_event_is_stored_as_model_dump_gives_it(event: DomainEvent) -> None:
    # Field order included: the bytes are the dump's.
    stored = mapper.to_stored_event(event)
    expected = event.model_dump(exclude={"originator_id", "originator_version"})
    assert stored.state == orjson.dumps(expected)
    assert stored.topic == get_topic(type(event))
    assert (stored.originator_id, stored.originator_version) == (
        event.originator_id,
        event.originator_version,
    )
    # Built without the dataclass's __init__: the same object as it would build.
    built = StoredEvent(stored.originator_id, stored.originator_version, stored.topic, stored.state)
    assert type(stored) is StoredEvent
    assert vars(stored) == vars(built)
    assert stored == built
    assert hash(stored) == hash(built)


@given(events)
def test_a_sealed_event_keeps_its_personal_fields_out_of_the_clear(event: DomainEvent) -> None:
    sealing = PydanticMapper(transcoder=OrjsonTranscoder())
    sealing.keys = MemoryKeyStore()
    stored = sealing.to_stored_event(event)
    assert sealing.to_domain_event(stored) == event
    state = orjson.loads(stored.state)
    if isinstance(event, InstanceEvent) and not event.user_id.startswith(ERASED_USER_PREFIX):
        assert not set(state) & set(PERSONAL_FIELDS)
        assert state["subject"] == sealing.keys.for_user(event.user_id).subject
    else:
        assert "sealed" not in state


@given(events)
def test_events_are_sealed_with_the_keys_the_caller_holds(event: DomainEvent) -> None:
    # The append hands down the keys it looked up under the user's lock (`EventLog.save`): those
    # seal its events, not another lookup's (which could differ once a key was erased meanwhile).
    assume(isinstance(event, InstanceEvent) and not event.user_id.startswith(ERASED_USER_PREFIX))
    assert isinstance(event, InstanceEvent)
    held = MemoryKeyStore()
    key = held.for_user(event.user_id)
    sealing = PydanticMapper(transcoder=OrjsonTranscoder())
    sealing.keys = MemoryKeyStore()  # a key store of its own: its key for the user is another
    [stored] = sealing.to_stored_events([event], {event.user_id: key})
    assert orjson.loads(stored.state)["subject"] == key.subject
    reading = PydanticMapper(transcoder=OrjsonTranscoder())
    reading.keys = held
    assert reading.to_domain_event(stored) == event
    # Without keys handed down, the mapper's own store seals: the same as `to_stored_event`.
    [alone] = sealing.to_stored_events([event])
    subject = sealing.keys.for_user(event.user_id).subject
    assert orjson.loads(alone.state)["subject"] == subject != key.subject
    assert orjson.loads(sealing.to_stored_event(event).state)["subject"] == subject
