"""Transitions and administrative overrides: checked, decided on the instance, one or many at once.

`Transitions` turns a request (`execute_transition`, `set_flow_state`) into the decision function the
write path (`flowstore.commands.Commands`) applies, and applies many requests as one transaction per
batch (`execute_transitions`, `set_flow_states`): the batch's instances are read (from this process's
cache), decided in request order, and their events appended together; a conflict with another
writer applies that batch again one request at a time, each with the usual retries.

A batch of transitions does each thing once that a request would otherwise repeat: an id seen twice
in a batch is checked once, each flow's definitions are looked up once, each instance is read once
and copied once per request (`domain.project` folds a request's events into one copy), the events
are built from checked values without validating them again (`decisions.execute_transition`) and
appended in one go (encoded from their values: `codec`), the answers are built from the aggregates
without validation (`views`), and no cyclic garbage collection runs meanwhile (the batch's objects
make no cycles: `gcpause`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from itertools import islice
from typing import Any, Generic, NamedTuple, TypeVar
from uuid import UUID

from eventsourcing.persistence import IntegrityError
from pydantic import ValidationError

from flowstore.commands import Commands, definition_of
from flowstore.decisions import Decision, execute_transition, override_state, start_flow
from flowstore.domain import (
    DomainEvent,
    FlowInstance,
    FlowVersions,
    InstanceEvent,
    instance_id,
    project,
)
from flowstore.errors import FlowError, FlowNotFoundError, InvalidArgumentError
from flowstore.gcpause import reference_counting_only
from flowstore.inputs import check_entity, check_message, check_payload, require_id
from flowstore.models import FlowState
from flowstore.telemetry import BATCH_SIZE, KIND, outcome_of
from flowstore.views import instance_state

__all__ = ["Transitions"]

Decide = Callable[[FlowInstance | None], Decision]
"""How a checked request decides its events on the instance as it stands (None: no state yet)."""

R = TypeVar("R")
"""A request of a batch, as the caller gave it."""

C = TypeVar("C")
"""A request of a batch, checked: what deciding it needs."""

TransitionRequest = tuple[str, str, str, dict[str, Any] | None]
"""`(user_id, flow_id, transition, payload)`, as `execute_transitions` takes them."""


@dataclass(frozen=True)
class _Kind(Generic[R, C]):
    """How a batch of one kind of request is checked, decided and, after a conflict, retried."""

    name: str
    """The command's kind, as the observers are told it (`transition`, `set_state`)."""
    check: Callable[[list[R]], list[tuple[UUID, C] | FlowError]]
    """Each request's instance id and checked form, or why it is refused, in request order."""
    decide: Callable[[C, FlowInstance | None], Decision]
    """A checked request's decision on its instance as the batch's earlier requests left it."""
    one: Callable[[R], FlowState | FlowError]
    """The request applied on its own (after a conflict), with the usual retries."""


class _Transition(NamedTuple):
    """A transition request whose inputs passed their checks."""

    user_id: str
    flow_id: str
    transition: str
    payload: dict[str, Any] | None
    """`check_payload`'s copy: this request's own."""
    began: float
    """When its checks began (`time.perf_counter()`): its decision records the time since."""
    ok: bool = True
    message: str | None = None


_UNREAD: Any = object()
"""Stands in `_decide_and_save` for an instance the batch has not read yet."""

_RETRIED: list[FlowState | FlowError] = []
"""What `_apply_batch` returns when a conflict sends its requests back to be applied one by one."""


def _outcome(call: Callable[[], FlowState]) -> FlowState | FlowError:
    try:
        return call()
    except FlowError as error:
        return error


def _batches(items: Iterable[R], size: int) -> Iterator[list[R]]:
    """`items` in lists of `size` (the last one shorter)."""
    iterator = iter(items)
    while batch := list(islice(iterator, size)):
        yield batch


def _state_update(update: Any) -> tuple[str, FlowState | Mapping[str, Any]]:
    """`(user_id, state)` or the seed's `{"userId": ..., "state": ...}`."""
    if isinstance(update, Mapping):
        user_id, state = update.get("userId", update.get("user_id")), update.get("state")
    elif isinstance(update, tuple) and len(update) == 2:
        user_id, state = update
    else:
        user_id, state = None, None
    if not isinstance(user_id, str) or not isinstance(state, FlowState | Mapping):
        raise InvalidArgumentError(
            "updates", update, 'each must be (user_id, state) or {"userId": ..., "state": {...}}'
        )
    return user_id, state


class Transitions:
    """`FlowStore`'s transitions and overrides, one at a time and in batches (see the module)."""

    def __init__(self, commands: Commands, *, max_payload_bytes: int) -> None:
        self._commands = commands
        self.max_payload_bytes = max_payload_bytes
        """The largest payload or message (bytes) a request may carry."""

    def execute_transition(
        self,
        user_id: str,
        flow_id: str,
        transition: str,
        payload: dict[str, Any] | None = None,
        *,
        ok: bool = True,
        message: str | None = None,
    ) -> FlowState:
        """`FlowStore.execute_transition`: check, then read, decide and append (with retries)."""
        request = self._transition(
            user_id, flow_id, transition, payload, time.perf_counter(), ok=ok, message=message
        )
        return instance_state(
            self._commands.change_instance(
                user_id,
                flow_id,
                lambda instance: self._decide_transition(request, instance),
                kind="transition",
            )
        )

    def set_flow_state(self, user_id: str, state: FlowState | Mapping[str, Any]) -> FlowState:
        """`FlowStore.set_flow_state`: check, then read, decide and append (with retries)."""
        flow_id, decide = self._override(user_id, state)
        return instance_state(
            self._commands.change_instance(user_id, flow_id, decide, kind="set_state")
        )

    def execute_transitions(
        self, requests: Iterable[TransitionRequest], *, batch_size: int = 500
    ) -> list[FlowState | FlowError]:
        """`FlowStore.execute_transitions`: each request's new state or error, in request order."""
        # One definitions lookup per flow and batch (`_decide_transition` looks again for an
        # instance on a newer version than the one looked up).
        known: dict[str, FlowVersions] = {}
        decide = self._decide_transition
        kind: _Kind[TransitionRequest, _Transition] = _Kind(
            "transition",
            self._check_transitions,
            # A closure, not `partial(..., known=known)`: that builds a dict of keywords per call.
            lambda request, instance: decide(request, instance, known),
            lambda request: _outcome(lambda: self.execute_transition(*request)),
        )
        results: list[FlowState | FlowError] = []
        for batch in _batches(requests, batch_size):
            # Each a 4-tuple (a malformed request raises here, before its batch writes anything).
            batch = [(user_id, flow_id, name, payload) for user_id, flow_id, name, payload in batch]
            known.clear()  # each batch sees definitions as they are when it starts
            results.extend(self._observed_batch(batch, kind))
        return results

    def set_flow_states(
        self,
        updates: Iterable[tuple[str, FlowState | Mapping[str, Any]] | Mapping[str, Any]],
        *,
        batch_size: int = 500,
    ) -> list[FlowState | FlowError]:
        """`FlowStore.set_flow_states`: each update's new state or error, in order."""
        # A malformed update raises here: nothing is written.
        parsed = [_state_update(update) for update in updates]

        def check(batch: list[tuple[str, FlowState | Mapping[str, Any]]]) -> list[Any]:
            checked: list[tuple[UUID, Decide] | FlowError] = []
            for user_id, state in batch:
                try:
                    flow_id, decide = self._override(user_id, state)
                    require_id(flow_id, "flow_id")
                    checked.append((instance_id(user_id, flow_id), decide))
                except FlowError as error:
                    checked.append(error)
            return checked

        kind: _Kind[tuple[str, FlowState | Mapping[str, Any]], Decide] = _Kind(
            "set_state",
            check,
            lambda decide, instance: decide(instance),
            lambda update: _outcome(lambda: self.set_flow_state(*update)),
        )
        results: list[FlowState | FlowError] = []
        for batch in _batches(parsed, batch_size):
            results.extend(self._observed_batch(batch, kind))
        return results

    def _observed_batch(self, batch: list[R], kind: _Kind[R, C]) -> list[FlowState | FlowError]:
        """`_apply_batch`, each request told to the observers as one command of its kind.

        Each is timed at the batch's time per request (what the batch cost it); requests retried
        one by one after a conflict count as `conflict-retried`, then as single commands.
        """
        observers = self._commands.observers
        if not observers.active:
            return self._apply_batch(batch, kind)
        began = time.perf_counter()
        with observers.span("flowstore.batch", **{KIND: kind.name, BATCH_SIZE: len(batch)}):
            try:
                results = self._apply_batch(
                    batch, kind, on_conflict=lambda: self._retried(kind.name, batch)
                )
            except BaseException as exc:
                for _ in batch:
                    observers.command(kind.name, outcome_of(exc), 0.0)
                raise
        if results is _RETRIED:
            return [kind.one(request) for request in batch]  # counted as single commands
        each = (time.perf_counter() - began) / len(batch)
        for result in results:
            observers.command(
                kind.name, outcome_of(result if isinstance(result, FlowError) else None), each
            )
        return results

    def _retried(self, kind: str, batch: list[Any]) -> None:
        for _ in batch:
            self._commands.observers.command(kind, "conflict-retried", 0.0)

    def _apply_batch(
        self,
        batch: list[R],
        kind: _Kind[R, C],
        *,
        on_conflict: Callable[[], None] | None = None,
    ) -> list[FlowState | FlowError]:
        with reference_counting_only():  # a batch makes thousands of objects, and no cycles
            outcomes = self._decide_and_save(kind.check(batch), kind.decide)
            if outcomes is not None:
                return [o if isinstance(o, FlowError) else instance_state(o) for o in outcomes]
        if on_conflict is not None:
            on_conflict()
            return _RETRIED  # the caller retries them, observed one by one
        # One by one, and outside the instance locks: each takes its user's key lock first,
        # then its instance's, the order every command keeps (no deadlock with them).
        return [kind.one(request) for request in batch]

    def _decide_and_save(
        self,
        checked: list[tuple[UUID, C] | FlowError],
        decide: Callable[[C, FlowInstance | None], Decision],
    ) -> list[FlowInstance | FlowError] | None:
        """Decide each checked request, append all their events; None after a conflict.

        Each request is decided on its instance as the requests before it left it; the instances
        of a batch are read once (from this process's cache) and cached again after the append.
        """
        commands = self._commands
        iids = [item[0] for item in checked if not isinstance(item, FlowError)]
        # The batch's instances are this process's alone until it is written (see Commands).
        with commands.locked(iids):
            # Later requests see earlier ones' effects; those not cached are read when first met.
            # Keyed by the ids' integers: `UUID.__hash__` is a Python method (three a request).
            seen = commands.cached_instances(iids)
            outcomes: list[FlowInstance | FlowError] = []
            events: list[DomainEvent] = []
            for item in checked:
                if isinstance(item, FlowError):
                    outcomes.append(item)
                    continue
                iid, request = item
                key = iid.int
                try:
                    instance = seen.get(key, _UNREAD)
                    if instance is _UNREAD:
                        instance = seen[key] = commands.cached_instance(iid)
                    decision = decide(request, instance)
                except FlowError as error:
                    outcomes.append(error)
                    continue
                decided, refused = decision
                updated = project(instance, decided)
                assert updated is not None  # (a decision has events)
                seen[key] = updated
                events += decided
                outcomes.append(refused or updated)
            try:
                commands.save(events, decided_here=True)
            except IntegrityError:
                for iid in iids:
                    commands.forget_instance(iid)
                return None
            commands.remember_instances(
                [instance for instance in seen.values() if instance is not None]
            )
        return outcomes

    def _check_transitions(
        self, batch: list[TransitionRequest]
    ) -> list[tuple[UUID, _Transition] | FlowError]:
        """Each request's instance id and checked form, or its error (in the order
        `execute_transition` checks: user, transition, payload, flow). An id that recurs in the
        batch is checked once (ids are strings: their check's verdict cannot change)."""
        limit = self.max_payload_bytes
        perf_counter = time.perf_counter
        # The ids already checked, per argument. Only exact strings are remembered: an id's
        # verdict cannot change, and a str subclass (whose methods may differ) is checked again.
        users: set[str] = set()
        transitions: set[str] = set()
        flows: set[str] = set()
        checked: list[tuple[UUID, _Transition] | FlowError] = []
        for user_id, flow_id, transition, payload in batch:
            began = perf_counter()
            try:
                if type(user_id) is not str or user_id not in users:
                    users.add(require_id(user_id, "user_id"))
                if type(transition) is not str or transition not in transitions:
                    transitions.add(require_id(transition, "transition"))
                request = _Transition(
                    user_id, flow_id, transition, check_payload(payload, limit=limit), began
                )
                if type(flow_id) is not str or flow_id not in flows:
                    flows.add(require_id(flow_id, "flow_id"))
                checked.append((instance_id(user_id, flow_id), request))
            except FlowError as error:
                checked.append(error)
        return checked

    def _transition(
        self,
        user_id: str,
        flow_id: str,
        transition: str,
        payload: dict[str, Any] | None,
        began: float,
        *,
        ok: bool = True,
        message: str | None = None,
    ) -> _Transition:
        """Check a transition request's input (all but the flow id, which the write path checks)."""
        require_id(user_id, "user_id")
        require_id(transition, "transition")
        checked = check_payload(payload, limit=self.max_payload_bytes)
        if not isinstance(ok, bool):
            raise InvalidArgumentError("ok", ok, f"must be a boolean, not {type(ok).__name__}")
        checked_message = check_message(message, self.max_payload_bytes)
        return _Transition(user_id, flow_id, transition, checked, began, ok, checked_message)

    def _decide_transition(
        self,
        request: _Transition,
        instance: FlowInstance | None,
        known: dict[str, FlowVersions] | None = None,
    ) -> Decision:
        """A checked transition's decision on the instance (starting its run if it has none).

        `known`: the flow definitions a batch has looked up so far (by flow id), to use and add to.
        """
        commands = self._commands
        flow_id = request.flow_id
        live = instance is not None and instance.is_live
        needed = instance.definition_version if instance is not None and live else 0
        versions = known.get(flow_id) if known is not None else None
        if versions is None or needed > len(versions.definitions):
            versions = commands.command_versions(flow_id, needed)
            if known is not None:
                known[flow_id] = versions
        now = commands.clock()
        started: list[InstanceEvent] | None = None
        if not live:
            started = start_flow(
                instance, versions.latest, user_id=request.user_id, now=now, reason="start"
            )
            instance = project(instance, started)
        assert instance is not None
        decision = execute_transition(
            instance,
            definition_of(instance, versions),
            transition=request.transition,
            payload=request.payload,
            now=now,
            elapsed_ms=(time.perf_counter() - request.began) * 1000,
            ok=request.ok,
            message=request.message,
        )
        if started is None:
            return decision
        return Decision([*started, *decision.events], decision.error)

    def _override(self, user_id: str, state: FlowState | Mapping[str, Any]) -> tuple[str, Decide]:
        """Check an override's input; the flow it is in and the decision it makes."""
        require_id(user_id, "user_id")
        if not isinstance(state, FlowState):
            try:
                state = FlowState.model_validate(state)
            except ValidationError as exc:
                raise InvalidArgumentError("state", state, str(exc)) from None
        new = state
        if new.service is not None:
            require_id(new.service, "service")
        payload = check_payload(new.payload, limit=self.max_payload_bytes)
        entity = check_entity(new.entity_id)
        message = check_message(new.message, self.max_payload_bytes)
        commands = self._commands

        def decide(instance: FlowInstance | None) -> Decision:
            versions = commands.live_versions(new.flow)
            version = new.definition_version or (
                instance.definition_version if instance and instance.is_live else None
            )
            definition = versions.get(version)
            if definition is None:
                raise FlowNotFoundError(
                    new.flow, f"Flow {new.flow!r} has no version {version}", version=version
                )
            return Decision(
                override_state(
                    instance,
                    definition,
                    user_id=user_id,
                    step=new.step,
                    service=new.service,
                    ok=new.ok,
                    payload=payload,
                    now=commands.clock(),
                    previous=new.previous,
                    entity_id=entity,
                    message=message,
                )
            )

        return new.flow, decide
