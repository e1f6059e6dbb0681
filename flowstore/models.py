"""What the store answers with: a user's state in a flow, its history, and flow statistics.

Field names are snake_case in Python and camelCase on the wire (`to_json`), like the seed's types, so
the HTTP and Kafka adapters reuse these models as they are.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

import orjson
from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic.alias_generators import to_camel

__all__ = [
    "FlowState",
    "FlowStateHistory",
    "FlowStatistics",
    "FlowStatus",
    "FunnelStep",
    "HistoryKind",
    "InstanceMigration",
    "InstancePage",
    "MigrationReport",
    "PerformanceMetrics",
    "StepCount",
]


class _ApiModel(BaseModel):
    model_config = ConfigDict(frozen=True, alias_generator=to_camel, populate_by_name=True)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict with camelCase keys."""
        return self.model_dump(mode="json", by_alias=True)

    def to_json(self) -> bytes:
        """orjson-encoded JSON with camelCase keys."""
        return orjson.dumps(self.model_dump(by_alias=True))


class FlowStatus(StrEnum):
    """Where an instance is in its life."""

    ACTIVE = "active"
    COMPLETED = "completed"
    CLEARED = "cleared"
    EXPIRED = "expired"


class HistoryKind(StrEnum):
    """The command a history row records."""

    START = "start"
    """`execute_transition` started a flow the user had no state in."""
    RESET = "reset"
    TRANSITION = "transition"
    OVERRIDE = "override"
    CLEAR = "clear"
    EXPIRY = "expiry"
    MIGRATION = "migration"
    """`migrate_flows` moved an active instance to another definition version."""
    BACK = "back"
    """`go_back` returned the user to the state's `previous` step."""
    HANDOFF = "handoff"
    """`adopt_state_token` took over a flow another service handed over as a state token."""


class FlowState(_ApiModel):
    """Where one user stands in one flow."""

    flow: str
    step: str
    previous: str | None = None
    """The step left by the last transition when it was `reversible` (where `go_back` returns)."""
    service: str | None = None
    """The run's target service when the run has one (`reset_flow(service=...)`, a hand-over),
    else the current step's service."""
    entity_id: str | None = None
    """The entity the run is about (`reset_flow(entity_id=...)`); `""` stands for the model's null."""
    ok: bool = True
    """What the last transition said of its step's work (`execute_transition(ok=...)`)."""
    message: str | None = None
    """The message of the last transition, if it gave one (a later transition clears it)."""
    payload: dict[str, Any] | None = None
    """The payloads of the run's transitions, merged (top-level keys, later ones win)."""
    user_id: str | None = None
    status: FlowStatus = FlowStatus.ACTIVE
    version: int = 0
    """The instance's event version: how many events it has."""
    definition_version: int | None = None
    started_at: datetime | None = None
    updated_at: datetime | None = None
    completed_at: datetime | None = None
    expires_at: datetime | None = None


class FlowStateHistory(_ApiModel):
    """One command on an instance: a transition (accepted or rejected), reset, override, clear...

    `from_step`, `to_step` and `transition` are strings, as in the seed's type: `to_step` is the
    step the user is on after the command (after a rejected attempt, the step they stayed on;
    after a clear or expiry, ""), `from_step` the step before ("" when there was none), and
    `transition` the transition's name ("" for commands that are not transitions).
    """

    id: str
    user_id: str
    flow_id: str
    from_step: str = ""
    to_step: str = ""
    transition: str = ""
    payload: dict[str, Any] | None = None
    timestamp: datetime
    success: bool
    error: str | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)
    kind: HistoryKind
    ok: bool | None = None
    """What an accepted transition said of its step's work (None for other commands)."""
    message: str | None = None
    """The message an accepted transition (or a hand-over) carried."""

    @field_validator("from_step", "to_step", "transition", mode="before")
    @classmethod
    def _none_is_empty(cls, value: Any) -> Any:
        return "" if value is None else value


class InstancePage(_ApiModel):
    """One page of `FlowStore.list_instances`: the states, and the cursor of the next page."""

    instances: list[FlowState]
    next_cursor: str | None = None
    """Pass as `cursor` for the next page; None on the last page."""


class StepCount(_ApiModel):
    """How many times users entered a step."""

    step: str
    count: int


class PerformanceMetrics(_ApiModel):
    """Response times of `execute_transition` (ms) and recent throughput."""

    average_response_time: float = 0.0
    p95_response_time: float = 0.0
    throughput_per_second: float = 0.0


class FlowStatistics(_ApiModel):
    """Usage of one flow, or of all flows: the seed's statistics in snake_case."""

    total_flows: int = 0
    """Runs started (a reset starts a new run)."""
    active_users: int = 0
    completion_rate: float = 0.0
    average_flow_duration: float = 0.0
    """Milliseconds from start to completion, averaged over completed runs."""
    popular_steps: list[StepCount] = Field(default_factory=list)
    error_rate: float = 0.0
    performance_metrics: PerformanceMetrics = Field(default_factory=PerformanceMetrics)


class FunnelStep(_ApiModel):
    """One step of a flow's funnel: how many entered it, moved on, dropped out, and are there now."""

    step: str
    entered: int
    moved_on: int
    """Left the step by an accepted transition, or by a migration that mapped it to another step."""
    dropped: int
    """Runs that ended at this step while active: cleared, expired, reset or moved by an override."""
    current: int
    """Active instances at this step now."""


class InstanceMigration(_ApiModel):
    """One active instance in a migration: where it is and where it goes (None: it cannot go)."""

    user_id: str
    from_version: int
    from_step: str
    to_version: int
    to_step: str | None
    """The step in the target version; None when the step could not be mapped."""
    reason: str | None = None
    """Why the instance was left alone (unmappable), else None."""


class MigrationReport(_ApiModel):
    """What `migrate_flows` did (or, on a dry run, would do) to a flow's active instances."""

    flow_id: str
    to_version: int
    dry_run: bool
    migrated: list[InstanceMigration] = Field(default_factory=list)
    """Moved to `to_version` (on a dry run: would be moved)."""
    unmappable: list[InstanceMigration] = Field(default_factory=list)
    """Left alone: their step is not in the target version and `step_map` does not map it."""
    skipped: int = 0
    """Active instances already on `to_version`, or no longer active when re-read."""
