"""How events are stored: orjson bytes, rebuilt into frozen pydantic events on the way out.

Selected through the Application (`construct_transcoder` / `construct_mapper`), as in the eventsourcing
`aggregate7` example: the mapper dumps an event's fields, orjson encodes them (UUIDs and datetimes as
strings), and on reading pydantic validates the fields back into their types.

Instance events have their personal fields sealed with their user's key first (`flowstore.keys`):
the stored state holds `subject` (which key) and `sealed` (the fields, encrypted) instead. Once the
key is shredded the event still reads, with a stand-in user id and no payload: erased, not corrupt.
An event that cannot be read at all raises `CorruptEventError` naming it, never a decoder's error.

Readers that want an event's fields rather than the event (the projections' fold, the Kafka
envelopes) use `PydanticMapper.to_plain_events`: the same fields as the validated event's, for a
fraction of the cost (see `PlainEvent`).
"""

from __future__ import annotations

import binascii
import re
import types
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any, Literal, Union, cast, get_args, get_origin
from uuid import UUID

import orjson
from eventsourcing.domain import DomainEventProtocol
from eventsourcing.persistence import Mapper, StoredEvent, Transcoder
from eventsourcing.utils import get_topic, resolve_topic
from pydantic import BaseModel

from flowstore.domain import DomainEvent, InstanceEvent
from flowstore.errors import CorruptEventError, EncryptionKeyError
from flowstore.keys import (
    ERASED_USER_PREFIX,
    PERSONAL_FIELDS,
    SealedKey,
    UserKeys,
    erased_user_id,
)

__all__ = ["OrjsonTranscoder", "PlainEvent", "PydanticMapper", "StoredRow"]

StoredRow = tuple[UUID | str, int, str, bytes]
"""A stored event as the log's row holds it: originator id, originator version, topic, state."""

PlainEvent = tuple[str, dict[str, Any]]
"""An event as plain data: its class name and its fields, equal to `(type(e).__name__, e.__dict__)`
of the event `PydanticMapper.to_domain_event` builds (timestamps as aware datetimes, the id a UUID)."""


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
        return self.to_stored_events((domain_event,))[0]

    def to_stored_events(
        self,
        domain_events: Sequence[DomainEventProtocol[Any]],
        keys: Mapping[str, SealedKey] | None = None,
    ) -> list[StoredEvent]:
        """`to_stored_event` of each event (a command's, or a whole batch's), looking this mapper's
        settings up once per call; `keys`: the users' keys the caller already holds (by user id),
        which seal their events (the others are looked up, `UserKeys.for_user`)."""
        user_keys = self.keys
        found: Mapping[str, SealedKey] = keys or {}
        transcoder = self.transcoder
        # orjson's own function when the transcoder is ours (its `encode` adds a call per use).
        encode = orjson.dumps if type(transcoder) is OrjsonTranscoder else transcoder.encode
        compressor, cipher = self.compressor, self.cipher
        stored_events: list[StoredEvent] = []
        for event in cast(Sequence[DomainEvent], domain_events):
            plan = _ENCODERS.get(type(event))
            if plan is None:  # a definition's event (nested models), or a class defined elsewhere
                state = event.model_dump(exclude=set(_IN_COLUMNS))
                topic = get_topic(type(event))
            else:
                topic, every, clear, personal = plan
                values = event.__dict__  # (see _FIELDS)
                user_id = values["user_id"]
                # An instance whose events already read as erased (sealed with a key shredded
                # meanwhile) carries a stand-in id, which names no one: sealing it would create a
                # key for nobody.
                if user_keys is None or user_id.startswith(ERASED_USER_PREFIX):
                    state = every(values)
                else:
                    key = found.get(user_id) or user_keys.for_user(user_id)
                    state = clear(values)
                    context = _context(values["originator_id"], values["originator_version"])
                    sealed = key.seal(encode(personal(values)), context)
                    state["subject"] = key.subject
                    # What b64encode does, without its Python wrapper.
                    state["sealed"] = binascii.b2a_base64(sealed, newline=False).decode()
            stored = encode(state)
            if compressor:
                stored = compressor.compress(stored)
            if cipher:
                stored = cipher.encrypt(stored)
            stored_events.append(
                _stored_event(event.originator_id, event.originator_version, topic, stored)
            )
        return stored_events

    def to_domain_event(self, stored_event: StoredEvent) -> DomainEventProtocol[Any]:
        """Rebuild (and type-check) an event from its stored form."""
        return self._build(
            stored_event.originator_id,
            stored_event.originator_version,
            stored_event.topic,
            self._state(stored_event),
            {},
        )

    def to_domain_events(self, stored_events: Sequence[StoredEvent]) -> list[DomainEvent]:
        """Rebuild a page of events, fetching the keys they need in one query rather than one each."""
        states = [self._state(stored) for stored in stored_events]
        if self.keys is not None:
            self.keys.prefetch({state["subject"] for state in states if "sealed" in state})
        opened: dict[str, SealedKey | None] = {}
        return [
            cast(
                DomainEvent,
                self._build(s.originator_id, s.originator_version, s.topic, state, opened),
            )
            for s, state in zip(stored_events, states, strict=True)
        ]

    def to_plain_event(self, stored_event: StoredEvent) -> PlainEvent:
        """An event's class name and fields, without building the event; `CorruptEventError` as
        `to_domain_event` raises it.

        Fields of the usual shapes (what flowstore writes: strings, integers, booleans, JSON
        objects, orjson's timestamps) are checked here, in a few type tests per field; anything
        else goes through the event's model as `to_domain_event` does, which decides. So an event
        is rejected exactly when `to_domain_event` rejects it, and its fields are the model's.
        """
        return self._plain_fields(
            stored_event.originator_id,
            stored_event.originator_version,
            stored_event.topic,
            self._state(stored_event),
            {},
        )

    def to_plain_events(self, stored_events: Sequence[StoredEvent]) -> list[PlainEvent]:
        """A page of events as plain data (`to_plain_event`), their keys fetched in one query."""
        return self.to_plain_rows(
            [(s.originator_id, s.originator_version, s.topic, s.state) for s in stored_events]
        )

    def to_plain_rows(self, rows: Sequence[StoredRow]) -> list[PlainEvent]:
        """`to_plain_events` of the log's rows as its driver gives them (`StoredRow`), without
        building a `StoredEvent` per row.

        The usual event (flowstore's own kinds, sealed with a key this process can look up,
        orjson's JSON) is decoded in one straight loop: each user's key looked up once per page,
        the sealed fields opened in place. Any step of it that does not go as usual leaves the
        event as it was for the general path (`to_plain_event`), which decides: so the same
        events decode, to the same fields, and the same are rejected.
        """
        decoded = self._decoded
        if self.cipher or self.compressor or type(self.transcoder) is not OrjsonTranscoder:
            states = [decoded(data, oid, version) for oid, version, _, data in rows]
        else:  # `_decoded`'s checks, inline; it decides (and names) whatever fails them
            loads = orjson.loads
            states = []
            for oid, version, _, data in rows:
                try:
                    state = loads(data)
                except Exception:
                    state = None
                if type(state) is not dict or (
                    "sealed" in state and type(state.get("subject")) is not str
                ):
                    state = decoded(data, oid, version)
                states.append(state)
        keys = self.keys
        if keys is not None:
            keys.prefetch({state["subject"] for state in states if "sealed" in state})
        opened: dict[str, SealedKey | None] = {}  # by subject: a user's events come by the dozen
        general = self._plain_fields
        if keys is None or type(self.transcoder) is not OrjsonTranscoder:
            return [
                general(oid, version, topic, state, opened)
                for (oid, version, topic, _), state in zip(rows, states, strict=True)
            ]
        loads, a2b, plans = orjson.loads, binascii.a2b_base64, _plans
        # An instance's id as bytes (the sealed fields' context), by the id's object: `rows`
        # keeps every one alive meanwhile, and a UUID's own hash is a Python call.
        bound: dict[int, bytes] = {}
        events: list[PlainEvent] = []
        for (oid, version, topic, _), state in zip(rows, states, strict=True):
            plan = plans[topic] if topic in plans else _plan_of(topic)
            if plan is not None and type(oid) is UUID:
                if "sealed" in state:
                    subject = state["subject"]
                    if subject in opened:
                        key = opened[subject]
                    else:
                        key = opened[subject] = keys.for_subject(subject)
                    if key is None:  # erased: the general path puts the stand-ins in
                        events.append(general(oid, version, topic, state, opened))
                        continue
                    try:
                        sealed = a2b(state["sealed"])
                        context = (bound.get(id(oid)) or bound.setdefault(id(oid), oid.bytes)) + (
                            version.to_bytes(8, "big")
                        )
                        plaintext = key.open(sealed, context)
                        personal = None if plaintext is None else loads(plaintext)
                    except Exception:  # altered: the general path names it
                        personal = None
                    if type(personal) is not dict:
                        events.append(general(oid, version, topic, state, opened))
                        continue
                    del state["subject"], state["sealed"]
                    state.update(personal)
                fields = plan[2](oid, version, state)
                if fields is not None:
                    events.append((plan[0], fields))
                    continue
            events.append(general(oid, version, topic, state, opened))
        return events

    def _plain_fields(
        self,
        originator_id: UUID | str,
        version: int,
        topic: str,
        state: dict[str, Any],
        opened: dict[str, SealedKey | None],
    ) -> PlainEvent:
        """One event's plain data from its decoded state (`to_plain_event`); `opened`: the keys
        this page already looked up, by subject."""
        plan = _plan_of(topic)
        if plan is not None and type(originator_id) is UUID:
            name, cls, decode = plan
            if "sealed" in state:
                state.update(self._open(originator_id, version, state, cls, opened))
            fields = decode(originator_id, version, state)
            if fields is not None:
                return name, fields
        # A shape the checks do not know (or a corrupt event): the model decides.
        event = self._build(originator_id, version, topic, state, opened)
        return type(event).__name__, event.__dict__

    def _state(self, stored_event: StoredEvent) -> dict[str, Any]:
        """The stored fields of an event: decrypted, decompressed, decoded (still sealed)."""
        return self._decoded(
            stored_event.state, stored_event.originator_id, stored_event.originator_version
        )

    def _decoded(self, data: bytes, originator_id: UUID | str, version: int) -> dict[str, Any]:
        """`_state` of an event's stored bytes (`originator_id` and `version` name it in errors)."""
        if self.cipher:
            try:
                data = self.cipher.decrypt(data)
            except ValueError as exc:  # the AES-GCM tag does not match: wrong key, or tampering
                raise EncryptionKeyError(
                    f"Cannot decrypt event {originator_id} "
                    f"v{version}: wrong key, or the row was altered"
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
            raise CorruptEventError(originator_id, version, repr(exc)[:300]) from exc

    def _build(
        self,
        originator_id: UUID | str,
        version: int,
        topic: str,
        state: dict[str, Any],
        opened: dict[str, SealedKey | None],
    ) -> DomainEventProtocol[Any]:
        """The event from its decoded fields: personal fields opened, types checked."""
        try:
            cls = resolve_topic(topic)
            if "sealed" in state:
                state.update(self._open(originator_id, version, state, cls, opened))
            state["originator_id"] = originator_id
            state["originator_version"] = version
            return cast(DomainEventProtocol[Any], cls.model_validate(state))
        except CorruptEventError:
            raise
        except Exception as exc:  # unknown topic, fields that do not validate
            raise CorruptEventError(originator_id, version, repr(exc)[:300]) from exc

    def _open(
        self,
        originator_id: UUID | str,
        version: int,
        state: dict[str, Any],
        cls: type,
        opened: dict[str, SealedKey | None],
    ) -> dict[str, Any]:
        """The personal fields of a sealed event; stand-ins when its key has been shredded.

        `opened`: keys already looked up by subject (filled in here), so that a page's events
        look each user's key up once (a key never changes; one shredded while the page is
        decoded may still open that page, as it would have a moment earlier).
        """
        subject = state.pop("subject")
        try:
            # What b64decode does, without its Python wrapper (a page decodes thousands).
            sealed = binascii.a2b_base64(state.pop("sealed"))
        except (TypeError, ValueError) as exc:  # not base64 text (binascii.Error is a ValueError)
            raise CorruptEventError(originator_id, version, repr(exc)[:300]) from exc
        if subject in opened:
            key = opened[subject]
        else:
            key = opened[subject] = (
                self.keys.for_subject(subject) if self.keys is not None else None
            )
        if key is None:  # erased (or a store opened without keys): the event reads anonymised
            model_fields = cast(type[BaseModel], cls).model_fields
            stand_in = {
                "user_id": erased_user_id(subject),
                "payload": None,
                "error": "(erased)",
                "message": None,
                "entity_id": None,
            }
            return {f: v for f, v in stand_in.items() if f in model_fields}
        plaintext = key.open(sealed, _context(originator_id, version))
        if plaintext is None:
            raise CorruptEventError(
                originator_id,
                version,
                "its sealed fields do not open with their user's key (the row was altered)",
            )
        fields = self.transcoder.decode(plaintext)
        if not isinstance(fields, dict):  # sealed by this key for this event: never, unless a bug
            raise CorruptEventError(originator_id, version, "its sealed fields are not an object")
        return fields


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


_new = object.__new__
_set = object.__setattr__


def _stored_event(originator_id: UUID, version: int, topic: str, state: bytes) -> StoredEvent:
    """`StoredEvent(originator_id, version, topic, state)`, its dict set at once: the frozen
    dataclass's `__init__` sets each field through `object.__setattr__`, twice the cost (one per
    event appended). Equal to the dataclass's own, field for field (tested)."""
    stored = _new(StoredEvent)
    _set(
        stored,
        "__dict__",
        {
            "originator_id": originator_id,
            "originator_version": version,
            "topic": topic,
            "state": state,
        },
    )
    return stored


_Pick = Callable[[dict[str, Any]], dict[str, Any]]
"""Takes some fields' values out of an event's `__dict__`, in order, into a new dict."""


def _picker(names: tuple[str, ...]) -> _Pick:
    """A `_Pick` of `names`, written out as one dict display (a comprehension over the names
    cost half as much again, per event)."""
    body = ", ".join(f"{name!r}: values[{name!r}]" for name in names)
    namespace: dict[str, Any] = {}
    exec(f"def pick(values):\n    return {{{body}}}", namespace)  # our own fields' names
    return cast(_Pick, namespace["pick"])


_ENCODERS: dict[type, tuple[str, _Pick, _Pick, _Pick]] = {
    cls: (get_topic(cls), _picker(every), _picker(clear), _picker(personal))
    for cls, (every, clear, personal) in _FIELDS.items()
}
"""Per instance event class: its topic, and its fields (`_FIELDS`) taken out of an event: all the
stored ones, those left in the clear, those sealed."""


def _context(originator_id: UUID | str, version: int) -> bytes:
    """What a sealed blob is bound to: the event it belongs to."""
    uuid = originator_id if isinstance(originator_id, UUID) else UUID(originator_id)
    # `uuid.bytes`, without the property's call (one per event sealed or opened).
    return uuid.int.to_bytes(16, "big") + version.to_bytes(8, "big")


# Plain decoding (`PydanticMapper.to_plain_event`): per event class, a function that checks the
# fields of decoded JSON the way the model would accept them, and returns them (None when unsure).
_Decode = Callable[[UUID, int, dict[str, Any]], dict[str, Any] | None]
_MISSING: Any = object()
# The only timestamps taken without the model: orjson's form of an aware datetime. Other forms the
# model may accept (a naive time, a date alone, "Z") go through it.
_TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d{6})?[+-]\d\d:\d\d", re.ASCII)
_plans: dict[str, tuple[str, type, _Decode] | None] = {}


def _plan_of(topic: str) -> tuple[str, type, _Decode] | None:
    """The class stored under `topic` and its plain decoder; None: the model decodes it."""
    if topic not in _plans:
        try:
            cls = resolve_topic(topic)
        except Exception:  # unknown: `_build` says so
            _plans[topic] = None
        else:
            decode = (
                _decoder(cls) if isinstance(cls, type) and issubclass(cls, DomainEvent) else None
            )
            _plans[topic] = None if decode is None else (cls.__name__, cls, decode)
    return _plans[topic]


def _decoder(cls: type[DomainEvent]) -> _Decode | None:
    """The plain decoder of `cls`, written out as straight-line code (a loop over the fields with
    a test per kind cost three times as much); None when a field or the model is of another kind.
    """
    found = cls.__pydantic_decorators__
    if found.validators or found.field_validators or found.root_validators:
        return None  # validators of its own: the model decodes it
    if found.model_validators or cls.model_config.get("extra") not in (None, "ignore"):
        return None
    # The required fields first, by subscript in one `try` (a missing one: the model says so);
    # then the optional ones, each with its default; then each value's test.
    required = ["    try:"]
    optional = ["    get = state.get"]
    tests: list[str] = []
    values = ["'originator_id': originator_id", "'originator_version': originator_version"]
    constants: dict[str, Any] = {"_MISSING": _MISSING, "_match": _TIMESTAMP.fullmatch}
    for i, (name, info) in enumerate(cls.model_fields.items()):
        if name in ("originator_id", "originator_version"):
            continue  # from the row's columns
        test = _test_of(info.annotation, f"v{i}")
        if test is None or info.metadata:
            return None  # a type these tests do not know, or constraints
        if info.is_required():
            required.append(f"        v{i} = state[{name!r}]")
        else:
            if not isinstance(info.default, str | int | float | None):
                return None  # a mutable default, which the model would copy
            constants[f"d{i}"] = info.default
            # A default is the model's, as is (it does not validate defaults).
            optional.append(f"    v{i} = get({name!r}, _MISSING)")
            tests += [f"    if v{i} is _MISSING: v{i} = d{i}", "    else:"]
            test = [f"    {line}" for line in test]
        tests += test
        values.append(f"{name!r}: v{i}")
    required += ["    except KeyError: return None"] if len(required) > 1 else []
    lines = [
        "def decode(originator_id, originator_version, state):",
        *(required if len(required) > 1 else []),
        *optional,
        *tests,
    ]
    lines.append(f"    return {{{', '.join(values)}}}")
    namespace = {**constants, "datetime": datetime}
    exec("\n".join(lines), namespace)  # our own code, written from the model's annotations
    return cast(_Decode, namespace["decode"])


def _test_of(annotation: Any, v: str) -> list[str] | None:
    """Lines checking the plain value `v` against a field's annotation (converting it as the model
    would), returning None from the decoder when it may not pass; None for other annotations."""
    time = [
        f"    if type({v}) is not str or not _match({v}): return None",
        f"    try: {v} = datetime.fromisoformat({v})",
        "    except ValueError: return None",  # February 30th: the model says what is wrong
    ]
    simple = {
        str: [f"    if type({v}) is not str: return None"],
        int: [f"    if type({v}) is not int: return None"],
        bool: [f"    if type({v}) is not bool: return None"],
        # The model takes an integer for a float, as a float.
        float: [
            f"    if type({v}) is int and -2**53 <= {v} <= 2**53: {v} = float({v})",
            f"    elif type({v}) is not float: return None",
        ],
        datetime: time,
    }
    if annotation in simple:
        return simple[annotation]
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Literal and all(type(a) in (str, int) for a in args):
        allowed = " or ".join(f"(type({v}) is {type(a).__name__} and {v} == {a!r})" for a in args)
        return [f"    if not ({allowed}): return None"]
    if origin in (Union, types.UnionType) and len(args) == 2 and type(None) in args:
        other = args[0] if args[1] is type(None) else args[1]
        if other is str:
            return [f"    if {v} is not None and type({v}) is not str: return None"]
        if other is datetime:
            return [f"    if {v} is not None:", *(f"    {line}" for line in time)]
        if get_origin(other) is dict and get_args(other) == (str, Any):
            return [f"    if {v} is not None and type({v}) is not dict: return None"]
    return None
