"""A single source behind a cache with expiry and a last-good-copy fallback."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from flowstore import FlowDefinition, FlowNotFoundError
from flowstore.adapters.providers.base import Fetcher, FlowProvider, SourceUnavailableError

_log = logging.getLogger(__name__)


@dataclass
class _Entry:
    definition: FlowDefinition
    at: float


class CachedFlowProvider(FlowProvider):
    """A single source behind a cache with expiry and a last-good-copy fallback."""

    def __init__(self, fetcher: Fetcher, *, cache_timeout: float, clock: Callable[[], float]):
        self.name = fetcher.name
        self.cache_timeout = cache_timeout
        self._fetcher = fetcher
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: dict[str, _Entry] = {}
        self._listed_at: float | None = None
        # Bumped by invalidate(): a fetch that began before an invalidation may have read the old
        # definition, so what it brings back is returned but not cached.
        self._generation = 0

    def _fresh(self, at: float | None, now: float) -> bool:
        return at is not None and now - at < self.cache_timeout

    def get_flow(self, flow_id: str) -> FlowDefinition:
        """The flow's definition, from the cache while it is fresh, else from the source."""
        now = self._clock()
        with self._lock:
            entry = self._entries.get(flow_id)
            generation = self._generation
        if entry is not None and self._fresh(entry.at, now):
            return entry.definition
        try:
            found = self._fetcher.fetch(flow_id)
        except SourceUnavailableError as exc:
            if entry is None:
                raise FlowNotFoundError(
                    flow_id,
                    f"Flow {flow_id!r} not found: {self.name} is unavailable ({exc})",
                    source=self.name,
                    reason=str(exc),
                ) from None
            _log.warning(
                "%s is unavailable (%s); serving the cached copy of flow %r",
                self.name,
                exc,
                flow_id,
            )
            with self._lock:  # ask again only after another cache_timeout, not on every call
                if generation == self._generation:
                    self._entries[flow_id] = _Entry(entry.definition, now)
            return entry.definition
        self._remember(found, now, generation)
        if flow_id not in found:
            with self._lock:
                self._entries.pop(flow_id, None)
            raise FlowNotFoundError(
                flow_id, f"Flow {flow_id!r} not found in {self.name}", source=self.name
            )
        return found[flow_id]

    def list_flows(self) -> list[FlowDefinition]:
        """Every definition the source has (for a per-flow URL: those fetched so far)."""
        now = self._clock()
        with self._lock:
            cached = [entry.definition for entry in self._entries.values()]
            fresh = self._fresh(self._listed_at, now)
            generation = self._generation
        if fresh or not self._fetcher.can_list:
            return cached
        try:
            found = self._fetcher.fetch(None)
        except SourceUnavailableError as exc:
            if self._listed_at is None and not cached:
                raise FlowNotFoundError(
                    "*", f"{self.name} is unavailable ({exc})", source=self.name, reason=str(exc)
                ) from None
            _log.warning("%s is unavailable (%s); listing the cached flows", self.name, exc)
            with self._lock:
                if generation == self._generation:
                    self._listed_at = now
            return cached
        self._remember(found, now, generation, complete=True)
        return list(found.values())

    def _remember(
        self,
        found: Mapping[str, FlowDefinition],
        now: float,
        generation: int,
        *,
        complete: bool = False,
    ) -> None:
        with self._lock:
            if generation != self._generation:
                return
            if complete or self._fetcher.whole:
                # The source's whole content: flows it no longer has must not linger.
                self._entries = {}
                self._listed_at = now
            for flow_id, definition in found.items():
                self._entries[flow_id] = _Entry(definition, now)

    def invalidate(self, flow_id: str | None = None) -> None:
        """Forget the cached copy of one flow (all flows when None)."""
        with self._lock:
            self._generation += 1
            self._listed_at = None
            if flow_id is None:
                self._entries.clear()
            else:
                self._entries.pop(flow_id, None)

    def close(self) -> None:
        """Release the source's connections."""
        self._fetcher.close()
