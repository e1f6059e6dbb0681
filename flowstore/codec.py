"""How events are stored: orjson bytes, rebuilt into frozen pydantic events on the way out.

Selected through the Application (`construct_transcoder` / `construct_mapper`), as in the eventsourcing
`aggregate7` example: the mapper dumps an event's fields, orjson encodes them (UUIDs and datetimes as
strings), and on reading pydantic validates the fields back into their types.
"""

from __future__ import annotations

from typing import Any, cast

import orjson
from eventsourcing.domain import DomainEventProtocol
from eventsourcing.persistence import Mapper, StoredEvent, Transcoder
from eventsourcing.utils import get_topic, resolve_topic
from pydantic import BaseModel

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
    """Maps frozen pydantic events to stored events and back."""

    def to_stored_event(self, domain_event: DomainEventProtocol[Any]) -> StoredEvent:
        """Serialise an event; id and version live in their own columns, not in the state."""
        state = cast(BaseModel, domain_event).model_dump(
            exclude={"originator_id", "originator_version"}
        )
        stored = self.transcoder.encode(state)
        if self.compressor:
            stored = self.compressor.compress(stored)
        if self.cipher:
            stored = self.cipher.encrypt(stored)
        return StoredEvent(
            originator_id=domain_event.originator_id,
            originator_version=domain_event.originator_version,
            topic=get_topic(type(domain_event)),
            state=stored,
        )

    def to_domain_event(self, stored_event: StoredEvent) -> DomainEventProtocol[Any]:
        """Rebuild (and type-check) an event from its stored form."""
        data = stored_event.state
        if self.cipher:
            data = self.cipher.decrypt(data)
        if self.compressor:
            data = self.compressor.decompress(data)
        state = self.transcoder.decode(data)
        state["originator_id"] = stored_event.originator_id
        state["originator_version"] = stored_event.originator_version
        cls = resolve_topic(stored_event.topic)
        return cast(DomainEventProtocol[Any], cls.model_validate(state))
