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
    # Every value is one of the aggregate's fields, of the type the state's field has (validating
    # them would only copy them); read from its dict, which is a third cheaper than attributes of
    # a pydantic model. The payload is copied, as validation would: the caller may change the
    # state's dict without changing the cached instance's.
    fields = instance.__dict__
    payload = fields["payload"]
    return known_good(
        FlowState,
        {
            "flow": fields["flow_id"],
            "step": fields["step"],
            "previous": fields["previous"],
            "service": fields["service"],
            "entity_id": fields["entity_id"],
            "ok": fields["ok"],
            "message": fields["message"],
            "payload": None if payload is None else dict(payload),
            "user_id": fields["user_id"],
            "status": fields["status"],
            "version": fields["version"],
            "definition_version": fields["definition_version"],
            "started_at": fields["started_at"],
            "updated_at": fields["modified_on"],
            "completed_at": fields["completed_at"],
            "expires_at": fields["expires_at"],
        },
    )
