"""What a store tells its observers: each command's kind, outcome and latency, rebuild progress,
expiry, and spans around its work (for tracing).

The store calls these hooks on its own write path (`flowstore.commands`), so they count for every
caller: library code, the CLI, the HTTP API and the worker alike. Observers are optional
adapters: `flowstore.adapters.metrics` counts into Prometheus, `flowstore.adapters.tracing` opens
OpenTelemetry spans; the store imports neither. With no observer registered every hook is one
attribute check (`Observers.active`), so an unobserved store pays nothing measurable.

Outcomes of a command (`OUTCOMES`): `accepted` (its events were appended), `rejected` (refused
with a `FlowError` the caller can act on: unknown flow, invalid transition, ...; a rejected
transition is still recorded), `error` (storage down, corrupt state, conflicts past the retry
limit, or a bug), and `conflict-retried`, told once per optimistic-concurrency retry (not once
per command: a command that retried twice and was accepted is told `conflict-retried` twice and
`accepted` once).

Span attributes never carry user ids or payloads (personal data): only the flow id, the command
kind, the outcome and log positions.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any

from flowstore.errors import (
    ConcurrencyConflictError,
    FlowError,
    FlowStateCorruptionError,
    StorageUnavailableError,
)

__all__ = ["OUTCOMES", "Observers", "SpanSetter", "StoreObserver", "outcome_of"]

_log = logging.getLogger(__name__)

OUTCOMES = ("accepted", "rejected", "conflict-retried", "error")
"""What `StoreObserver.command` may be told a command came to."""

SpanSetter = Callable[[str, Any], None]
"""Sets an attribute on the span(s) open around a piece of work."""


def outcome_of(error: BaseException | None) -> str:
    """`accepted` without an error; `rejected` for a caller's mistake; `error` for the rest."""
    if error is None:
        return "accepted"
    failures = (StorageUnavailableError, FlowStateCorruptionError, ConcurrencyConflictError)
    if isinstance(error, FlowError) and not isinstance(error, failures):
        return "rejected"
    return "error"


class StoreObserver:
    """An observer of a store; every method here does nothing, subclasses override what they need."""

    def command(self, kind: str, outcome: str, seconds: float) -> None:
        """A command of `kind` came to `outcome` after `seconds` (0 for `conflict-retried`)."""

    def rebuild(self, done: int, total: int) -> None:
        """A rebuild has replayed `done` of the log's `total` events so far."""

    def rebuild_running(self, running: bool) -> None:
        """A rebuild (or layout migration) started (True) or ended (False) in this process."""

    def expired(self, count: int) -> None:
        """An expiry round expired `count` flow instances."""

    def projected(self, first: int, last: int, count: int, began_ns: int) -> None:
        """A catch-up committed `count` events, at log positions `first`..`last`, into the tables;
        it began at `began_ns` (`time.time_ns()`) and ended now."""

    def span(self, name: str, attributes: dict[str, Any]) -> AbstractContextManager[Any]:
        """A span around a piece of work; what it yields, when callable, sets an attribute."""
        return contextlib.nullcontext()


class Observers:
    """The observers of one store, told together."""

    def __init__(self) -> None:
        self._all: tuple[StoreObserver, ...] = ()
        self._tracing: tuple[StoreObserver, ...] = ()  # those that open spans
        self._lock = threading.Lock()

    @property
    def active(self) -> bool:
        """Whether any observer is registered (the hooks do nothing otherwise)."""
        return bool(self._all)

    def add(self, observer: StoreObserver) -> Callable[[], None]:
        """Register `observer`; returns the function that removes it again."""
        with self._lock:
            self._all = (*self._all, observer)
            self._tracing = self._spanning()

        def remove() -> None:
            with self._lock:
                self._all = tuple(known for known in self._all if known is not observer)
                self._tracing = self._spanning()

        return remove

    def _spanning(self) -> tuple[StoreObserver, ...]:
        # Metrics-only observers inherit the null span: opening it for them is pure cost.
        return tuple(o for o in self._all if type(o).span is not StoreObserver.span)

    def command(self, kind: str, outcome: str, seconds: float) -> None:
        """Tell every observer a command's outcome."""
        self._tell("command", kind, outcome, seconds)

    def rebuild(self, done: int, total: int) -> None:
        """Tell every observer how far a rebuild got."""
        self._tell("rebuild", done, total)

    def rebuild_running(self, running: bool) -> None:
        """Tell every observer a rebuild started or ended."""
        self._tell("rebuild_running", running)

    def expired(self, count: int) -> None:
        """Tell every observer an expiry round's count."""
        self._tell("expired", count)

    def projected(self, first: int, last: int, count: int, began_ns: int) -> None:
        """Tell every observer a catch-up's batch."""
        self._tell("projected", first, last, count, began_ns)

    def _tell(self, hook: str, *args: Any) -> None:
        for observer in self._all:
            try:
                getattr(observer, hook)(*args)
            except Exception:
                # Told after the fact (a command already committed): a failing observer must not
                # make the work look failed, so it is logged and the others are still told.
                _log.exception("store observer %r failed in %s", observer, hook)

    def span(self, name: str, **attributes: Any) -> AbstractContextManager[SpanSetter]:
        """Every observer's span around the block; yields a setter of attributes on all of them."""
        if not self._tracing:
            return _NO_SPAN  # no observer traces: no generator, no stack
        return self._spans(name, attributes)

    @contextlib.contextmanager
    def _spans(self, name: str, attributes: dict[str, Any]) -> Iterator[SpanSetter]:
        with contextlib.ExitStack() as spans:
            setters = [spans.enter_context(o.span(name, attributes)) for o in self._tracing]
            live = [setter for setter in setters if callable(setter)]

            def set_attribute(key: str, value: Any) -> None:
                for setter in live:
                    setter(key, value)

            yield set_attribute

    @contextlib.contextmanager
    def observe_command(self, kind: str, flow_id: str) -> Iterator[SpanSetter]:
        """Time the block as one command of `kind` in a span, and tell its outcome at the end."""
        began = time.perf_counter()
        with self.span("flowstore.command", **{KIND: kind, FLOW_ID: flow_id}) as set_attribute:
            try:
                yield set_attribute
            except BaseException as exc:
                outcome = outcome_of(exc)
                set_attribute(OUTCOME, outcome)
                self.command(kind, outcome, time.perf_counter() - began)
                raise
            set_attribute(OUTCOME, "accepted")
            self.command(kind, "accepted", time.perf_counter() - began)


def _ignore(key: str, value: Any) -> None:
    """The attribute setter of no span."""


_NO_SPAN = contextlib.nullcontext(_ignore)  # reusable: nullcontext keeps no state

KIND = "flowstore.command.kind"
FLOW_ID = "flowstore.flow_id"
OUTCOME = "flowstore.command.outcome"
POSITION = "flowstore.log.position"
BATCH_SIZE = "flowstore.batch.size"
