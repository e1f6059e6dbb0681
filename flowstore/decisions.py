"""The commands' decisions: pure functions `(aggregate, inputs, now) -> events` to append.

Each takes the aggregate as its events left it (`flowstore.domain`) and returns the events a command
appends, in order, or raises a `FlowError` and appends nothing; a refused transition is a `Decision`
that carries both its event and the error. No I/O and no clock: the service passes `now` (UTC) in.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any, Literal, NamedTuple
from uuid import UUID

from flowstore.definitions import FlowDefinition
from flowstore.domain import (
    CATALOG_ID,
    DomainEvent,
    FlowCatalog,
    FlowCleared,
    FlowCompleted,
    FlowDefined,
    FlowDeleted,
    FlowErased,
    FlowExpired,
    FlowHandedOver,
    FlowInstance,
    FlowListed,
    FlowMigrated,
    FlowStarted,
    FlowVersions,
    FlowWentBack,
    InstanceEvent,
    StateOverridden,
    TransitionExecuted,
    TransitionRejected,
    definition_id,
    instance_id,
    known_good,
)
from flowstore.errors import (
    FlowError,
    InvalidStepError,
    InvalidTransitionError,
    PayloadValidationError,
)
from flowstore.models import FlowState, FlowStatus

__all__ = [
    "Decision",
    "define_flow",
    "delete_flow",
    "end_flow",
    "execute_transition",
    "go_back",
    "hand_over",
    "list_flow",
    "migrate_instance",
    "migration_target",
    "override_state",
    "start_flow",
]


def _not_before(instance: FlowInstance | None, now: datetime) -> datetime:
    """`now`, or the instance's last event time if the clock has stepped back since.

    An instance's events are stamped in order whatever the wall clock does (an NTP step back, a
    VM restored), so no run completes before it started and no duration is negative.
    """
    if instance is None:
        return now
    last = instance.modified_on
    return now if now >= last else last  # `max`, without building its arguments' tuple


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


class Decision(NamedTuple):
    """The events a command appends, and the error to raise once they are saved (rejections).

    A named tuple: immutable, and built in half the time of a frozen dataclass (one per command).
    """

    events: list[InstanceEvent]
    error: FlowError | None = None


_decision = tuple.__new__
"""`_decision(Decision, (events, error))` is `Decision(events, error)` without the named tuple's
generated `__new__` (a Python call: half the cost, once per transition)."""


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
    but leaves the state unchanged. The caller has checked `transition` (`inputs.require_id`),
    `payload` (`inputs.check_payload`, which also made it the caller's own copy), `ok` (a bool)
    and `message` (`inputs.check_message`): the events are built from them unvalidated.
    """
    now = _not_before(instance, now)
    assert instance.step is not None
    assert instance.is_live
    # Every field of the events below is valid by construction, so they are built without
    # pydantic's validation (`known_good`), which would only copy the values: the ids, versions,
    # steps and services come from the instance and its definition (validated aggregates), `now`
    # from the store's clock (checked to tell aware datetimes when the store opened, and compared
    # with the instance's last time just above), the request's values were checked by the caller
    # (see above), the error's text and code are the error's own, and the rest is computed here.
    step = instance.step
    current = definition.steps.get(step)  # (`definition.step`, a call less)
    edge = current.transitions.get(transition) if current else None
    error: FlowError | None = None
    if edge is None:
        error = InvalidTransitionError(
            step, transition, flow_id=instance.flow_id, user_id=instance.user_id
        )
    else:
        problem = edge.payload_problem(payload)
        if problem is not None:
            error = PayloadValidationError(
                f"Payload rejected by transition {transition!r} of step {step!r}: {problem}",
                transition=transition,
                step=step,
                flow_id=instance.flow_id,
            )
    fields = _instance_fields(
        instance.user_id, instance.flow_id, definition, instance.id, instance.version + 1, now
    )
    if error is not None:
        fields.update(
            transition=transition,
            from_step=step,
            payload=payload,
            error=error.message,
            error_code=error.code,
            elapsed_ms=elapsed_ms,
            rules=2,
        )
        return _decision(Decision, ([known_good(TransitionRejected, fields)], error))
    assert edge is not None
    to_step = edge.step
    target = definition.steps[to_step]
    terminal = target.is_terminal
    # Item by item rather than `update` with keywords, which builds a dict of them first (every
    # transition passes here).
    fields["transition"] = transition
    fields["from_step"] = step
    fields["to_step"] = to_step
    fields["service"] = instance.target or target.service
    fields["payload"] = payload
    fields["expires_at"] = _expiry(definition, now, terminal)
    fields["elapsed_ms"] = elapsed_ms
    fields["ok"] = ok
    fields["message"] = message
    fields["previous"] = step if edge.reversible else None
    fields["rules"] = 2
    executed = known_good(TransitionExecuted, fields)
    if not terminal:
        return _decision(Decision, ([executed], None))
    completed = _instance_fields(
        instance.user_id, instance.flow_id, definition, instance.id, instance.version + 2, now
    )
    completed["step"] = to_step
    return _decision(Decision, ([executed, known_good(FlowCompleted, completed)], None))


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
