"""Several providers asked in order: the first that has a flow wins."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from flowstore import FlowDefinition, FlowNotFoundError, InvalidArgumentError
from flowstore.adapters.providers.base import FlowProvider

_log = logging.getLogger(__name__)


class HybridFlowProvider(FlowProvider):
    """Several providers asked in order: the first that has a flow wins."""

    def __init__(self, providers: Sequence[FlowProvider]) -> None:
        if not providers:
            raise InvalidArgumentError("sources", [], "a hybrid provider needs at least one source")
        self.providers = list(providers)
        self.name = "hybrid(" + ", ".join(p.name for p in self.providers) + ")"

    def get_flow(self, flow_id: str) -> FlowDefinition:
        """The definition from the first provider that has the flow."""
        reasons = []
        for provider in self.providers:
            try:
                return provider.get_flow(flow_id)
            except FlowNotFoundError as exc:
                reasons.append(exc.message)
        raise FlowNotFoundError(
            flow_id,
            f"Flow {flow_id!r} not found in any source of {self.name}: " + "; ".join(reasons),
            source=self.name,
            reasons=reasons,
        )

    def list_flows(self) -> list[FlowDefinition]:
        """Every flow of every source; for a flow in several, the first source's definition."""
        flows: dict[str, FlowDefinition] = {}
        for provider in self.providers:
            try:
                listed = provider.list_flows()
            except FlowNotFoundError as exc:
                _log.warning("%s", exc.message)
                continue
            for definition in listed:
                flows.setdefault(definition.flow, definition)
        return list(flows.values())

    def invalidate(self, flow_id: str | None = None) -> None:
        """Forget cached copies in every source."""
        for provider in self.providers:
            provider.invalidate(flow_id)

    def close(self) -> None:
        """Close every source."""
        for provider in self.providers:
            provider.close()
