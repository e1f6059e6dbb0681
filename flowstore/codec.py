"""How events are stored: orjson bytes, rebuilt into frozen pydantic events on the way out.

Selected through the Application (`construct_transcoder` / `construct_mapper`), as in the eventsourcing
`aggregate7` example: the mapper dumps an event's fields, orjson encodes them (UUIDs and datetimes as
strings), and on reading pydantic validates the fields back into their types.

Instance events have their personal fields sealed with their user's key first (`flowstore.keys`):
the stored state holds `subject` (which key) and `sealed` (the fields, encrypted) instead. Once the
key is shredded the event still reads, with a stand-in user id and no payload: erased, not corrupt.
An event that cannot be read at all raises `CorruptEventError` naming it, never a decoder's error.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence
from typing import Any, cast
from uuid import UUID

import orjson
from eventsourcing.domain import DomainEventProtocol
from eventsourcing.persistence import Mapper, StoredEvent, Transcoder
from eventsourcing.utils import get_topic, resolve_topic
from pydantic import BaseModel

from flowstore.domain import DomainEvent, InstanceEvent
from flowstore.errors import CorruptEventError, EncryptionKeyError
from flowstore.keys import ERASED_USER_PREFIX, PERSONAL_FIELDS, UserKeys, erased_user_id

__all__ = ["OrjsonTranscoder", "PydanticMapper"]


class OrjsonTranscoder(Transcoder):
    """Encodes plain JSON data with orjson (no custom transcodings: pydantic handles types)."""

    def encode(self, obj: Any) -> bytes:
        """Encode to JSON bytes."""
        return orjson.dumps(obj)

    def decode(self, data: bytes) -> Any:
        """Decode JSON bytes."""
        return orjson.loads(data)


class PydanticMapper(Mapper[Any]):
    """Maps frozen pydantic events to stored events and back, sealing personal fields per user."""

    keys: UserKeys | None = None
    """Set by the store right after construction; without it nothing is sealed (nor opened)."""

    def to_stored_event(self, domain_event: DomainEventProtocol[Any]) -> StoredEvent:
        """Serialise an event; id and version live in their own columns, not in the state."""
        event = cast(DomainEvent, domain_event)
        fields = _FIELDS.get(type(event))
        if fields is None:  # a definition's event (nested models), or a class defined elsewhere
            state = event.model_dump(exclude=set(_IN_COLUMNS))
        else:
            values = event.__dict__  # (see _FIELDS)
            user_id = values["user_id"]
            # An instance whose events already read as erased (sealed with a key shredded
            # meanwhile) carries a stand-in id, which names no one: sealing it would create a key
            # for nobody.
            if self.keys is None or user_id.startswith(ERASED_USER_PREFIX):
                state = {name: values[name] for name in fields[0]}
            else:
                key = self.keys.for_user(user_id)  # a cache hit: `EventLog.save` loaded it
                state = {name: values[name] for name in fields[1]}
                personal = {name: values[name] for name in fields[2]}
                context = _context(event.originator_id, event.originator_version)
                sealed = key.seal(self.transcoder.encode(personal), context)
                state["subject"] = key.subject
                state["sealed"] = base64.b64encode(sealed).decode()
        stored = self.transcoder.encode(state)
        if self.compressor:
            stored = self.compressor.compress(stored)
        if self.cipher:
            stored = self.cipher.encrypt(stored)
        return StoredEvent(
            originator_id=event.originator_id,
            originator_version=event.originator_version,
            topic=get_topic(type(event)),
            state=stored,
        )

    def to_domain_event(self, stored_event: StoredEvent) -> DomainEventProtocol[Any]:
        """Rebuild (and type-check) an event from its stored form."""
        return self._build(stored_event, self._state(stored_event))

    def to_domain_events(self, stored_events: Sequence[StoredEvent]) -> list[DomainEvent]:
        """Rebuild a page of events, fetching the keys they need in one query rather than one each."""
        states = [self._state(stored) for stored in stored_events]
        if self.keys is not None:
            self.keys.prefetch(state["subject"] for state in states if "sealed" in state)
        return [
            cast(DomainEvent, self._build(stored, state))
            for stored, state in zip(stored_events, states, strict=True)
        ]

    def _state(self, stored_event: StoredEvent) -> dict[str, Any]:
        """The stored fields of an event: decrypted, decompressed, decoded (still sealed)."""
        data = stored_event.state
        if self.cipher:
            try:
                data = self.cipher.decrypt(data)
            except ValueError as exc:  # the AES-GCM tag does not match: wrong key, or tampering
                raise EncryptionKeyError(
                    f"Cannot decrypt event {stored_event.originator_id} "
                    f"v{stored_event.originator_version}: wrong key, or the row was altered"
                ) from exc
        try:
            if self.compressor:
                data = self.compressor.decompress(data)
            state = self.transcoder.decode(data)
            if not isinstance(state, dict):
                raise TypeError(f"the stored state is a {type(state).__name__}, not an object")
            if "sealed" in state and not isinstance(state.get("subject"), str):
                raise TypeError("sealed fields without the subject of their key")
            return state
        except Exception as exc:  # undecodable bytes
            raise CorruptEventError(
                stored_event.originator_id, stored_event.originator_version, repr(exc)[:300]
            ) from exc

    def _build(self, stored_event: StoredEvent, state: dict[str, Any]) -> DomainEventProtocol[Any]:
        """The event from its decoded fields: personal fields opened, types checked."""
        try:
            cls = resolve_topic(stored_event.topic)
            if "sealed" in state:
                state.update(self._open(stored_event, state, cls))
            state["originator_id"] = stored_event.originator_id
            state["originator_version"] = stored_event.originator_version
            return cast(DomainEventProtocol[Any], cls.model_validate(state))
        except CorruptEventError:
            raise
        except Exception as exc:  # unknown topic, fields that do not validate
            raise CorruptEventError(
                stored_event.originator_id, stored_event.originator_version, repr(exc)[:300]
            ) from exc

    def _open(self, stored_event: StoredEvent, state: dict[str, Any], cls: type) -> dict[str, Any]:
        """The personal fields of a sealed event; stand-ins when its key has been shredded."""
        subject = state.pop("subject")
        # What b64decode does, without its Python wrapper (a page of events decodes thousands).
        sealed = binascii.a2b_base64(state.pop("sealed"))
        key = self.keys.for_subject(subject) if self.keys is not None else None
        if key is None:  # erased (or a store opened without keys): the event reads anonymised
            fields = cast(type[BaseModel], cls).model_fields
            stand_in = {
                "user_id": erased_user_id(subject),
                "payload": None,
                "error": "(erased)",
                "message": None,
                "entity_id": None,
            }
            return {f: v for f, v in stand_in.items() if f in fields}
        opened = key.open(
            sealed, _context(stored_event.originator_id, stored_event.originator_version)
        )
        if opened is None:
            raise CorruptEventError(
                stored_event.originator_id,
                stored_event.originator_version,
                "its sealed fields do not open with their user's key (the row was altered)",
            )
        return cast(dict[str, Any], self.transcoder.decode(opened))


_IN_COLUMNS = ("originator_id", "originator_version")


_Fields = tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]
"""Which fields of an instance event are stored where: all but the id and version (which have
columns of their own), in order; those of them left in the clear when the rest are sealed; those
sealed with the user's key, in `PERSONAL_FIELDS` order."""


def _fields_of(cls: type[InstanceEvent]) -> _Fields:
    stored = tuple(name for name in cls.model_fields if name not in _IN_COLUMNS)
    return (
        stored,
        tuple(name for name in stored if name not in PERSONAL_FIELDS),
        tuple(name for name in PERSONAL_FIELDS if name in stored),
    )


_FIELDS: dict[type, _Fields] = {
    cls: _fields_of(cls)
    for cls in InstanceEvent.__subclasses__()
    if cls.__module__ == InstanceEvent.__module__
}
"""The instance events' fields. Every one is of a type orjson writes as it is (str, int, float,
bool, None, datetime, a dict of JSON), which `model_dump` returns unchanged: the stored state is
taken from the event's values as they are, byte for byte what `model_dump` would give."""


def _context(originator_id: UUID | str, version: int) -> bytes:
    """What a sealed blob is bound to: the event it belongs to."""
    uuid = originator_id if isinstance(originator_id, UUID) else UUID(originator_id)
    return uuid.bytes + version.to_bytes(8, "big")
