"""The event-sourced core: aggregates, their events, and how events fold into aggregates.

Three aggregates, all immutable pydantic models rebuilt from their events:

- `FlowInstance`: one user in one flow, id `instance_id(user_id, flow_id)` (uuid5, so a lookup is a key
  read and starting is idempotent). Every command on it, accepted or rejected, appends events.
- `FlowVersions`: every version of one flow definition, id `definition_id(flow_id)`.
- `FlowCatalog`: the ids of all flows ever defined (one aggregate), so listing flows is one key read.

`evolve(aggregate, event)` folds an event into the aggregate; `project` folds many. What a command
decides (`(aggregate, inputs, now) -> events`) is in `flowstore.decisions`; the history row an event
stands for, in `flowstore.projections.ops`; the public `FlowState` of an instance, in
`flowstore.views`. No I/O and no clock here.

Events are stored under their topic, `flowstore.domain:<ClassName>`: an event class stays here (or is
registered under its old topic) so that old logs still decode.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Iterable
from datetime import datetime
from typing import Any, Literal, TypeVar
from uuid import UUID, uuid5

from pydantic import BaseModel, ConfigDict

from flowstore.definitions import FlowDefinition
from flowstore.models import FlowStatus

__all__ = [
    "CATALOG_ID",
    "DomainEvent",
    "FlowCatalog",
    "FlowCleared",
    "FlowCompleted",
    "FlowDefined",
    "FlowDeleted",
    "FlowErased",
    "FlowExpired",
    "FlowHandedOver",
    "FlowInstance",
    "FlowListed",
    "FlowMigrated",
    "FlowStarted",
    "FlowVersions",
    "FlowWentBack",
    "InstanceEvent",
    "StateOverridden",
    "TransitionExecuted",
    "TransitionRejected",
    "definition_id",
    "evolve",
    "id_text",
    "instance_id",
    "merge_payload",
    "project",
]

_NAMESPACE = UUID("6f1c9f0e-3c1a-5b7e-9a51-0c3d3e7f1a42")


def instance_id(user_id: str, flow_id: str) -> UUID:
    """The id of a user's instance of a flow (deterministic, so reads are key lookups)."""
    return _instance_id(user_id, flow_id)


@functools.lru_cache(maxsize=65_536)
def _instance_id(user_id: str, flow_id: str) -> UUID:
    # Remembered: every command and every read needs its instance's id, and a uuid5 (a SHA-1
    # and a UUID, 3-6 µs) is worth keeping (issue 17: a warm get_flow_state's p50 went from
    # 79-82 to 72-73 µs).
    # Concatenated, not formatted: a `str` subclass equal to "ann" (a str Enum member, whose
    # format is "E.A") is the same cache key as "ann", so it must make the same id whichever
    # comes first; its events hold "ann" too (pydantic validates it to its value).
    # The unit separator cannot appear in ids by accident, so ("a:b", "c") != ("a", "b:c").
    return uuid5(_NAMESPACE, "instance\x1f" + user_id + "\x1f" + flow_id)


def definition_id(flow_id: str) -> UUID:
    """The id of the aggregate holding every version of a flow definition."""
    return uuid5(_NAMESPACE, f"definition\x1f{flow_id}")


CATALOG_ID = uuid5(_NAMESPACE, "catalog")


class DomainEvent(BaseModel):
    """An immutable fact; the fields the eventsourcing library needs plus the event's own."""

    model_config = ConfigDict(frozen=True)

    originator_id: UUID
    originator_version: int
    timestamp: datetime


class InstanceEvent(DomainEvent):
    """Something that happened to one user's flow; carries what readers need without joins."""

    user_id: str
    flow_id: str
    definition_version: int


class FlowStarted(InstanceEvent):
    """A run began at `step`: by `reset_flow` (reason reset) or by a first transition (start)."""

    reason: Literal["start", "reset"]
    from_step: str | None
    step: str
    service: str
    expires_at: datetime | None
    target: str | None = None
    """The run's target service (`service` then is this one for the whole run), or None."""
    entity_id: str | None = None
    """The entity the run is about, or None."""


class TransitionExecuted(InstanceEvent):
    """The user took `transition` from `from_step` to `to_step`."""

    transition: str
    from_step: str
    to_step: str
    service: str
    payload: dict[str, Any] | None
    """This transition's own payload (merged into the state's under rules 2, replacing it under 1)."""
    expires_at: datetime | None
    elapsed_ms: float
    ok: bool = True
    """Whether the step's work succeeded (`execute_transition(ok=False)`: reached, but failed)."""
    message: str | None = None
    previous: str | None = None
    """`from_step` when the transition is reversible, else None."""
    rules: Literal[1, 2] = 1
    """1: decided before the OwlMeans model (the payload replaced the state's); 2: merged into it."""


class TransitionRejected(InstanceEvent):
    """An attempted transition was refused (not offered here, or its payload failed the schema)."""

    transition: str
    from_step: str
    payload: dict[str, Any] | None
    error: str
    error_code: str
    elapsed_ms: float
    rules: Literal[1, 2] = 1
    """1: decided before the OwlMeans model (set the state's ok to False); 2: leaves it unchanged."""


class FlowCompleted(InstanceEvent):
    """The instance reached a terminal step (saved together with the event that got it there)."""

    step: str


class StateOverridden(InstanceEvent):
    """An administrator set the instance's state (`set_flow_state`)."""

    from_step: str | None
    step: str
    service: str
    ok: bool
    payload: dict[str, Any] | None
    expires_at: datetime | None
    previous: str | None = None
    entity_id: str | None = None
    message: str | None = None
    target: str | None = None
    """The run's target service kept from the run it overrides (None when it had none)."""


class FlowWentBack(InstanceEvent):
    """The user went back from `from_step` to the state's previous step, `step` (`go_back`)."""

    from_step: str
    step: str
    service: str
    expires_at: datetime | None


class FlowHandedOver(InstanceEvent):
    """Another service handed the user's flow over as a state token (`adopt_state_token`).

    The state becomes the token's: `step`, `previous`, `ok`, `message`, `entity_id`, `payload`, and
    `target` (the token's service) as the run's target service when it names one.
    """

    from_step: str | None
    step: str
    previous: str | None
    service: str
    target: str | None
    sender: str | None
    """The service that sent the token, when the caller said (else the token's service)."""
    ok: bool
    entity_id: str | None
    message: str | None
    payload: dict[str, Any] | None
    expires_at: datetime | None


class FlowCleared(InstanceEvent):
    """The instance's state was cleared; its history stays."""

    from_step: str | None


class FlowExpired(InstanceEvent):
    """The instance stayed idle past its definition's ttl and was purged."""

    from_step: str | None


class FlowErased(InstanceEvent):
    """The user was erased (`FlowStore.erase_user`): the instance and its history read as absent.

    Appended while the user's key still exists, then the key is shredded: from then on this event,
    like every earlier one of the user, reads with a stand-in user id and no payload.
    """

    from_step: str | None


class FlowMigrated(InstanceEvent):
    """An active instance moved to another definition version (`definition_version` is the new one).

    `to_step` is `from_step` when that step still exists, else where the migration's step map sent
    it. The instance keeps its run, payload, ok flag and expiry; its service becomes the target
    step's service in the new version.
    """

    from_version: int
    to_version: int
    from_step: str
    to_step: str
    service: str
    previous: str | None = None
    """The state's previous step in the target version (None when it has none there)."""


class FlowDefined(DomainEvent):
    """A new version of a flow definition."""

    flow_id: str
    version: int
    definition: FlowDefinition


class FlowDeleted(DomainEvent):
    """The flow was deleted: no new runs or transitions; existing history stays readable."""

    flow_id: str


class FlowListed(DomainEvent):
    """A flow id was added to the catalog."""

    flow_id: str


_LIVE = (FlowStatus.ACTIVE, FlowStatus.COMPLETED)
"""The statuses of an instance that has a state (`FlowInstance.is_live`)."""


class _Aggregate(BaseModel):
    model_config = ConfigDict(frozen=True)

    id: UUID
    version: int
    created_on: datetime
    modified_on: datetime


class FlowInstance(_Aggregate):
    """One user's run through one flow, as its events left it."""

    user_id: str
    flow_id: str
    definition_version: int
    status: FlowStatus
    step: str | None
    service: str | None
    ok: bool
    payload: dict[str, Any] | None
    started_at: datetime | None
    completed_at: datetime | None
    expires_at: datetime | None
    erased: bool = False
    """The user was erased; a new run (the same user id coming back) sets it back to False."""
    previous: str | None = None
    entity_id: str | None = None
    message: str | None = None
    target: str | None = None
    """The run's target service: when set, `service` is this for the whole run."""

    @property
    def is_live(self) -> bool:
        """True when the user has a state (active or completed), False when cleared or expired."""
        # A module constant: `FlowStatus.ACTIVE` goes through the enum's class lookup, four
        # times the cost of the test (every command asks this two or three times).
        return self.status in _LIVE


class FlowVersions(_Aggregate):
    """Every version of one flow definition; versions are numbered from 1 and never change."""

    flow_id: str
    definitions: tuple[FlowDefinition, ...]
    deleted: bool

    @property
    def latest(self) -> FlowDefinition:
        """The newest version."""
        return self.definitions[-1]

    def get(self, version: int | None) -> FlowDefinition | None:
        """Version `version` (the newest when None), or None if there is no such version."""
        if version is None:
            return self.latest
        if 1 <= version <= len(self.definitions):
            return self.definitions[version - 1]
        return None


class FlowCatalog(_Aggregate):
    """The ids of every flow ever defined, in order of creation."""

    flow_ids: tuple[str, ...]


TAggregate = TypeVar("TAggregate", bound=_Aggregate)
TModel = TypeVar("TModel", bound=BaseModel)

_new = object.__new__
# The setters of the four slots every pydantic model has (`BaseModel.__slots__`: its `__dict__`,
# fields set, extra and private values), which subclasses inherit and do not redefine: called
# straight, each costs half what `object.__setattr__(model, name, value)` does, which looks the
# name up in the class's attributes first (four per model, three models per transition).
_set_dict = BaseModel.__dict__["__dict__"].__set__
_set_fields_set = BaseModel.__dict__["__pydantic_fields_set__"].__set__
_set_extra = BaseModel.__dict__["__pydantic_extra__"].__set__
_set_private = BaseModel.__dict__["__pydantic_private__"].__set__
_SLOTS = ("__dict__", "__pydantic_fields_set__", "__pydantic_extra__", "__pydantic_private__")


def known_good(cls: type[TModel], fields: dict[str, Any]) -> TModel:
    """A `cls` holding `fields` as given, unvalidated: for values that are valid by construction.

    On the write path's hot spots only, each caller saying why every value is already of its
    field's type: pydantic's validation would merely copy such values (and `model_construct`, which
    fills defaults and resolves aliases, costs twice what validation does). `fields` must name every
    field, in any order; the model must be frozen and have no private attributes.
    """
    names = _FIELD_NAMES.get(cls) or _field_names(cls)
    # As many as the fields (comparing the names costs more than the rest of this function): a
    # misspelt one leaves a field unset, which its first reader, or `model_dump`, finds at once.
    assert len(fields) == len(names), set(fields) ^ names
    model = _new(cls)
    _set_dict(model, fields)
    _set_fields_set(model, names)  # shared: see `_FieldNames`
    _set_extra(model, None)
    _set_private(model, None)
    return model


class _FieldNames(set[str]):
    """Every field name of one model class: the set of fields set of each model `known_good`
    builds, one for all of them.

    A set of each model's own (of twenty names, a kilobyte) was a third of the cost of building
    one, and as much again to free it. pydantic changes a model's set only on a mutable model (which
    `known_good` does not build) or on a copy it makes first (`model_copy`, `copy.copy`: a plain
    set of the copy's own here); changing it in place would change every such model's, so it
    refuses to change.
    """

    __slots__ = ()

    def __copy__(self) -> set[str]:
        return set(self)

    def __deepcopy__(self, memo: dict[int, Any]) -> set[str]:
        return set(self)

    def __reduce__(self) -> tuple[type[set[str]], tuple[list[str]]]:
        return set, (list(self),)  # a pickled model unpickles with a plain set of its own


def _refuse(self: _FieldNames, *args: Any) -> None:
    raise TypeError("the field names of models built by known_good are shared: copy them first")


for _name in (
    "add",
    "clear",
    "discard",
    "pop",
    "remove",
    "update",
    "difference_update",
    "intersection_update",
    "symmetric_difference_update",
    "__ior__",
    "__iand__",
    "__isub__",
    "__ixor__",
):
    # Set after the class: written in it, each would need the signature of set's method.
    setattr(_FieldNames, _name, _refuse)


_FIELD_NAMES: dict[type[BaseModel], _FieldNames] = {}


def _field_names(cls: type[BaseModel]) -> _FieldNames:
    """The names of the fields of a model `known_good` may build (once per class)."""
    assert cls.model_config.get("frozen"), "a mutable model would change the shared names"
    assert not cls.__private_attributes__
    assert not cls.__pydantic_post_init__
    # `known_good` sets BaseModel's own slots: a class whose MRO put others first would differ.
    assert all(inspect.getattr_static(cls, slot) is BaseModel.__dict__[slot] for slot in _SLOTS), (
        "a model class with slots of its own"
    )
    names = _FIELD_NAMES[cls] = _FieldNames(cls.__pydantic_fields__)
    return names


_ID_TEXTS: dict[int, str] = {}
"""Aggregate ids' text by the UUID's number (`id_text`)."""


def id_text(originator_id: UUID | str) -> str:
    """An aggregate id's text, `str(originator_id)`: cached by the UUID's number, since a UUID's
    `str` (and its hash, for a cache keyed by the UUID) is a microsecond of Python, and an
    instance's events come by the dozen (a rebuild's page, a live batch, a publisher's page),
    each decoded to a new but equal UUID."""
    if type(originator_id) is not UUID:
        return str(originator_id)
    number = originator_id.int
    found = _ID_TEXTS.get(number)
    if found is None:
        if len(_ID_TEXTS) >= 8192:
            _ID_TEXTS.clear()
        found = _ID_TEXTS[number] = str(originator_id)
    return found


def merge_payload(
    current: dict[str, Any] | None, payload: dict[str, Any] | None
) -> dict[str, Any] | None:
    """The model's `updatePayload`: top-level keys of `payload` over `current` (kept when None)."""
    if payload is None:
        return current
    return {**(current or {}), **payload}


_CLEARED = {
    "step": None,
    "service": None,
    "payload": None,
    "expires_at": None,
    "previous": None,
    "entity_id": None,
    "message": None,
    "target": None,
}
"""What clearing, expiring or erasing an instance empties."""


def _enter_step(
    fields: dict[str, Any] | None,
    event: FlowStarted | StateOverridden | FlowHandedOver,
    *,
    ok: bool,
    payload: dict[str, Any] | None,
    new_run: bool,
) -> dict[str, Any]:
    """The instance's fields after a start, reset, override or hand-over put it at `event.step`."""
    ts = event.timestamp
    if fields is None:
        fields = dict.fromkeys(FlowInstance.__pydantic_fields__)  # in field order; all set here
        fields.update(id=event.originator_id, created_on=ts, flow_id=event.flow_id)
    fields.update(
        {
            "version": event.originator_version,
            "modified_on": ts,
            # The user id too: after an erasure the instance's old events read with a stand-in id.
            "user_id": event.user_id,
            "definition_version": event.definition_version,
            "status": FlowStatus.ACTIVE,
            "step": event.step,
            "service": event.service,
            "ok": ok,
            "payload": payload,
            "started_at": ts if new_run else fields["started_at"],
            "completed_at": None,
            "expires_at": event.expires_at,
            "erased": False,
            # A start begins with neither; an override or a hand-over says what they are.
            "previous": None if isinstance(event, FlowStarted) else event.previous,
            "entity_id": event.entity_id,
            "message": None if isinstance(event, FlowStarted) else event.message,
            "target": event.target,
        }
    )
    return fields


def _fold(kind: type[_Aggregate] | None, fields: dict[str, Any] | None, event: DomainEvent) -> Any:
    """Fold one event into an aggregate's fields (None before its first event), in place.

    Returns the aggregate's class and its fields (a new dict when the event created it).
    """
    # Each `isinstance` of an event goes through pydantic's ABCMeta (60-90 ns): the usual event,
    # a transition, is told by its type alone.
    if type(event) is TransitionExecuted or isinstance(event, InstanceEvent):
        return FlowInstance, _fold_instance(fields, event)
    ts = event.timestamp
    base = {"version": event.originator_version, "modified_on": ts}
    match event:
        case FlowDefined():
            definition = event.definition.model_copy(update={"version": event.version})
            if fields is None:
                return FlowVersions, {
                    **_created(event),
                    "flow_id": event.flow_id,
                    "definitions": (definition,),
                    "deleted": False,
                }
            fields.update(base, definitions=(*fields["definitions"], definition), deleted=False)
        case FlowDeleted():
            assert fields is not None
            fields.update(base, deleted=True)
        case FlowListed():
            if fields is None:
                return FlowCatalog, {**_created(event), "flow_ids": (event.flow_id,)}
            fields.update(base, flow_ids=(*fields["flow_ids"], event.flow_id))
        case _:
            msg = f"Unknown event type {type(event).__name__}"
            raise TypeError(msg)
    return kind, fields


def _created(event: DomainEvent) -> dict[str, Any]:
    """The fields every aggregate gets from the event that creates it."""
    return {
        "id": event.originator_id,
        "version": event.originator_version,
        "created_on": event.timestamp,
        "modified_on": event.timestamp,
    }


def _fold_instance(fields: dict[str, Any] | None, event: InstanceEvent) -> dict[str, Any]:
    """`_fold` for the events of a `FlowInstance`."""
    if type(event) is not TransitionExecuted:  # (a transition skips three tests: see `_fold`)
        match event:
            case FlowStarted():
                return _enter_step(fields, event, ok=True, payload=None, new_run=True)
            case StateOverridden() | FlowHandedOver():
                # An override or hand-over of an instance without state (new, cleared, expired)
                # starts a run.
                live = fields is not None and fields["status"] in _LIVE
                return _enter_step(
                    fields, event, ok=event.ok, payload=event.payload, new_run=not live
                )
    assert fields is not None, f"{type(event).__name__} before the instance started"
    fields["version"] = event.originator_version
    fields["modified_on"] = event.timestamp
    match event:
        case TransitionExecuted():
            # Read from the event's dict: an attribute of a pydantic model goes through its
            # `__getattr__` hook, twice the cost (the usual event, nine fields).
            values = event.__dict__
            payload = values["payload"]
            fields["step"] = values["to_step"]
            fields["service"] = values["service"]
            fields["ok"] = values["ok"]
            fields["message"] = values["message"]
            fields["previous"] = values["previous"]
            fields["payload"] = (
                merge_payload(fields["payload"], payload) if values["rules"] == 2 else payload
            )
            fields["expires_at"] = values["expires_at"]
        case TransitionRejected():
            if event.rules != 2:  # 2, the model: a refused transition leaves the state as it was
                fields["ok"] = False
        case FlowWentBack():
            fields.update(
                step=event.step,
                service=event.service,
                ok=True,
                message=None,
                previous=None,
                expires_at=event.expires_at,
            )
        case FlowCompleted():
            fields.update(
                status=FlowStatus.COMPLETED, completed_at=event.timestamp, expires_at=None
            )
        case FlowMigrated():
            fields.update(
                definition_version=event.to_version,
                step=event.to_step,
                service=event.service,
                previous=event.previous,
            )
        case FlowCleared() | FlowExpired() | FlowErased():
            expired = isinstance(event, FlowExpired)
            fields.update(_CLEARED)
            fields["erased"] = isinstance(event, FlowErased)
            fields["status"] = FlowStatus.EXPIRED if expired else FlowStatus.CLEARED
        case _:
            msg = f"Unknown event type {type(event).__name__}"
            raise TypeError(msg)
    return fields


def evolve(aggregate: Any, event: DomainEvent) -> Any:
    """Fold one event into its aggregate (None before the first event)."""
    return project(aggregate, (event,))


def project(aggregate: TAggregate | None, events: Iterable[DomainEvent]) -> TAggregate | None:
    """Fold events into an aggregate: the projector the repository uses to rebuild aggregates.

    The aggregate is copied once, however many events there are: the events are folded into one
    dict of its fields, which becomes the new aggregate at the end.
    """
    kind: type[_Aggregate] | None = None if aggregate is None else type(aggregate)
    fields: dict[str, Any] | None = None
    for event in events:
        if fields is None and aggregate is not None:
            fields = dict(aggregate.__dict__)
        kind, fields = _fold(kind, fields, event)
    if fields is None:
        return aggregate  # no events
    assert kind is not None
    # Every value is an event's (validated when it was decoded from the log, or built by a
    # decision from checked inputs: `flowstore.decisions`) or the aggregate's own, and is stored
    # as the field's type already: validating the new aggregate would only copy them.
    return known_good(kind, fields)  # type: ignore[return-value]  # (a `cast` is a call)
