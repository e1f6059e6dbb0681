"""Moving a flow's active instances to another version of its definition, one event each."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from flowstore.commands import Commands
from flowstore.decisions import Decision, migrate_instance, migration_target
from flowstore.definitions import FlowDefinition
from flowstore.domain import FlowInstance, instance_id
from flowstore.errors import FlowStateNotFoundError, InvalidStepError
from flowstore.inputs import require_id
from flowstore.models import FlowStatus, InstanceMigration, MigrationReport

__all__ = ["check_step_map", "migrate"]


def check_step_map(
    flow_id: str, target: FlowDefinition, to_version: int, step_map: Mapping[str, str] | None
) -> dict[str, str]:
    """The step map as a dict, every value a step of `target` (else `InvalidStepError`)."""
    mapping = dict(step_map or {})
    for old, new in mapping.items():
        require_id(old, "step_map key")
        if not isinstance(new, str) or target.step(new) is None:
            raise InvalidStepError(str(new), flow_id=flow_id, definition_version=to_version)
    return mapping


def migrate(
    commands: Commands,
    flow_id: str,
    target: FlowDefinition,
    to_version: int,
    mapping: Mapping[str, str],
    users: Iterable[str],
    *,
    dry_run: bool,
) -> MigrationReport:
    """Move each of `users`' active instances of the flow to `target`, decided on the instance.

    `users` come from the `flow_states` table; each move is decided again on the instance itself
    (`Commands.change_instance`), so a user moving meanwhile is never lost.
    """
    migrated: list[InstanceMigration] = []
    unmappable: list[InstanceMigration] = []
    skipped = 0
    for user_id in users:
        outcome: InstanceMigration | None = None

        def decide(instance: FlowInstance | None) -> Decision:
            nonlocal outcome
            outcome = None  # decided afresh on every attempt
            if (
                instance is None
                or instance.status is not FlowStatus.ACTIVE
                or instance.definition_version == to_version
            ):
                return Decision([])
            assert instance.step is not None
            to_step, reason = migration_target(instance, target, mapping)
            outcome = InstanceMigration(
                user_id=instance.user_id,
                from_version=instance.definition_version,
                from_step=instance.step,
                to_version=to_version,
                to_step=to_step,
                reason=reason,
            )
            if to_step is None or dry_run:
                return Decision([])
            return Decision(
                migrate_instance(instance, target, to_step=to_step, now=commands.clock())
            )

        if dry_run:
            decide(commands.get_instance(instance_id(user_id, flow_id)))
        else:
            try:
                commands.change_instance(user_id, flow_id, decide, kind="migrate")
            except FlowStateNotFoundError:  # the row outlived its instance: nothing to move
                outcome = None
        if outcome is None:
            skipped += 1
        elif outcome.to_step is None:
            unmappable.append(outcome)
        else:
            migrated.append(outcome)
    return MigrationReport(
        flow_id=flow_id,
        to_version=to_version,
        dry_run=dry_run,
        migrated=migrated,
        unmappable=unmappable,
        skipped=skipped,
    )
