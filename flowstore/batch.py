"""Transitions and administrative overrides: checked, decided on the instance, one or many at once.

`Transitions` turns a request (`execute_transition`, `set_flow_state`) into the decision function the
write path (`flowstore.commands.Commands`) applies, and applies many requests as one transaction per
batch (`execute_transitions`, `set_flow_states`): the batch's instances are read (from this process's
cache), decided in request order, and their events appended together; a conflict with another
writer applies that batch again one request at a time, each with the usual retries.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, cast
from uuid import UUID

from eventsourcing.persistence import IntegrityError
from pydantic import ValidationError

from flowstore.commands import Commands, cached_instance_id, definition_of
from flowstore.decisions import Decision, execute_transition, override_state, start_flow
from flowstore.domain import DomainEvent, FlowInstance, InstanceEvent, project
from flowstore.errors import FlowError, FlowNotFoundError, InvalidArgumentError
from flowstore.inputs import check_entity, check_message, check_payload, require_id
from flowstore.models import FlowState
from flowstore.telemetry import BATCH_SIZE, KIND, outcome_of
from flowstore.views import instance_state

__all__ = ["Transitions"]

Decide = Callable[[FlowInstance | None], Decision]
"""How a checked request decides its events on the instance as it stands (None: no state yet)."""

_Prepared = tuple[Callable[[], tuple[str, str, Decide]], Callable[[], "FlowState | FlowError"]]
"""One request of a batch: (check it and give (user, flow, decide), apply it on its own)."""


_RETRIED: list[FlowState | FlowError] = []
"""What `_apply_batch` returns when a conflict sends its requests back to be applied one by one."""


def _outcome(call: Callable[[], FlowState]) -> FlowState | FlowError:
    try:
        return call()
    except FlowError as error:
        return error


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
        decide = self._transition(
            user_id, flow_id, transition, payload, time.perf_counter(), ok=ok, message=message
        )
        return instance_state(
            self._commands.change_instance(user_id, flow_id, decide, kind="transition")
        )

    def set_flow_state(self, user_id: str, state: FlowState | Mapping[str, Any]) -> FlowState:
        """`FlowStore.set_flow_state`: check, then read, decide and append (with retries)."""
        flow_id, decide = self._override(user_id, state)
        return instance_state(
            self._commands.change_instance(user_id, flow_id, decide, kind="set_state")
        )

    def execute_transitions(
        self,
        requests: Iterable[tuple[str, str, str, dict[str, Any] | None]],
        *,
        batch_size: int = 500,
    ) -> list[FlowState | FlowError]:
        """`FlowStore.execute_transitions`: each request's new state or error, in request order."""

        def prepare(request: tuple[str, str, str, dict[str, Any] | None]) -> _Prepared:
            user_id, flow_id, transition, payload = request

            def decide() -> tuple[str, str, Decide]:
                began = time.perf_counter()
                return (
                    user_id,
                    flow_id,
                    self._transition(user_id, flow_id, transition, payload, began),
                )

            return decide, lambda: self._one(*request)

        return self._in_batches(map(prepare, requests), batch_size, "transition")

    def set_flow_states(
        self,
        updates: Iterable[tuple[str, FlowState | Mapping[str, Any]] | Mapping[str, Any]],
        *,
        batch_size: int = 500,
    ) -> list[FlowState | FlowError]:
        """`FlowStore.set_flow_states`: each update's new state or error, in order."""

        def prepare(update: Any) -> _Prepared:
            user_id, state = _state_update(update)

            def decide() -> tuple[str, str, Decide]:
                return user_id, *self._override(user_id, state)

            return decide, lambda: _outcome(lambda: self.set_flow_state(user_id, state))

        prepared = [prepare(update) for update in updates]  # a malformed update: nothing written
        return self._in_batches(prepared, batch_size, "set_state")

    def _in_batches(
        self, requests: Iterable[_Prepared], batch_size: int, kind: str
    ) -> list[FlowState | FlowError]:
        results: list[FlowState | FlowError] = []
        batch: list[_Prepared] = []
        for request in requests:
            batch.append(request)
            if len(batch) >= batch_size:
                results.extend(self._observed_batch(batch, kind))
                batch = []
        if batch:
            results.extend(self._observed_batch(batch, kind))
        return results

    def _observed_batch(self, batch: list[_Prepared], kind: str) -> list[FlowState | FlowError]:
        """`_apply_batch`, each request told to the observers as one command of `kind`.

        Each is timed at the batch's time per request (what the batch cost it); requests retried
        one by one after a conflict count as `conflict-retried`, then as single commands.
        """
        observers = self._commands.observers
        if not observers.active:
            return self._apply_batch(batch)
        began = time.perf_counter()
        with observers.span("flowstore.batch", **{KIND: kind, BATCH_SIZE: len(batch)}):
            try:
                results = self._apply_batch(batch, on_conflict=lambda: self._retried(kind, batch))
            except BaseException as exc:
                for _ in batch:
                    observers.command(kind, outcome_of(exc), 0.0)
                raise
        if results is _RETRIED:
            return [one() for _, one in batch]  # counted as single commands
        each = (time.perf_counter() - began) / len(batch)
        for result in results:
            observers.command(
                kind, outcome_of(result if isinstance(result, FlowError) else None), each
            )
        return results

    def _retried(self, kind: str, batch: list[_Prepared]) -> None:
        for _ in batch:
            self._commands.observers.command(kind, "conflict-retried", 0.0)

    def _apply_batch(
        self, batch: list[_Prepared], *, on_conflict: Callable[[], None] | None = None
    ) -> list[FlowState | FlowError]:
        checked: list[tuple[UUID, Decide] | FlowError] = []
        for prepare, _ in batch:
            try:
                user_id, flow_id, decide = prepare()
                require_id(flow_id, "flow_id")
                checked.append((cached_instance_id(user_id, flow_id), decide))
            except FlowError as error:
                checked.append(error)
        iids = [item[0] for item in checked if not isinstance(item, FlowError)]
        # The batch's instances are this process's alone until it is written (see Commands).
        with self._commands.locked(iids):
            outcomes: list[FlowInstance | FlowError] = []
            events: list[DomainEvent] = []
            seen: dict[UUID, FlowInstance | None] = {}  # later requests see earlier ones' effects
            for item in checked:
                if isinstance(item, FlowError):
                    outcomes.append(item)
                    continue
                iid, decide = item
                try:
                    if iid not in seen:
                        seen[iid] = self._commands.cached_instance(iid)
                    decision = decide(seen[iid])
                except FlowError as error:
                    outcomes.append(error)
                    continue
                updated = cast(FlowInstance, project(seen[iid], decision.events))
                seen[iid] = updated
                events.extend(decision.events)
                outcomes.append(decision.error or updated)
            try:
                self._commands.save(events, decided_here=True)
                conflict = False
            except IntegrityError:
                conflict = True
                for iid in seen:
                    self._commands.forget_instance(iid)
            if not conflict:
                for instance in seen.values():
                    if instance is not None:
                        self._commands.remember_instance(instance)
        if conflict:
            if on_conflict is not None:
                on_conflict()
                return _RETRIED  # the caller retries them, observed one by one
            # One by one, and outside the instance locks: each takes its user's key lock first,
            # then its instance's, the order every command keeps (no deadlock with them).
            return [one() for _, one in batch]
        return [o if isinstance(o, FlowError) else instance_state(o) for o in outcomes]

    def _one(
        self, user_id: str, flow_id: str, transition: str, payload: dict[str, Any] | None
    ) -> FlowState | FlowError:
        return _outcome(lambda: self.execute_transition(user_id, flow_id, transition, payload))

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
    ) -> Decide:
        """Check a transition request's input, and return how to decide it on an instance."""
        require_id(user_id, "user_id")
        require_id(transition, "transition")
        checked = check_payload(payload, limit=self.max_payload_bytes)
        if not isinstance(ok, bool):
            raise InvalidArgumentError("ok", ok, f"must be a boolean, not {type(ok).__name__}")
        checked_message = check_message(message, self.max_payload_bytes)
        commands = self._commands

        def decide(instance: FlowInstance | None) -> Decision:
            needed = instance.definition_version if instance and instance.is_live else 0
            versions = commands.command_versions(flow_id, needed)
            now = commands.clock()
            started: list[InstanceEvent] = []
            if instance is None or not instance.is_live:
                started = start_flow(
                    instance, versions.latest, user_id=user_id, now=now, reason="start"
                )
                instance = cast(FlowInstance, project(instance, started))
            definition = definition_of(instance, versions)
            decision = execute_transition(
                instance,
                definition,
                transition=transition,
                payload=checked,
                now=now,
                elapsed_ms=(time.perf_counter() - began) * 1000,
                ok=ok,
                message=checked_message,
            )
            return Decision([*started, *decision.events], decision.error)

        return decide

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
