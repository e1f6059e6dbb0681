"""The write path: read the aggregate, decide with a pure function, append; retry on a conflict.

Every command on a user's flow follows one path (`Commands.change_instance`): read the instance,
decide the events with a function from `flowstore.decisions`, append them. A concurrent append to the
same instance makes the append fail on its version; the command then re-reads and decides again,
so a transition is always validated against the state it is applied to. Definitions go through
`Commands.append`. The caches here hold immutable values only (frozen aggregates, definitions).
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from typing import cast
from uuid import UUID

from eventsourcing.persistence import IntegrityError

from flowstore.decisions import Decision
from flowstore.definitions import FlowDefinition
from flowstore.domain import (
    DomainEvent,
    FlowInstance,
    FlowVersions,
    definition_id,
    instance_id,
    project,
)
from flowstore.errors import (
    ConcurrencyConflictError,
    FlowNotFoundError,
    FlowStateCorruptionError,
    FlowStateNotFoundError,
    StorageUnavailableError,
)
from flowstore.eventlog import EventLog, backoff
from flowstore.inputs import require_id
from flowstore.models import FlowStatus
from flowstore.reactions import Reactions
from flowstore.telemetry import POSITION, Observers

__all__ = ["Commands", "definition_of", "is_expired"]

_log = logging.getLogger(__name__)

_LOCK_STRIPES = 256
"""Locks that serialise commands on one instance within a process (an instance maps to one)."""


class Commands:
    """Sequences commands against the log: caches, optimistic retries, definition listeners."""

    def __init__(
        self,
        log: EventLog,
        *,
        clock: Callable[[], datetime],
        max_retries: int,
        cache_size: int,
        definition_refresh: float,
        written: Callable[[int], None],
    ) -> None:
        self.log = log
        self.clock = clock
        self.max_retries = max_retries
        self.definition_refresh = definition_refresh
        self._cache_size = cache_size
        self._written = written  # told the log position after every append (the live projector)
        self._cache_lock = threading.Lock()
        # By the ids' integers: a UUID's hash and equality are Python methods, an int's are not.
        self._instances: OrderedDict[int, FlowInstance] = OrderedDict()
        self._definitions: dict[str, tuple[FlowVersions, float]] = {}
        self._listeners: tuple[Callable[[str], None], ...] = ()
        self.reactions = Reactions()
        """The in-process handlers `FlowStore.on` registers, called after each append."""
        self.observers = Observers()
        """Told each command's kind, outcome and latency, in spans (metrics, tracing)."""
        # Threads of one process on one instance take turns: they would otherwise read the same
        # version and all but one fail their append and retry, which only processes need to do.
        self._instance_locks = tuple(threading.RLock() for _ in range(_LOCK_STRIPES))

    def _stripe(self, iid: UUID) -> int:
        return iid.int % _LOCK_STRIPES

    @contextmanager
    def locked(self, iids: Iterable[UUID]) -> Iterator[None]:
        """Hold the locks of these instances (in one order everywhere, so no two callers deadlock)."""
        # Taken and released by hand: a batch takes up to all of them, and an `ExitStack` of
        # as many contexts cost a microsecond per request of a batch.
        stripe = self._stripe
        locks = [self._instance_locks[s] for s in sorted({stripe(iid) for iid in iids})]
        held = 0
        try:
            for lock in locks:
                lock.acquire()
                held += 1
            yield
        finally:
            for lock in reversed(locks[:held]):
                lock.release()

    # Appending

    def save(
        self, events: Sequence[DomainEvent], *, decided_here: bool = False, react: bool = True
    ) -> None:
        """Append events (all or none), hand the new position to the live projector, then react.

        The reactions (`FlowStore.on`) run after the commit and outside the write lock; `react`
        False skips them (an import replays the past).
        """
        with self.observers.span("flowstore.append") as set_attribute:
            position = self.log.save(events, decided_here=decided_here)
            set_attribute(POSITION, position)  # the projector's span links to it by position
        if position:
            self._written(position)
        if react:
            self.reactions.dispatch(events)

    def change_instance(
        self,
        user_id: str,
        flow_id: str,
        decide: Callable[[FlowInstance | None], Decision],
        *,
        kind: str,
        persistent: bool = False,
    ) -> FlowInstance:
        """Read, decide, append; on a concurrent append, read the fresh state and decide again.

        The user's key lock is held from key lookup (sealing) to append, so an erasure in this
        process never shreds the key between the two. `persistent` retries without a limit (an
        erasure must not give up because the user keeps writing: each conflict is their progress).
        `kind` names the command to the store's observers (`transition`, `reset`, ...).
        """
        require_id(flow_id, "flow_id")  # before the span: its attributes hold valid ids only
        if not self.observers.active:
            with self.log.keys.user_lock(user_id):
                return self._change_instance(user_id, flow_id, decide, persistent=persistent)
        with self.observers.observe_command(kind, flow_id), self.log.keys.user_lock(user_id):
            return self._change_instance(user_id, flow_id, decide, persistent=persistent, kind=kind)

    def _change_instance(
        self,
        user_id: str,
        flow_id: str,
        decide: Callable[[FlowInstance | None], Decision],
        *,
        persistent: bool,
        kind: str = "",
    ) -> FlowInstance:
        iid = instance_id(user_id, flow_id)
        # Threads of this process take turns on one instance (inside the user's key lock).
        with self._instance_locks[self._stripe(iid)]:
            return self._decide_and_append(
                user_id, flow_id, iid, decide, persistent=persistent, kind=kind
            )

    def _decide_and_append(
        self,
        user_id: str,
        flow_id: str,
        iid: UUID,
        decide: Callable[[FlowInstance | None], Decision],
        *,
        persistent: bool,
        kind: str,
    ) -> FlowInstance:
        attempts = itertools.count() if persistent else iter(range(self.max_retries))
        for attempt in attempts:
            # The first attempt trusts this process's last known state; if another writer moved
            # the instance on, the append fails on its version and the retry reads it fresh.
            with self.observers.span("flowstore.decide"):
                instance = self.cached_instance(iid) if attempt == 0 else self.get_instance(iid)
                decision = decide(instance)
            if not decision.events:
                if instance is None:
                    raise FlowStateNotFoundError(user_id, flow_id)
                return instance
            try:
                self.save(decision.events, decided_here=True)
            except IntegrityError:
                self.forget_instance(iid)
                self.observers.command(kind, "conflict-retried", 0.0)
                self.backoff(attempt)
                continue
            except StorageUnavailableError:
                self.forget_instance(iid)  # a commit cut off in flight may still have landed
                raise
            updated = cast(FlowInstance, project(instance, decision.events))
            self.remember_instance(updated)
            if decision.error is not None:
                raise decision.error
            return updated
        raise ConcurrencyConflictError(user_id, flow_id, self.max_retries)

    def append(
        self, decide: Callable[[], list[DomainEvent]], *, user_id: str, flow_id: str, kind: str
    ) -> None:
        """Append definition/catalog events, deciding again after a concurrent append."""
        if not self.observers.active:
            self._append(decide, user_id=user_id, flow_id=flow_id, kind=kind)
            return
        with self.observers.observe_command(kind, flow_id):
            self._append(decide, user_id=user_id, flow_id=flow_id, kind=kind)

    def _append(
        self, decide: Callable[[], list[DomainEvent]], *, user_id: str, flow_id: str, kind: str
    ) -> None:
        for attempt in range(self.max_retries):
            with self.observers.span("flowstore.decide"):
                events = decide()  # reads through the log, which reports a storage outage
            try:
                self.save(events, decided_here=True)
            except IntegrityError:
                self.observers.command(kind, "conflict-retried", 0.0)
                self.backoff(attempt)
                continue
            with self._cache_lock:
                self._definitions.pop(flow_id, None)
            self._definition_changed(flow_id)
            return
        raise ConcurrencyConflictError(user_id, flow_id, self.max_retries)

    def backoff(self, attempt: int) -> None:
        """Pause after the `attempt`th conflicting append (one place, so it can be observed)."""
        backoff(attempt)

    # Definition listeners

    def on_definition_change(self, listener: Callable[[str], None]) -> Callable[[], None]:
        """Call `listener(flow_id)` after a definition change made here; returns the remover."""
        self._listeners = (*self._listeners, listener)

        def remove() -> None:
            self._listeners = tuple(known for known in self._listeners if known is not listener)

        return remove

    def _definition_changed(self, flow_id: str) -> None:
        for listener in self._listeners:
            try:
                listener(flow_id)
            except Exception:
                # The change is already committed: a failing listener must not make it look
                # failed to the caller, so it is logged and the others still run.
                _log.exception("definition listener %r failed for flow %r", listener, flow_id)

    # Reading aggregates

    def get_instance(self, iid: UUID) -> FlowInstance | None:
        """The instance as the log has it (not this process's cache)."""
        return self.log.get(iid, FlowInstance)

    def cached_instance(self, iid: UUID) -> FlowInstance | None:
        """This process's last known state of the instance, else the log's."""
        with self._cache_lock:
            cached = self._instances.get(iid.int)
            if cached is not None:
                self._instances.move_to_end(iid.int)
                return cached
        return self.get_instance(iid)

    def cached_instances(self, iids: Iterable[UUID]) -> dict[int, FlowInstance | None]:
        """Those of these instances this process has cached (a batch's, under one lock), by
        their ids' integers (`UUID.__hash__` is a Python method; `int`'s is not).

        Their places in the cache's order stay as they are: the batch remembers each of them
        afterwards (`remember_instances`), which makes them the most recently used.
        """
        with self._cache_lock:
            get = self._instances.get
            return {key: cached for iid in iids if (cached := get(key := iid.int)) is not None}

    def remember_instance(self, instance: FlowInstance) -> None:
        """Cache the instance's newest state (least recently used ones go first)."""
        self.remember_instances((instance,))

    def remember_instances(self, instances: Iterable[FlowInstance]) -> None:
        """Cache these instances' newest states (least recently used ones go first)."""
        with self._cache_lock:
            cache = self._instances
            for instance in instances:
                key = instance.id.int
                cache[key] = instance
                cache.move_to_end(key)
            while len(cache) > self._cache_size:
                cache.popitem(last=False)

    def forget_instance(self, iid: UUID) -> None:
        """Drop the cached state: the next command reads the instance from the log."""
        with self._cache_lock:
            self._instances.pop(iid.int, None)

    def versions(self, flow_id: str) -> FlowVersions:
        """Every version of the flow's definition (deleted or not); `FlowNotFoundError` if none."""
        require_id(flow_id, "flow_id")
        versions = self.log.get(definition_id(flow_id), FlowVersions)
        if versions is None:
            raise FlowNotFoundError(flow_id)
        return versions

    def live_versions(self, flow_id: str) -> FlowVersions:
        """The flow's versions, or `FlowNotFoundError` if it does not exist or was deleted."""
        versions = self.versions(flow_id)
        if versions.deleted:
            raise FlowNotFoundError(flow_id, f"Flow {flow_id!r} was deleted", deleted=True)
        return versions

    def command_versions(self, flow_id: str, needed_version: int) -> FlowVersions:
        """The flow's definitions for a transition, cached for `definition_refresh` seconds.

        Versions never change once written, so a cached copy is only stale about new versions and
        deletion; this process's own changes drop the cache at once, other processes' are seen
        within `definition_refresh` seconds (or at once if an instance needs a newer version).
        """
        now = time.monotonic()
        with self._cache_lock:
            cached = self._definitions.get(flow_id)
        if (
            cached is not None
            and now - cached[1] < self.definition_refresh
            and needed_version <= len(cached[0].definitions)
        ):
            return cached[0]
        versions = self.live_versions(flow_id)
        with self._cache_lock:
            self._definitions[flow_id] = (versions, now)
        return versions


def definition_of(instance: FlowInstance, versions: FlowVersions) -> FlowDefinition:
    """The definition version the instance runs on; corruption if it or its step is missing."""
    definition = versions.get(instance.definition_version)
    if definition is None:
        raise FlowStateCorruptionError(
            instance.user_id,
            instance.flow_id,
            f"runs on definition version {instance.definition_version}, which does not exist",
        )
    step = instance.step
    if step is not None and step not in definition.steps:  # (`definition.step`, a call less)
        raise FlowStateCorruptionError(
            instance.user_id,
            instance.flow_id,
            f"step {instance.step!r} does not exist in version {instance.definition_version}",
        )
    return definition


def is_expired(instance: FlowInstance, now: datetime) -> bool:
    """An active instance whose ttl has run out."""
    return (
        instance.status is FlowStatus.ACTIVE
        and instance.expires_at is not None
        and instance.expires_at <= now
    )
