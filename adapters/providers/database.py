"""The `database` source: the store's own definitions."""

from __future__ import annotations

from collections.abc import Callable

from eventsourcing.persistence import PersistenceError

from flowstore import FlowDefinition, FlowNotFoundError, FlowStore, StorageUnavailableError
from flowstore.adapters.providers.base import SourceUnavailableError


class DatabaseFetcher:
    """Reads a `FlowStore`'s definitions; `unsubscribe` drops the cache's change listener."""

    whole = False
    can_list = True

    def __init__(self, store: FlowStore, *, owned: bool) -> None:
        self.store = store
        self._owned = owned
        self.name = f"database:{store.config.display or store.config.backend}"
        self.unsubscribe: Callable[[], None] = lambda: None

    def fetch(self, flow_id: str | None) -> dict[str, FlowDefinition]:
        """The flow (every flow when None); a store that cannot answer is unavailable."""
        try:
            if flow_id is None:
                return {d.flow: d for d in self.store.list_flows()}
            try:
                return {flow_id: self.store.get_flow(flow_id)}
            except FlowNotFoundError:
                return {}
        except (PersistenceError, StorageUnavailableError) as exc:  # serve what we had
            raise SourceUnavailableError(f"{type(exc).__name__}: {exc}") from None

    def close(self) -> None:
        """Stop listening for changes, and close the store if this source opened it."""
        self.unsubscribe()
        if self._owned:
            self.store.close()
