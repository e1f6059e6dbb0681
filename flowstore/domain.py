"""The event-sourced core: aggregates, their events, and the pure functions between them.

Three aggregates, all immutable pydantic models rebuilt from their events:

- `FlowInstance`: one user in one flow, id `instance_id(user_id, flow_id)` (uuid5, so a lookup is a key
  read and starting is idempotent). Every command on it, accepted or rejected, appends events.
- `FlowVersions`: every version of one flow definition, id `definition_id(flow_id)`.
- `FlowCatalog`: the ids of all flows ever defined (one aggregate), so listing flows is one key read.

Commands are pure functions `(aggregate, inputs, now) -> events`; `evolve(aggregate, event)` folds an
event into the aggregate. No I/O and no clock here: the service passes `now` (UTC) in.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal, TypeVar
from uuid import UUID, uuid5

from pydantic import BaseModel, ConfigDict

from flowstore.definitions import FlowDefinition
from flowstore.errors import (
    FlowError,
    InvalidStepError,
    InvalidTransitionError,
    PayloadValidationError,
)
from flowstore.models import FlowState, FlowStateHistory, FlowStatus, HistoryKind

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
    "history_entry",
    "instance_id",
    "merge_payload",
    "project",
]

_NAMESPACE = UUID("6f1c9f0e-3c1a-5b7e-9a51-0c3d3e7f1a42")


def instance_id(user_id: str, flow_id: str) -> UUID:
    """The id of a user's instance of a flow (deterministic, so reads are key lookups)."""
    # The unit separator cannot appear in ids by accident, so ("a:b", "c") != ("a", "b:c").
    return uuid5(_NAMESPACE, f"instance\x1f{user_id}\x1f{flow_id}")


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
        return self.status in (FlowStatus.ACTIVE, FlowStatus.COMPLETED)

    def to_state(self) -> FlowState:
        """The public view of a live instance."""
        assert self.step is not None
        return FlowState(
            flow=self.flow_id,
            step=self.step,
            previous=self.previous,
            service=self.service,
            entity_id=self.entity_id,
            ok=self.ok,
            message=self.message,
            payload=self.payload,
            user_id=self.user_id,
            status=self.status,
            version=self.version,
            definition_version=self.definition_version,
            started_at=self.started_at,
            updated_at=self.modified_on,
            completed_at=self.completed_at,
            expires_at=self.expires_at,
        )


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


def merge_payload(
    current: dict[str, Any] | None, payload: dict[str, Any] | None
) -> dict[str, Any] | None:
    """The model's `updatePayload`: top-level keys of `payload` over `current` (kept when None)."""
    if payload is None:
        return current
    return {**(current or {}), **payload}


def _enter_step(
    instance: FlowInstance | None,
    event: FlowStarted | StateOverridden | FlowHandedOver,
    *,
    ok: bool,
    payload: dict[str, Any] | None,
    new_run: bool,
) -> FlowInstance:
    """The instance after a start, reset, override or hand-over put it at `event.step`."""
    ts = event.timestamp
    fields: dict[str, Any] = {
        "version": event.originator_version,
        "modified_on": ts,
        "definition_version": event.definition_version,
        "status": FlowStatus.ACTIVE,
        "step": event.step,
        "service": event.service,
        "ok": ok,
        "payload": payload,
        "completed_at": None,
        "expires_at": event.expires_at,
        "erased": False,
        # A start begins with neither; an override or a hand-over says what they are.
        "previous": None if isinstance(event, FlowStarted) else event.previous,
        "entity_id": event.entity_id,
        "message": None if isinstance(event, FlowStarted) else event.message,
        "target": event.target,
    }
    if instance is None:
        return FlowInstance(
            id=event.originator_id,
            created_on=ts,
            user_id=event.user_id,
            flow_id=event.flow_id,
            started_at=ts,
            **fields,
        )
    started_at = ts if new_run else instance.started_at
    # The user id too: after an erasure the instance's old events read with a stand-in id.
    return instance.model_copy(
        update={**fields, "started_at": started_at, "user_id": event.user_id}
    )


def evolve(aggregate: Any, event: DomainEvent) -> Any:
    """Fold one event into its aggregate (None before the first event)."""
    ts = event.timestamp
    base = {"version": event.originator_version, "modified_on": ts}
    match event:
        case FlowStarted():
            return _enter_step(aggregate, event, ok=True, payload=None, new_run=True)
        case TransitionExecuted():
            merged = event.rules == 2
            return aggregate.model_copy(
                update={
                    **base,
                    "step": event.to_step,
                    "service": event.service,
                    "ok": event.ok,
                    "message": event.message,
                    "previous": event.previous,
                    "payload": merge_payload(aggregate.payload, event.payload)
                    if merged
                    else event.payload,
                    "expires_at": event.expires_at,
                }
            )
        case TransitionRejected():
            if event.rules == 2:  # the model: a refused transition leaves the state as it was
                return aggregate.model_copy(update=base)
            return aggregate.model_copy(update={**base, "ok": False})
        case FlowWentBack():
            return aggregate.model_copy(
                update={
                    **base,
                    "step": event.step,
                    "service": event.service,
                    "ok": True,
                    "message": None,
                    "previous": None,
                    "expires_at": event.expires_at,
                }
            )
        case FlowHandedOver():
            new_run = aggregate is None or not aggregate.is_live
            return _enter_step(
                aggregate, event, ok=event.ok, payload=event.payload, new_run=new_run
            )
        case FlowCompleted():
            return aggregate.model_copy(
                update={
                    **base,
                    "status": FlowStatus.COMPLETED,
                    "completed_at": ts,
                    "expires_at": None,
                }
            )
        case StateOverridden():
            # An override of an instance without state (new, cleared, expired) starts a run.
            new_run = aggregate is None or not aggregate.is_live
            return _enter_step(
                aggregate, event, ok=event.ok, payload=event.payload, new_run=new_run
            )
        case FlowMigrated():
            return aggregate.model_copy(
                update={
                    **base,
                    "definition_version": event.to_version,
                    "step": event.to_step,
                    "service": event.service,
                    "previous": event.previous,
                }
            )
        case FlowCleared() | FlowExpired() | FlowErased():
            status = FlowStatus.EXPIRED if isinstance(event, FlowExpired) else FlowStatus.CLEARED
            return aggregate.model_copy(
                update={
                    **base,
                    "erased": isinstance(event, FlowErased),
                    "status": status,
                    "step": None,
                    "service": None,
                    "payload": None,
                    "expires_at": None,
                    "previous": None,
                    "entity_id": None,
                    "message": None,
                    "target": None,
                }
            )
        case FlowDefined():
            definition = event.definition.model_copy(update={"version": event.version})
            if aggregate is None:
                return FlowVersions(
                    id=event.originator_id,
                    created_on=ts,
                    flow_id=event.flow_id,
                    definitions=(definition,),
                    deleted=False,
                    **base,
                )
            return aggregate.model_copy(
                update={
                    **base,
                    "definitions": (*aggregate.definitions, definition),
                    "deleted": False,
                }
            )
        case FlowDeleted():
            return aggregate.model_copy(update={**base, "deleted": True})
        case FlowListed():
            if aggregate is None:
                return FlowCatalog(
                    id=event.originator_id, created_on=ts, flow_ids=(event.flow_id,), **base
                )
            return aggregate.model_copy(
                update={**base, "flow_ids": (*aggregate.flow_ids, event.flow_id)}
            )
    msg = f"Unknown event type {type(event).__name__}"
    raise TypeError(msg)


def project(aggregate: TAggregate | None, events: Iterable[DomainEvent]) -> TAggregate | None:
    """Fold events into an aggregate: the projector the repository uses to rebuild aggregates."""
    for event in events:
        aggregate = evolve(aggregate, event)
    return aggregate


# Commands. Each returns the events to append (in order); none of them touches storage.


def _not_before(instance: FlowInstance | None, now: datetime) -> datetime:
    """`now`, or the instance's last event time if the clock has stepped back since.

    An instance's events are stamped in order whatever the wall clock does (an NTP step back, a
    VM restored), so no run completes before it started and no duration is negative.
    """
    if instance is None:
        return now
    return max(now, instance.modified_on)


def _expiry(definition: FlowDefinition, now: datetime, terminal: bool) -> datetime | None:
    if definition.ttl is None or terminal:
        return None
    return now + timedelta(seconds=definition.ttl)


def _instance_fields(
    user_id: str, flow_id: str, definition: FlowDefinition, iid: UUID, version: int, now: datetime
) -> dict[str, Any]:
    assert definition.version is not None, "definitions come from FlowVersions, versioned"
    return {
        "originator_id": iid,
        "originator_version": version,
        "timestamp": now,
        "user_id": user_id,
        "flow_id": flow_id,
        "definition_version": definition.version,
    }


def start_flow(
    instance: FlowInstance | None,
    definition: FlowDefinition,
    *,
    user_id: str,
    now: datetime,
    step: str | None = None,
    reason: Literal["start", "reset"] = "reset",
    service: str | None = None,
    entity_id: str | None = None,
) -> list[InstanceEvent]:
    """Start (or restart) a run at `step`, the initial step by default, on `definition`.

    Where the definition marks steps `initial`, only those and the initial step may be entered.
    `service` makes the run target that service (the state's service for the whole run).
    """
    now = _not_before(instance, now)
    target = step or definition.initial_step
    target_step = definition.step(target)
    if target_step is None or not definition.may_enter(target):
        assert definition.version is not None
        raise InvalidStepError(
            target,
            flow_id=definition.flow,
            definition_version=definition.version,
            entry_steps=None if target_step is None else definition.entry_steps(),
        )
    iid = instance_id(user_id, definition.flow)
    version = instance.version + 1 if instance else 1
    fields = _instance_fields(user_id, definition.flow, definition, iid, version, now)
    events: list[InstanceEvent] = [
        FlowStarted(
            **fields,
            reason=reason,
            from_step=instance.step if instance else None,
            step=target,
            service=service or target_step.service,
            expires_at=_expiry(definition, now, target_step.is_terminal),
            target=service or None,
            entity_id=entity_id,
        )
    ]
    if target_step.is_terminal:
        fields = {**fields, "originator_version": version + 1}
        events.append(FlowCompleted(**fields, step=target))
    return events


@dataclass(frozen=True)
class Decision:
    """The events a command appends, and the error to raise once they are saved (rejections)."""

    events: list[InstanceEvent]
    error: FlowError | None = None


def execute_transition(
    instance: FlowInstance,
    definition: FlowDefinition,
    *,
    transition: str,
    payload: dict[str, Any] | None,
    now: datetime,
    elapsed_ms: float,
    ok: bool = True,
    message: str | None = None,
) -> Decision:
    """Take `transition` from the instance's step, or record why it was refused.

    As in the model: the payload merges into the state's, `previous` is the step left when the
    transition is reversible, `ok` and `message` say how the step's work went; a refusal is recorded
    but leaves the state unchanged.
    """
    now = _not_before(instance, now)
    assert instance.step is not None
    assert instance.is_live
    fields = _instance_fields(
        instance.user_id, instance.flow_id, definition, instance.id, instance.version + 1, now
    )
    current = definition.step(instance.step)
    edge = current.transitions.get(transition) if current else None
    error: FlowError | None = None
    if edge is None:
        error = InvalidTransitionError(
            instance.step, transition, flow_id=instance.flow_id, user_id=instance.user_id
        )
    else:
        problem = edge.payload_problem(payload)
        if problem is not None:
            error = PayloadValidationError(
                f"Payload rejected by transition {transition!r} of step {instance.step!r}: "
                f"{problem}",
                transition=transition,
                step=instance.step,
                flow_id=instance.flow_id,
            )
    if error is not None:
        rejected = TransitionRejected(
            **fields,
            transition=transition,
            from_step=instance.step,
            payload=payload,
            error=error.message,
            error_code=error.code,
            elapsed_ms=elapsed_ms,
            rules=2,
        )
        return Decision([rejected], error)
    assert edge is not None
    target = definition.steps[edge.step]
    events: list[InstanceEvent] = [
        TransitionExecuted(
            **fields,
            transition=transition,
            from_step=instance.step,
            to_step=edge.step,
            service=instance.target or target.service,
            payload=payload,
            expires_at=_expiry(definition, now, target.is_terminal),
            elapsed_ms=elapsed_ms,
            ok=ok,
            message=message,
            previous=instance.step if edge.reversible else None,
            rules=2,
        )
    ]
    if target.is_terminal:
        events.append(
            FlowCompleted(**{**fields, "originator_version": instance.version + 2}, step=edge.step)
        )
    return Decision(events)


def override_state(
    instance: FlowInstance | None,
    definition: FlowDefinition,
    *,
    user_id: str,
    step: str,
    service: str | None,
    ok: bool,
    payload: dict[str, Any] | None,
    now: datetime,
    previous: str | None = None,
    entity_id: str | None = None,
    message: str | None = None,
) -> list[InstanceEvent]:
    """Set the instance's state as an administrator said, on `definition`.

    A live run keeps its target service (and so its service, unless `service` names another).
    """
    assert definition.version is not None
    now = _not_before(instance, now)
    target = definition.step(step)
    if target is None:
        raise InvalidStepError(step, flow_id=definition.flow, definition_version=definition.version)
    if previous is not None and definition.step(previous) is None:
        raise InvalidStepError(
            previous, flow_id=definition.flow, definition_version=definition.version
        )
    run_target = instance.target if instance is not None and instance.is_live else None
    version = instance.version + 1 if instance else 1
    iid = instance_id(user_id, definition.flow)
    fields = _instance_fields(user_id, definition.flow, definition, iid, version, now)
    events: list[InstanceEvent] = [
        StateOverridden(
            **fields,
            from_step=instance.step if instance else None,
            step=step,
            service=service or run_target or target.service,
            ok=ok,
            payload=payload,
            expires_at=_expiry(definition, now, target.is_terminal),
            previous=previous,
            entity_id=entity_id,
            message=message,
            target=run_target,
        )
    ]
    if target.is_terminal:
        events.append(FlowCompleted(**{**fields, "originator_version": version + 1}, step=step))
    return events


def go_back(
    instance: FlowInstance, definition: FlowDefinition, *, now: datetime
) -> list[InstanceEvent]:
    """Return an active instance to its previous step (`InvalidTransitionError` without one)."""
    now = _not_before(instance, now)
    assert instance.step is not None
    back_to = definition.step(instance.previous) if instance.previous is not None else None
    if instance.status is not FlowStatus.ACTIVE or back_to is None:
        why = (
            "the run is complete" if instance.status is FlowStatus.COMPLETED else "no previous step"
        )
        raise InvalidTransitionError(
            instance.step,
            "back",
            flow_id=instance.flow_id,
            user_id=instance.user_id,
            reason=why,
        )
    fields = _instance_fields(
        instance.user_id, instance.flow_id, definition, instance.id, instance.version + 1, now
    )
    return [
        FlowWentBack(
            **fields,
            from_step=instance.step,
            step=back_to.step,
            service=instance.target or back_to.service,
            expires_at=_expiry(definition, now, back_to.is_terminal),
        )
    ]


def hand_over(
    instance: FlowInstance | None,
    definition: FlowDefinition,
    state: FlowState,
    *,
    user_id: str,
    sender: str | None,
    now: datetime,
) -> list[InstanceEvent]:
    """Make `state` (read from a state token for `definition`) the user's state in the flow."""
    now = _not_before(instance, now)
    assert definition.version is not None
    step = definition.step(state.step)
    if step is None:
        raise InvalidStepError(
            state.step, flow_id=definition.flow, definition_version=definition.version
        )
    version = instance.version + 1 if instance else 1
    iid = instance_id(user_id, definition.flow)
    fields = _instance_fields(user_id, definition.flow, definition, iid, version, now)
    target = state.service or None  # the model's fresh state has service "": no target
    events: list[InstanceEvent] = [
        FlowHandedOver(
            **fields,
            from_step=instance.step if instance else None,
            step=step.step,
            previous=state.previous,
            service=target or step.service,
            target=target,
            sender=sender if sender is not None else target,
            ok=state.ok,
            entity_id=state.entity_id,
            message=state.message,
            payload=state.payload,
            expires_at=_expiry(definition, now, step.is_terminal),
        )
    ]
    if step.is_terminal:
        events.append(
            FlowCompleted(**{**fields, "originator_version": version + 1}, step=step.step)
        )
    return events


def end_flow(
    instance: FlowInstance, *, now: datetime, kind: Literal["clear", "expiry", "erasure"]
) -> list[InstanceEvent]:
    """Clear or expire a live instance (its history stays), or erase any instance (history too)."""
    now = _not_before(instance, now)
    fields = {
        "originator_id": instance.id,
        "originator_version": instance.version + 1,
        "timestamp": now,
        "user_id": instance.user_id,
        "flow_id": instance.flow_id,
        "definition_version": instance.definition_version,
        "from_step": instance.step,
    }
    event = {"clear": FlowCleared, "expiry": FlowExpired, "erasure": FlowErased}[kind]
    return [event(**fields)]


def migration_target(
    instance: FlowInstance, definition: FlowDefinition, step_map: Mapping[str, str]
) -> tuple[str | None, str | None]:
    """Where an active instance's step goes in `definition`: (step, None), or (None, why not).

    An explicit `step_map` entry wins (so a kept step can still be redirected); otherwise a step
    that exists in the target version maps to itself.
    """
    assert instance.step is not None
    target = step_map.get(instance.step, instance.step)
    if definition.step(target) is not None:
        return target, None
    if instance.step in step_map:
        return None, f"step_map sends {instance.step!r} to {target!r}, which is not a step"
    return None, (
        f"step {instance.step!r} does not exist in version {definition.version} "
        "and step_map does not map it"
    )


def migrate_instance(
    instance: FlowInstance, definition: FlowDefinition, *, to_step: str, now: datetime
) -> list[InstanceEvent]:
    """Move an active instance to `definition` (another version) at `to_step`.

    Landing on a terminal step completes the run, as reaching one by a transition would.
    """
    now = _not_before(instance, now)
    assert instance.status is FlowStatus.ACTIVE
    assert instance.step is not None
    assert definition.version is not None
    target = definition.step(to_step)
    if target is None:
        raise InvalidStepError(
            to_step, flow_id=definition.flow, definition_version=definition.version
        )
    version = instance.version + 1
    fields = _instance_fields(
        instance.user_id, instance.flow_id, definition, instance.id, version, now
    )
    previous = instance.previous if instance.previous in definition.steps else None
    events: list[InstanceEvent] = [
        FlowMigrated(
            **fields,
            from_version=instance.definition_version,
            to_version=definition.version,
            from_step=instance.step,
            to_step=to_step,
            service=instance.target or target.service,
            previous=previous,
        )
    ]
    if target.is_terminal:
        events.append(FlowCompleted(**{**fields, "originator_version": version + 1}, step=to_step))
    return events


def define_flow(
    versions: FlowVersions | None, definition: FlowDefinition, *, now: datetime
) -> list[DomainEvent]:
    """Record `definition` as the next version of its flow (version 1 for a new flow)."""
    version = len(versions.definitions) + 1 if versions else 1
    return [
        FlowDefined(
            originator_id=definition_id(definition.flow),
            originator_version=versions.version + 1 if versions else 1,
            timestamp=now,
            flow_id=definition.flow,
            version=version,
            definition=definition.model_copy(update={"version": version}),
        )
    ]


def delete_flow(versions: FlowVersions, *, now: datetime) -> list[DomainEvent]:
    """Mark the flow deleted."""
    return [
        FlowDeleted(
            originator_id=versions.id,
            originator_version=versions.version + 1,
            timestamp=now,
            flow_id=versions.flow_id,
        )
    ]


def list_flow(catalog: FlowCatalog | None, flow_id: str, *, now: datetime) -> list[DomainEvent]:
    """Add a flow id to the catalog, unless it is there already."""
    if catalog is not None and flow_id in catalog.flow_ids:
        return []
    return [
        FlowListed(
            originator_id=CATALOG_ID,
            originator_version=catalog.version + 1 if catalog else 1,
            timestamp=now,
            flow_id=flow_id,
        )
    ]


def history_entry(event: DomainEvent) -> FlowStateHistory | None:
    """The history row an instance event stands for (None for events that are not commands)."""
    if not isinstance(event, InstanceEvent) or isinstance(event, FlowCompleted):
        return None
    common: dict[str, Any] = {
        "id": f"{event.originator_id}:{event.originator_version}",
        "user_id": event.user_id,
        "flow_id": event.flow_id,
        "timestamp": event.timestamp,
        "metadata": {"definition_version": event.definition_version},
    }
    match event:
        case FlowStarted():
            kind = HistoryKind.START if event.reason == "start" else HistoryKind.RESET
            return FlowStateHistory(
                **common,
                kind=kind,
                from_step=event.from_step,
                to_step=event.step,
                transition=None,
                success=True,
            )
        case TransitionExecuted():
            common["metadata"] |= {"elapsed_ms": event.elapsed_ms, "service": event.service}
            if event.previous is not None:
                common["metadata"]["previous"] = event.previous
            return FlowStateHistory(
                **common,
                kind=HistoryKind.TRANSITION,
                from_step=event.from_step,
                to_step=event.to_step,
                transition=event.transition,
                payload=event.payload,
                success=True,
                ok=event.ok,
                message=event.message,
            )
        case TransitionRejected():
            common["metadata"] |= {"elapsed_ms": event.elapsed_ms, "error_code": event.error_code}
            return FlowStateHistory(
                **common,
                kind=HistoryKind.TRANSITION,
                from_step=event.from_step,
                to_step=event.from_step,  # rejected: the user stays where they were
                transition=event.transition,
                payload=event.payload,
                success=False,
                error=event.error,
            )
        case StateOverridden():
            common["metadata"] |= {"service": event.service, "ok": event.ok}
            return FlowStateHistory(
                **common,
                kind=HistoryKind.OVERRIDE,
                from_step=event.from_step,
                to_step=event.step,
                transition=None,
                payload=event.payload,
                success=True,
                ok=event.ok,
                message=event.message,
            )
        case FlowWentBack():
            common["metadata"] |= {"service": event.service}
            return FlowStateHistory(
                **common,
                kind=HistoryKind.BACK,
                from_step=event.from_step,
                to_step=event.step,
                transition=None,
                success=True,
                ok=True,
            )
        case FlowHandedOver():
            common["metadata"] |= {"service": event.service, "sender": event.sender}
            if event.previous is not None:
                common["metadata"]["previous"] = event.previous
            return FlowStateHistory(
                **common,
                kind=HistoryKind.HANDOFF,
                from_step=event.from_step,
                to_step=event.step,
                transition=None,
                payload=event.payload,
                success=True,
                ok=event.ok,
                message=event.message,
            )
        case FlowMigrated():
            common["metadata"] |= {"from_version": event.from_version, "service": event.service}
            return FlowStateHistory(
                **common,
                kind=HistoryKind.MIGRATION,
                from_step=event.from_step,
                to_step=event.to_step,
                transition=None,
                success=True,
            )
        case FlowCleared() | FlowExpired():
            return FlowStateHistory(
                **common,
                kind=HistoryKind.CLEAR if isinstance(event, FlowCleared) else HistoryKind.EXPIRY,
                from_step=event.from_step,
                to_step=None,
                transition=None,
                success=True,
            )
    return None
