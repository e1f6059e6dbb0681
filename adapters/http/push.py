"""Pushing state changes to WebSocket sessions, driven by the event log.

One `LogPusher` per app follows `store.read_events` from the log position it started at, so a change
is pushed whoever made it: this server, another process on the same database, or library code. SQLite
cannot notify, so the pusher polls; on PostgreSQL it wakes on the log's notifications
(`FlowStore.log_notifier`) and polls only as a fallback.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import anyio
from anyio.abc import TaskStatus

from flowstore import FlowStore
from flowstore.domain import InstanceEvent
from flowstore.notify import LogNotifier

__all__ = ["LogPusher", "Subscriber"]

log = logging.getLogger(__name__)

_MAX_BACKOFF = 5.0


class Subscriber:
    """The outbox of one authenticated WebSocket session.

    Pushes are offered without waiting: a session whose outbox is full is too slow to keep up, and is
    told to close (`on_overflow`) rather than holding up every other session.
    """

    def __init__(self, user_id: str, *, capacity: int, on_overflow: Callable[[], None]) -> None:
        self.user_id = user_id
        self._send, self.messages = anyio.create_memory_object_stream[dict[str, Any]](capacity)
        """The messages to write to the socket, in order."""
        self._on_overflow = on_overflow

    def offer(self, message: dict[str, Any]) -> None:
        """Queue a push; overflow closes the session."""
        try:
            self._send.send_nowait(message)
        except anyio.WouldBlock:
            self._on_overflow()
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            pass  # the session has ended; the pusher will forget it on unsubscribe

    async def put(self, message: dict[str, Any]) -> None:
        """Queue an answer to the session's own request, waiting for room."""
        await self._send.send(message)

    def close(self) -> None:
        """No more messages will be queued."""
        self._send.close()


class LogPusher:
    """Follows the event log and pushes `flow-state-updated` to the sessions of the user concerned."""

    def __init__(self, store: FlowStore, *, interval: float = 0.15, page: int = 500) -> None:
        self._store = store
        self._interval = interval
        self._page = page
        self._subscribers: defaultdict[str, set[Subscriber]] = defaultdict(set)
        self._subscriptions = 0  # how many sessions ever subscribed
        # A stand-in store (tests) may have none: then the pusher polls.
        self._notifier: LogNotifier | None = getattr(store, "log_notifier", None)
        self.position: int | None = None
        """The notification id of the last event looked at (None until the log was reached)."""

    def subscribe(self, user_id: str, *, on_overflow: Callable[[], None]) -> Subscriber:
        """Start receiving pushes for `user_id`."""
        subscriber = Subscriber(user_id, capacity=256, on_overflow=on_overflow)
        self._subscribers[user_id].add(subscriber)
        self._subscriptions += 1
        return subscriber

    def unsubscribe(self, subscriber: Subscriber) -> None:
        """Stop pushing to `subscriber`."""
        sessions = self._subscribers.get(subscriber.user_id)
        if sessions is not None:
            sessions.discard(subscriber)
            if not sessions:
                del self._subscribers[subscriber.user_id]
        subscriber.close()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Follow the log until cancelled; reports started once the start position is known."""
        try:
            self.position = await anyio.to_thread.run_sync(self._store.log_position)
        except Exception:
            log.warning("event log unreachable at start; will retry", exc_info=True)
        task_status.started()
        failures = 0
        while True:
            # Noted before reading: no append goes unnoticed.
            generation = self._notifier.generation if self._notifier is not None else 0
            try:
                full = await self._step()
            except Exception:
                failures += 1
                if failures == 1:  # one report per outage, not one per poll
                    log.warning("cannot follow the event log; retrying", exc_info=True)
                await anyio.sleep(min(self._interval * 2**failures, _MAX_BACKOFF))
                continue
            if failures:
                log.info("following the event log again at position %s", self.position)
                failures = 0
            if not full:
                await self._pause(generation)

    async def _pause(self, generation: int) -> None:
        """Until the next append (PostgreSQL notifies) or, polling, `interval` seconds."""
        if self._notifier is None or not self._notifier.pushes:
            await anyio.sleep(self._interval)
            return
        # While listening, the poll is only a fallback; waiting takes one worker thread.
        timeout = 1.0 if self._notifier.listening else self._interval
        await anyio.to_thread.run_sync(
            self._notifier.wait, generation, timeout, abandon_on_cancel=True
        )

    async def _step(self) -> bool:
        """Read and push one page of events; True when the page was full (more may be waiting)."""
        if self.position is None or not self._subscribers:
            # Unreachable at start, or nobody to push to: skip ahead rather than decode events
            # no one will see. A session that subscribed meanwhile may have caused some of them,
            # so then the position stays and the next round reads them.
            subscribed = self._subscriptions
            head = await anyio.to_thread.run_sync(self._store.log_position)
            if self.position is None or self._subscriptions == subscribed:
                self.position = head
            return False
        page = await anyio.to_thread.run_sync(
            self._store.read_events, self.position + 1, self._page
        )
        changed: dict[tuple[str, str], int] = {}
        for position, event in page:
            if isinstance(event, InstanceEvent) and event.user_id in self._subscribers:
                changed[(event.user_id, event.flow_id)] = position
        for (user_id, flow_id), position in changed.items():
            await self._push(user_id, flow_id, position)
        if page:
            self.position = page[-1][0]
        return len(page) == self._page

    async def _push(self, user_id: str, flow_id: str, position: int) -> None:
        # The state now, not as of the event: a client wants where the user stands.
        state = await anyio.to_thread.run_sync(self._store.get_flow_state, user_id, flow_id)
        message = {
            "type": "flow-state-updated",
            "flowId": flow_id,
            "position": position,
            "state": state.to_dict() if state is not None else None,
        }
        for subscriber in list(self._subscribers.get(user_id, ())):
            subscriber.offer(message)
