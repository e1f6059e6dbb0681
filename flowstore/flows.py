"""Flow definitions in the store: create, update, delete, read, migrate instances, draw.

Definition changes go through `Commands.append` (decided again after a concurrent append, and
announced to the definition listeners); the decisions are `flowstore.decisions`'.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flowstore.decisions import define_flow, delete_flow, list_flow
from flowstore.definitions import FlowDefinition, parse_definition, update_definition
from flowstore.diagrams import DIAGRAM_FORMATS, DiagramStats, text_diagram
from flowstore.domain import CATALOG_ID, DomainEvent, FlowCatalog, FlowVersions, definition_id
from flowstore.errors import FlowExistsError, FlowNotFoundError, InvalidArgumentError
from flowstore.inputs import require_id
from flowstore.migration import check_step_map, migrate
from flowstore.models import FlowStatus, MigrationReport
from flowstore.opening import Parts

__all__ = [
    "create_flow",
    "diagram",
    "get_flow",
    "list_flows",
    "migrate_flows",
    "remove_flow",
    "update_flow",
]


def create_flow(parts: Parts, definition: FlowDefinition | Mapping[str, Any]) -> str:
    """`FlowStore.create_flow`: version 1, or a new version of a deleted flow."""
    parsed = parse_definition(definition)

    def decide() -> list[DomainEvent]:
        versions = parts.log.get(definition_id(parsed.flow), FlowVersions)
        if versions is not None and not versions.deleted:
            raise FlowExistsError(parsed.flow)
        now = parts.clock()
        catalog = parts.log.get(CATALOG_ID, FlowCatalog)
        return [
            *define_flow(versions, parsed, now=now),
            *list_flow(catalog, parsed.flow, now=now),
        ]

    parts.commands.append(decide, user_id="*", flow_id=parsed.flow, kind="create_flow")
    return parsed.flow


def update_flow(
    parts: Parts, flow_id: str, changes: FlowDefinition | Mapping[str, Any]
) -> FlowDefinition:
    """`FlowStore.update_flow`: a new version with `changes`' top-level keys replaced whole."""
    require_id(flow_id, "flow_id")
    if isinstance(changes, FlowDefinition):
        changes = changes.to_seed()

    def decide() -> list[DomainEvent]:
        versions = parts.live_versions(flow_id)
        return define_flow(versions, update_definition(versions.latest, changes), now=parts.clock())

    parts.commands.append(decide, user_id="*", flow_id=flow_id, kind="update_flow")
    return get_flow(parts, flow_id)


def remove_flow(parts: Parts, flow_id: str) -> None:
    """`FlowStore.delete_flow`: later transitions and resets on it raise `FlowNotFoundError`."""
    require_id(flow_id, "flow_id")
    parts.commands.append(
        lambda: delete_flow(parts.live_versions(flow_id), now=parts.clock()),
        user_id="*",
        flow_id=flow_id,
        kind="delete_flow",
    )


def list_flows(parts: Parts) -> list[FlowDefinition]:
    """`FlowStore.list_flows`: the latest version of each live flow, in order of creation."""
    catalog = parts.log.get(CATALOG_ID, FlowCatalog)
    flows = []
    for flow_id in catalog.flow_ids if catalog else ():
        versions = parts.log.get(definition_id(flow_id), FlowVersions)
        if versions is not None and not versions.deleted:
            flows.append(versions.latest)
    return flows


def get_flow(parts: Parts, flow_id: str, version: int | None = None) -> FlowDefinition:
    """`FlowStore.get_flow`: the latest version, or version `version`."""
    definition = parts.live_versions(flow_id).get(version)
    if definition is None:
        raise FlowNotFoundError(
            flow_id, f"Flow {flow_id!r} has no version {version}", version=version
        )
    return definition


def migrate_flows(
    parts: Parts,
    flow_id: str,
    to_version: int,
    step_map: Mapping[str, str] | None,
    dry_run: bool,
) -> MigrationReport:
    """`FlowStore.migrate_flows`: the active instances found in the tables, each moved on itself."""
    require_id(flow_id, "flow_id")
    if isinstance(to_version, bool) or not isinstance(to_version, int):
        raise InvalidArgumentError("to_version", to_version, "must be a version number")
    target = parts.live_versions(flow_id).get(to_version)
    if target is None:
        raise FlowNotFoundError(
            flow_id, f"Flow {flow_id!r} has no version {to_version}", version=to_version
        )
    mapping = check_step_map(flow_id, target, to_version, step_map)
    users = [row["user_id"] for row in parts.tables.instances(flow_id, FlowStatus.ACTIVE)]
    return migrate(parts.commands, flow_id, target, to_version, mapping, users, dry_run=dry_run)


def diagram(parts: Parts, flow_id: str, format: str, stats: bool, version: int | None) -> str:
    """`FlowStore.diagram`: Mermaid or DOT text, labelled from the statistics tables with `stats`."""
    if format not in DIAGRAM_FORMATS:
        raise InvalidArgumentError("format", format, f"must be one of {', '.join(DIAGRAM_FORMATS)}")
    definition = get_flow(parts, flow_id, version)
    counts = None
    if stats:
        funnel = parts.tables.funnel(flow_id)
        counts = DiagramStats(
            current={step.step: step.current for step in funnel},
            entered={step.step: step.entered for step in funnel},
            taken=parts.tables.transition_counts(flow_id),
        )
    return text_diagram(definition, format, counts)
