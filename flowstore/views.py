"""What readers see of an instance: the public `FlowState` of a user's flow.

A command answers with the state its own events left (read your writes), from the aggregate rather
than the projections' `flow_states` table, in the same shape; that mapping is read-side code, so it
lives here and not in the domain.
"""

from __future__ import annotations

from flowstore.domain import FlowInstance, known_good
from flowstore.models import FlowState

__all__ = ["instance_state"]


def instance_state(instance: FlowInstance) -> FlowState:
    """The public view of a live instance (one with a step)."""
    assert instance.step is not None
    payload = instance.payload
    # Every value is one of the aggregate's fields, of the type the state's field has (validating
    # them would only copy them). The payload is copied, as validation would: the caller may
    # change the state's dict without changing the cached instance's.
    return known_good(
        FlowState,
        {
            "flow": instance.flow_id,
            "step": instance.step,
            "previous": instance.previous,
            "service": instance.service,
            "entity_id": instance.entity_id,
            "ok": instance.ok,
            "message": instance.message,
            "payload": None if payload is None else dict(payload),
            "user_id": instance.user_id,
            "status": instance.status,
            "version": instance.version,
            "definition_version": instance.definition_version,
            "started_at": instance.started_at,
            "updated_at": instance.modified_on,
            "completed_at": instance.completed_at,
            "expires_at": instance.expires_at,
        },
    )
