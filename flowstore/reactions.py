"""In-process reactions: `FlowStore.on(kind, handler)` callbacks run after a command commits.

A handler is called with the event (`flowstore.domain` events) in the thread that ran the command,
after the append committed and outside the write lock: it sees a change that is already durable and
cannot undo it. An exception in a handler is logged with its traceback and the command's result is
unaffected; the other handlers still run. Handlers see this process's commands only: to react to
every change, whichever process made it, and exactly once across crashes, use `FlowStore.follow`.

| kind | event | `step` matches |
|---|---|---|
| `flow_started` | FlowStarted (a first transition or a reset) | the step entered |
| `step_entered` | FlowStarted, TransitionExecuted, StateOverridden, FlowMigrated, FlowWentBack, FlowHandedOver | the step entered |
| `transition_taken` | TransitionExecuted | the step entered |
| `transition_rejected` | TransitionRejected | the step the user stayed at |
| `went_back` | FlowWentBack (`go_back`) | the step returned to |
| `handed_over` | FlowHandedOver (`adopt_state_token`) | the step taken over at |
| `flow_completed` | FlowCompleted | the terminal step |
| `flow_cleared` | FlowCleared | the step left |
| `flow_expired` | FlowExpired | the step left |
| `flow_erased` | FlowErased | the step left |
| `*` | every event of a user's flow | as above for its kind |
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from flowstore.domain import (
    DomainEvent,
    FlowCleared,
    FlowCompleted,
    FlowErased,
    FlowExpired,
    FlowHandedOver,
    FlowMigrated,
    FlowStarted,
    FlowWentBack,
    InstanceEvent,
    StateOverridden,
    TransitionExecuted,
    TransitionRejected,
)
from flowstore.errors import InvalidArgumentError

__all__ = ["KINDS", "Handler", "Reactions", "event_kinds", "event_step"]

_log = logging.getLogger(__name__)

Handler = Callable[[InstanceEvent], object]
"""A reaction: called with the event; its return value is ignored."""

KINDS: dict[str, tuple[type[InstanceEvent], ...]] = {
    "flow_started": (FlowStarted,),
    "step_entered": (
        FlowStarted,
        TransitionExecuted,
        StateOverridden,
        FlowMigrated,
        FlowWentBack,
        FlowHandedOver,
    ),
    "transition_taken": (TransitionExecuted,),
    "transition_rejected": (TransitionRejected,),
    "went_back": (FlowWentBack,),
    "handed_over": (FlowHandedOver,),
    "flow_completed": (FlowCompleted,),
    "flow_cleared": (FlowCleared,),
    "flow_expired": (FlowExpired,),
    "flow_erased": (FlowErased,),
}
"""The kinds `on` accepts (besides "*"), and the events each matches."""


def event_step(event: InstanceEvent) -> str | None:
    """The step an event is about: the step entered, else the step the user was at."""
    for field in ("to_step", "step", "from_step"):
        value = getattr(event, field, None)
        if isinstance(value, str):
            return value
    return None


def event_kinds(event: DomainEvent) -> list[str]:
    """Every kind (of `KINDS`) the event matches."""
    return [kind for kind, types in KINDS.items() if isinstance(event, types)]


@dataclass(frozen=True)
class _Reaction:
    kind: str
    handler: Handler
    flow: str | None
    step: str | None

    def matches(self, event: InstanceEvent) -> bool:
        if self.kind != "*" and not isinstance(event, KINDS[self.kind]):
            return False
        if self.flow is not None and event.flow_id != self.flow:
            return False
        return self.step is None or event_step(event) == self.step


class Reactions:
    """The registered handlers of one store, and their dispatch after each append."""

    def __init__(self) -> None:
        self._reactions: tuple[_Reaction, ...] = ()

    def on(
        self, kind: str, handler: Handler, *, flow: str | None = None, step: str | None = None
    ) -> Callable[[], None]:
        """Register `handler` for `kind` (see the module docstring); returns the remover."""
        if kind != "*" and kind not in KINDS:
            raise InvalidArgumentError("event_kind", kind, f"one of {['*', *KINDS]}")
        if not callable(handler):
            raise InvalidArgumentError("handler", handler, "a callable taking the event")
        if inspect.iscoroutinefunction(handler):  # its coroutine would never be awaited
            raise InvalidArgumentError(
                "handler", handler, "a coroutine function: use AsyncFlowStore.on"
            )
        for field, value in (("flow", flow), ("step", step)):
            if value is not None and (not isinstance(value, str) or not value):
                raise InvalidArgumentError(field, value, "a non-empty string or None")
        reaction = _Reaction(kind, handler, flow, step)
        # Replaced, never mutated: a dispatch running in another thread keeps its own tuple.
        self._reactions = (*self._reactions, reaction)

        def remove() -> None:
            self._reactions = tuple(r for r in self._reactions if r is not reaction)

        return remove

    def dispatch(self, events: Sequence[DomainEvent]) -> None:
        """Call the matching handlers for committed `events`, in order; log what they raise."""
        reactions = self._reactions
        if not reactions:
            return
        for event in events:
            if not isinstance(event, InstanceEvent):
                continue
            for reaction in reactions:
                if not reaction.matches(event):
                    continue
                try:
                    reaction.handler(event)
                except Exception:
                    # The command has committed: its caller must see its result, not the
                    # handler's failure, which is reported here instead.
                    _log.exception(
                        "reaction %r to %s on %s/%s failed",
                        reaction.handler,
                        type(event).__name__,
                        event.user_id,
                        event.flow_id,
                    )
