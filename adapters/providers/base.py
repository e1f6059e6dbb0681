"""What every provider is, and the port between the cache and a source (database, file, remote)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from types import TracebackType
from typing import Protocol, Self

from flowstore import FlowDefinition


class FlowProvider(ABC):
    """Reads flow definitions from one source (or several, for `hybrid`); a context manager."""

    name: str
    """The source, for messages: `file:flows/`, `remote:https://...`, `database:...`."""

    @abstractmethod
    def get_flow(self, flow_id: str) -> FlowDefinition:
        """The flow's definition; `FlowNotFoundError` (naming the source) if the source lacks it."""

    @abstractmethod
    def list_flows(self) -> list[FlowDefinition]:
        """Every definition the source has (for a per-flow URL: those fetched so far)."""

    @abstractmethod
    def invalidate(self, flow_id: str | None = None) -> None:
        """Forget the cached copy of one flow (all flows when None)."""

    @abstractmethod
    def close(self) -> None:
        """Release connections (and a store this provider opened)."""

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class SourceUnavailableError(Exception):
    """The source could not answer (down, garbage, unreadable); the message says why.

    Internal to the providers: the cache turns it into its last good copy or a `FlowNotFoundError`.
    """


class Fetcher(Protocol):
    """One source, asked by `CachedFlowProvider` when its copy is stale."""

    name: str
    whole: bool
    """True when every fetch returns all the source's flows (a file, a whole remote document)."""
    can_list: bool

    def fetch(self, flow_id: str | None) -> dict[str, FlowDefinition]:
        """The flow (all flows when None) by id; `SourceUnavailableError` when the source fails."""

    def close(self) -> None:
        """Release the source's connections."""
