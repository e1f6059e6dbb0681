"""Commands on a user's flow besides transitions and overrides (`flowstore.batch`): start or
restart, go back, take the next transition, hand over by state token, clear, expire.

Each decides on the instance as it stands, through the write path (`Commands.change_instance`:
read, decide, append, retry on a concurrent append).
"""

from __future__ import annotations

from typing import Any

from flowstore.commands import definition_of, is_expired
from flowstore.decisions import Decision, end_flow, go_back, hand_over, start_flow
from flowstore.definitions import FlowDefinition, FlowTransition
from flowstore.domain import FlowInstance, instance_id
from flowstore.errors import (
    FlowNotFoundError,
    FlowStateNotFoundError,
    InvalidArgumentError,
    InvalidTransitionError,
    StateTokenFlowError,
)
from flowstore.inputs import check_entity, check_message, check_payload, require_id
from flowstore.models import FlowState
from flowstore.opening import Parts
from flowstore.tokens import decode_state_token, encode_state_token, token_flow_id
from flowstore.views import instance_state

__all__ = [
    "adopt_state_token",
    "advance",
    "available_transitions",
    "clear_flow_state",
    "purge_expired_flows",
    "reset_flow",
    "return_back",
    "state_token",
]


def reset_flow(
    parts: Parts,
    user_id: str,
    flow_id: str,
    step: str | None,
    *,
    service: str | None,
    entity_id: str | None,
) -> FlowState:
    """`FlowStore.reset_flow`: a new run on the latest version, at `step` or the initial step."""
    require_id(user_id, "user_id")
    if step is not None:
        require_id(step, "step")
    if service is not None:
        require_id(service, "service")
    entity = check_entity(entity_id)

    def decide(instance: FlowInstance | None) -> Decision:
        definition = parts.live_versions(flow_id).latest
        return Decision(
            start_flow(
                instance,
                definition,
                user_id=user_id,
                now=parts.clock(),
                step=step,
                service=service,
                entity_id=entity,
            )
        )

    return instance_state(parts.commands.change_instance(user_id, flow_id, decide, kind="reset"))


def advance(parts: Parts, user_id: str, flow_id: str, payload: dict[str, Any] | None) -> FlowState:
    """`FlowStore.advance`: the current step's first transition that is not `explicit`."""
    instance, definition = _state_definition(parts, user_id, flow_id)
    assert instance.step is not None
    offered = definition.steps[instance.step].transitions.items()
    key = next((name for name, edge in offered if not edge.explicit), None)
    if key is None:
        raise InvalidTransitionError(
            instance.step,
            "next",
            flow_id=flow_id,
            user_id=user_id,
            reason="the step offers no transition that is not explicit",
        )
    return parts.transitions.execute_transition(user_id, flow_id, key, payload)


def return_back(parts: Parts, user_id: str, flow_id: str) -> FlowState:
    """`FlowStore.go_back`: to the state's `previous` step, recorded as kind `back`."""
    require_id(user_id, "user_id")

    def decide(instance: FlowInstance | None) -> Decision:
        live = _live(parts, instance, user_id, flow_id)
        definition = definition_of(live, parts.live_versions(flow_id))
        return Decision(go_back(live, definition, now=parts.clock()))

    return instance_state(parts.commands.change_instance(user_id, flow_id, decide, kind="back"))


def available_transitions(
    parts: Parts, user_id: str, flow_id: str, explicit: bool | None
) -> list[FlowTransition]:
    """`FlowStore.get_available_transitions`: the current step's, in definition order."""
    instance, definition = _state_definition(parts, user_id, flow_id)
    assert instance.step is not None
    offered = list(definition.steps[instance.step].transitions.values())
    if explicit is None:
        return offered
    return [edge for edge in offered if bool(edge.explicit) == explicit]


def state_token(parts: Parts, user_id: str, flow_id: str) -> str:
    """`FlowStore.state_token`: the user's state as an OwlMeans state token."""
    instance, definition = _state_definition(parts, user_id, flow_id)
    return encode_state_token(definition, instance_state(instance))


def adopt_state_token(parts: Parts, user_id: str, token: str, *, sender: str | None) -> FlowState:
    """`FlowStore.adopt_state_token`: the token's state becomes the user's (history kind `handoff`)."""
    require_id(user_id, "user_id")
    if sender is not None:
        require_id(sender, "sender")
    flow_id = token_flow_id(token)
    limit = parts.transitions.max_payload_bytes

    def decide(instance: FlowInstance | None) -> Decision:
        try:
            definition = parts.live_versions(flow_id).latest
        except (FlowNotFoundError, InvalidArgumentError):
            raise StateTokenFlowError(flow_id) from None
        state = decode_state_token(token, definition)
        if state.service:
            require_id(state.service, "service")
        check_entity(state.entity_id)
        check_message(state.message, limit)
        check_payload(state.payload, limit=limit)
        return Decision(
            hand_over(
                instance, definition, state, user_id=user_id, sender=sender, now=parts.clock()
            )
        )

    try:
        require_id(flow_id, "flow_id")
    except InvalidArgumentError:
        raise StateTokenFlowError(flow_id) from None
    return instance_state(
        parts.commands.change_instance(user_id, flow_id, decide, kind="adopt_token")
    )


def _state_definition(
    parts: Parts, user_id: str, flow_id: str
) -> tuple[FlowInstance, FlowDefinition]:
    """The user's live instance and the definition version it runs on."""
    require_id(user_id, "user_id")
    require_id(flow_id, "flow_id")
    instance = _live(
        parts, parts.log.get(instance_id(user_id, flow_id), FlowInstance), user_id, flow_id
    )
    return instance, definition_of(instance, parts.live_versions(flow_id))


def _live(parts: Parts, instance: FlowInstance | None, user_id: str, flow_id: str) -> FlowInstance:
    """The instance, if the user has a live run; else `FlowNotFoundError` for an unknown flow,
    `FlowStateNotFoundError` for a known one."""
    if instance is None or not instance.is_live:
        parts.versions(flow_id)  # unknown flow -> FlowNotFoundError
        raise FlowStateNotFoundError(user_id, flow_id)
    return instance


def clear_flow_state(parts: Parts, user_id: str, flow_id: str) -> None:
    """`FlowStore.clear_flow_state`: end the run (kind `clear`); the history stays."""
    require_id(user_id, "user_id")

    def decide(instance: FlowInstance | None) -> Decision:
        return Decision(
            end_flow(_live(parts, instance, user_id, flow_id), now=parts.clock(), kind="clear")
        )

    parts.commands.change_instance(user_id, flow_id, decide, kind="clear_state")


def purge_expired_flows(parts: Parts) -> int:
    """`FlowStore.purge_expired_flows`: expire the table's expired instances, each re-checked."""
    now = parts.clock()
    purged = 0
    for user_id, flow_id in parts.tables.expired(now):
        expired = False

        def decide(current: FlowInstance | None) -> Decision:
            # Re-checked on the instance itself: the user may have moved on since the scan.
            nonlocal expired
            expired = current is not None and is_expired(current, now)
            if not expired:
                return Decision([])
            assert current is not None
            return Decision(end_flow(current, now=now, kind="expiry"))

        parts.commands.change_instance(user_id, flow_id, decide, kind="expire")
        purged += expired
    if purged and parts.commands.observers.active:
        parts.commands.observers.expired(purged)
    return purged
