"""Loading definitions into a store: create the new, version the changed, leave the same alone."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from flowstore import FlowDefinition, FlowNotFoundError, FlowStore


@dataclass(frozen=True)
class LoadedFlow:
    """What `load_flows` did with one definition."""

    flow: str
    action: Literal["created", "updated", "unchanged"]
    version: int


def _same(a: FlowDefinition, b: FlowDefinition) -> bool:
    return a.model_copy(update={"version": None}) == b.model_copy(update={"version": None})


_FIELDS = {name: info.alias or name for name, info in FlowDefinition.model_fields.items()}


def load_flows(store: FlowStore, definitions: Iterable[FlowDefinition]) -> list[LoadedFlow]:
    """Create each flow the store lacks, version each that differs, leave identical ones alone.

    Each definition replaces its flow's whole definition (a key the new one lacks, like `ttl`,
    is removed). The flows are applied one after the other, not as one transaction.
    """
    loaded = []
    for definition in definitions:
        try:
            current = store.get_flow(definition.flow)
        except FlowNotFoundError:  # new, or deleted: create_flow revives it as a new version
            store.create_flow(definition)
            loaded.append(LoadedFlow(definition.flow, "created", _version(store, definition.flow)))
            continue
        if _same(current, definition):
            assert current.version is not None
            loaded.append(LoadedFlow(definition.flow, "unchanged", current.version))
            continue
        changes = {alias: None for name, alias in _FIELDS.items() if name != "version"}
        changes.update(definition.to_seed())
        changes.pop("version", None)
        updated = store.update_flow(definition.flow, changes)
        assert updated.version is not None
        loaded.append(LoadedFlow(definition.flow, "updated", updated.version))
    return loaded


def _version(store: FlowStore, flow_id: str) -> int:
    version = store.get_flow(flow_id).version
    assert version is not None
    return version
