"""Every event survives the trip through orjson and back, byte-for-byte JSON, not stdlib json."""

from __future__ import annotations

import base64
from datetime import UTC, datetime
from typing import Any, cast
from uuid import UUID

import orjson
import pytest
from eventsourcing.persistence import StoredEvent
from eventsourcing.utils import get_topic, resolve_topic
from hypothesis import given
from hypothesis import strategies as st

from flowstore.codec import OrjsonTranscoder, PydanticMapper
from flowstore.definitions import parse_definition
from flowstore.domain import (
    DomainEvent,
    FlowCleared,
    FlowCompleted,
    FlowDefined,
    FlowHandedOver,
    FlowMigrated,
    FlowStarted,
    FlowWentBack,
    InstanceEvent,
    StateOverridden,
    TransitionExecuted,
    TransitionRejected,
)
from flowstore.errors import CorruptEventError
from flowstore.keys import MemoryKeyStore
from tests.strategies import flow_definitions, payloads

names = st.text(min_size=1, max_size=20)
times = st.datetimes(
    min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(UTC)
)
common = {
    "originator_id": st.uuids(),
    "originator_version": st.integers(1, 10**6),
    "timestamp": times,
    "user_id": names,
    "flow_id": names,
    "definition_version": st.integers(1, 1000),
}
events = st.one_of(
    st.builds(
        FlowStarted,
        **common,
        reason=st.sampled_from(["start", "reset"]),
        from_step=st.none() | names,
        step=names,
        service=names,
        expires_at=st.none() | times,
        target=st.none() | names,
        entity_id=st.none() | names,
    ),
    st.builds(
        TransitionExecuted,
        **common,
        transition=names,
        from_step=names,
        to_step=names,
        service=names,
        payload=payloads,
        expires_at=st.none() | times,
        elapsed_ms=st.floats(0, 1e6),
        ok=st.booleans(),
        message=st.none() | st.text(),
        previous=st.none() | names,
        rules=st.sampled_from([1, 2]),
    ),
    st.builds(
        TransitionRejected,
        **common,
        transition=names,
        from_step=names,
        payload=payloads,
        error=st.text(),
        error_code=names,
        elapsed_ms=st.floats(0, 1e6),
    ),
    st.builds(FlowCompleted, **common, step=names),
    st.builds(
        StateOverridden,
        **common,
        from_step=st.none() | names,
        step=names,
        service=names,
        ok=st.booleans(),
        payload=payloads,
        expires_at=st.none() | times,
    ),
    st.builds(FlowCleared, **common, from_step=st.none() | names),
    st.builds(
        FlowWentBack,
        **common,
        from_step=names,
        step=names,
        service=names,
        expires_at=st.none() | times,
    ),
    st.builds(
        FlowHandedOver,
        **common,
        from_step=st.none() | names,
        step=names,
        previous=st.none() | names,
        service=names,
        target=st.none() | names,
        sender=st.none() | names,
        ok=st.booleans(),
        entity_id=st.none() | names,
        message=st.none() | st.text(),
        payload=payloads,
        expires_at=st.none() | times,
    ),
    st.builds(
        FlowMigrated,
        **common,
        from_version=st.integers(1, 1000),
        to_version=st.integers(1, 1000),
        from_step=names,
        to_step=names,
        service=names,
    ),
    st.builds(
        FlowDefined,
        originator_id=st.uuids(),
        originator_version=st.integers(1, 100),
        timestamp=times,
        flow_id=names,
        version=st.integers(1, 100),
        definition=flow_definitions().map(parse_definition),
    ),
)

mapper = PydanticMapper(transcoder=OrjsonTranscoder())


@given(events)
def test_every_event_survives_a_round_trip(event: DomainEvent) -> None:
    stored = mapper.to_stored_event(event)
    assert isinstance(stored.originator_id, UUID)
    assert mapper.to_domain_event(stored) == event


@given(events)
def test_stored_state_is_orjson_and_leaves_id_and_version_to_their_columns(
    event: DomainEvent,
) -> None:
    state = orjson.loads(mapper.to_stored_event(event).state)
    assert "originator_id" not in state
    assert "originator_version" not in state
    assert datetime.fromisoformat(state["timestamp"]) == event.timestamp


def _event_classes(cls: type[DomainEvent]) -> list[type[DomainEvent]]:
    return [c for sub in cls.__subclasses__() for c in (sub, *_event_classes(sub))]


def test_events_keep_the_topic_stored_logs_name_them_by() -> None:
    # Logs written by earlier versions name each event `flowstore.domain:<Class>`: an event class
    # that moves must stay importable there (or be registered under it) for them to decode.
    classes = [c for c in _event_classes(DomainEvent) if c.__module__.startswith("flowstore.")]
    assert len(classes) >= 15
    for cls in classes:
        assert get_topic(cls) == f"flowstore.domain:{cls.__name__}"
        assert resolve_topic(f"flowstore.domain:{cls.__name__}") is cls


def test_an_event_stored_under_its_topic_decodes() -> None:
    # As a log holds it: the topic string and the orjson state, written by hand.
    state = {
        "timestamp": "2026-01-02T03:04:05+00:00",
        "user_id": "ann",
        "flow_id": "onboarding",
        "definition_version": 1,
        "transition": "start",
        "from_step": "welcome",
        "to_step": "profile",
        "service": "web",
        "payload": {"name": "Ann"},
        "expires_at": None,
        "elapsed_ms": 1.5,
        "rules": 2,
    }
    stored = StoredEvent(
        originator_id=UUID(int=1),
        originator_version=3,
        topic="flowstore.domain:TransitionExecuted",
        state=orjson.dumps(state),
    )
    event = mapper.to_domain_event(stored)
    assert isinstance(event, TransitionExecuted)
    assert (event.to_step, event.payload, event.originator_version) == (
        "profile",
        {"name": "Ann"},
        3,
    )


# Plain decoding: the fields the projections fold, without building the pydantic event.

sealing = PydanticMapper(transcoder=OrjsonTranscoder())
sealing.keys = MemoryKeyStore()


@given(events)
def test_an_event_read_as_plain_data_has_exactly_the_fields_of_the_decoded_event(
    event: DomainEvent,
) -> None:
    for codec in (mapper, sealing):
        stored = codec.to_stored_event(event)
        decoded = codec.to_domain_event(stored)
        assert codec.to_plain_event(stored) == (type(decoded).__name__, decoded.__dict__)
        assert codec.to_plain_events([stored]) == [(type(decoded).__name__, decoded.__dict__)]


def _decoded(codec: PydanticMapper, stored: StoredEvent, plain: bool) -> Any:
    try:
        if plain:
            return codec.to_plain_event(stored)
        decoded = codec.to_domain_event(stored)
        return type(decoded).__name__, decoded.__dict__
    except CorruptEventError as exc:
        return CorruptEventError, exc.detail


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**60), 2**60)
    | st.floats(allow_nan=False)
    | st.text(max_size=5)
    | st.sampled_from(
        [
            "2026-01-02T03:04:05+00:00",
            "2026-01-02T03:04:05.000001-05:30",
            "2026-02-30T03:04:05+00:00",
            "2026-01-02",
            "2026-01-02T03:04:05Z",
            "2026-01-02T03:04:05",
            "start",
            "reset",
            "٢٠٢٦-01-02T03:04:05+00:00",
        ]
    ),
    lambda inner: (
        st.lists(inner, max_size=2) | st.dictionaries(st.text(max_size=3), inner, max_size=2)
    ),
    max_leaves=4,
)


@given(events, st.data())
def test_a_malformed_event_is_rejected_as_plain_data_exactly_when_the_model_rejects_it(
    event: DomainEvent, data: st.DataObject
) -> None:
    # Containment: the projections name an event they cannot read (CorruptEventError) and skip
    # it; the plain decoder must neither let through what the model refuses nor refuse more.
    stored = mapper.to_stored_event(event)
    state = orjson.loads(stored.state)
    for name in data.draw(st.lists(st.sampled_from(sorted(state)), max_size=3, unique=True)):
        if data.draw(st.booleans()):
            del state[name]
        else:
            state[name] = data.draw(json_values)
    altered = StoredEvent(
        originator_id=stored.originator_id,
        originator_version=stored.originator_version,
        topic=stored.topic,
        state=orjson.dumps(state),
    )
    assert _decoded(mapper, altered, plain=True) == _decoded(mapper, altered, plain=False)


def test_an_unknown_topic_or_an_undecodable_state_is_corrupt_as_plain_data_too() -> None:
    good = mapper.to_stored_event(
        FlowCleared(
            originator_id=UUID(int=7),
            originator_version=2,
            timestamp=datetime(2026, 1, 2, tzinfo=UTC),
            user_id="ann",
            flow_id="f",
            definition_version=1,
            from_step="a",
        )
    )
    unknown = StoredEvent(good.originator_id, 2, "flowstore.domain:NoSuchEvent", good.state)
    garbage = StoredEvent(good.originator_id, 2, good.topic, b"\x00not json")
    for stored in (unknown, garbage):
        with pytest.raises(CorruptEventError) as found:
            mapper.to_plain_event(stored)
        assert found.value.detail == _decoded(mapper, stored, plain=False)[1]


@given(st.lists(events, min_size=1, max_size=6), st.data())
def test_a_page_of_rows_reads_as_each_event_reads_alone(
    page: list[DomainEvent], data: st.DataObject
) -> None:
    """`to_plain_rows` (a page straight from the log's rows: each user's key looked up once, the
    sealed fields opened in one loop) gives what `to_plain_event` gives each event alone, with
    sealed fields altered (bytes flipped, not base64, moved to another event) and users erased:
    the same fields, the same stand-ins, the first unreadable event named the same way."""
    codec = PydanticMapper(transcoder=OrjsonTranscoder())
    codec.keys = MemoryKeyStore()
    stored = [codec.to_stored_event(event) for event in page]
    rows = []
    for event, s in zip(page, stored, strict=True):
        state = orjson.loads(s.state)
        if "sealed" in state:
            change = data.draw(st.sampled_from(["none", "flip", "text", "move", "erase"]))
            if change == "flip":
                blob = bytearray(base64.b64decode(state["sealed"]))
                blob[data.draw(st.integers(0, len(blob) - 1))] ^= 1
                state["sealed"] = base64.b64encode(bytes(blob)).decode()
            elif change == "text":
                state["sealed"] = data.draw(st.sampled_from(["", "@@", "YQ=", 7, None]))
            elif change == "move":
                state["sealed"] = orjson.loads(stored[0].state).get("sealed", state["sealed"])
            elif change == "erase":
                codec.keys.shred(cast(InstanceEvent, event).user_id)
        rows.append((s.originator_id, s.originator_version, s.topic, orjson.dumps(state)))
    alone = []
    for oid, version, topic, state in rows:
        try:
            alone.append(codec.to_plain_event(StoredEvent(oid, version, topic, state)))
        except CorruptEventError as exc:
            alone.append(exc.detail)
    failed = [a for a in alone if isinstance(a, str)]
    try:
        together: Any = codec.to_plain_rows(rows)
    except CorruptEventError as exc:
        together = exc.detail
    assert together == (failed[0] if failed else alone)
