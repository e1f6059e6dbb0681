"""Appending events recorded elsewhere (a restore from Kafka or another store), as they are."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from eventsourcing.persistence import IntegrityError

from flowstore.commands import Commands
from flowstore.domain import DomainEvent, FlowErased, FlowInstance
from flowstore.errors import ConcurrencyConflictError

__all__ = ["import_events"]


def import_events(
    commands: Commands,
    events: Iterable[DomainEvent],
    *,
    shred: Callable[[str], None],
    batch: int = 500,
) -> int:
    """Append `events` in batches with their own ids, versions and times; return how many.

    Each aggregate's events must come in version order without duplicates; an event whose version
    is already taken raises `ConcurrencyConflictError` and its batch is not written. A `FlowErased`
    in the stream erases here too: its user's key is shredded (`shred`) once all their erasures
    are in, or before their next run (which gets a new key).
    """
    pending: list[DomainEvent] = []
    appended = 0
    erased: set[str] = set()  # users erased in the stream whose keys are still to be shredded

    def flush() -> None:
        nonlocal appended
        if not pending:
            return
        try:
            commands.save(pending, react=False)  # a restore replays the past: no reactions
        except IntegrityError:
            first = pending[0]
            raise ConcurrencyConflictError(
                str(getattr(first, "user_id", "*")), str(getattr(first, "flow_id", "*")), 1
            ) from None
        appended += len(pending)
        pending.clear()

    for event in events:
        if isinstance(event, FlowErased):
            # Erased in the source: erase here too. Its user is whoever the instance's events
            # named (the event itself may carry a stand-in id, if published after the erasure).
            flush()
            instance = commands.log.get(event.originator_id, FlowInstance)
            if instance is not None:
                event = event.model_copy(update={"user_id": instance.user_id})
            erased.add(event.user_id)
        elif (user := getattr(event, "user_id", None)) in erased:
            flush()
            shred(user)
            erased.discard(user)
        pending.append(event)
        if len(pending) >= batch:
            flush()
    flush()
    for user in erased:
        shred(user)
    return appended
