"""Waking the followers of the log when any process appends to it (PostgreSQL LISTEN/NOTIFY).

eventsourcing's PostgreSQL recorder sends `NOTIFY <channel>` in every transaction that appends
events (the channel is the events table's name). A `LogNotifier` listens on a dedicated
connection (TCP keepalives, like a leader's lock) and counts the notifications; a follower notes
`generation` before reading the log and then `wait(generation, timeout)`s, which returns at once
if anything was appended meanwhile, so no notification is lost between a read and a wait.

SQLite cannot notify: there `wait` just sleeps out its timeout (the followers poll), as it does
on PostgreSQL while the listening connection is down (then the notifier reconnects).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable
from typing import Any

from flowstore.storage import StorageConfig, connect_dedicated

__all__ = ["LogNotifier"]

log = logging.getLogger(__name__)


class LogNotifier:
    """Counts appends to the log by any process (PostgreSQL) and wakes whoever waits for one."""

    def __init__(self, config: StorageConfig, channel: str | None) -> None:
        self._config = config
        self._channel = channel if config.backend == "postgres" else None
        self._changed = threading.Condition()
        self._generation = 0
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._callbacks: list[Callable[[], None]] = []
        self.listening = False
        """Whether notifications arrive now (False: followers are polling)."""

    @property
    def pushes(self) -> bool:
        """Whether this backend notifies at all (PostgreSQL)."""
        return self._channel is not None

    @property
    def generation(self) -> int:
        """How many notifications arrived so far (note it before reading the log)."""
        self._start()
        return self._generation

    def wait(self, generation: int, timeout: float, *, stop: threading.Event | None = None) -> bool:
        """Wait until a notification newer than `generation` arrives (True) or `timeout` passes;
        `stop` set (and `wake()` called after setting it) ends the wait too (True)."""
        self._start()
        with self._changed:
            return self._changed.wait_for(
                lambda: (
                    self._generation > generation
                    or self._stopping
                    or (stop is not None and stop.is_set())
                ),
                timeout,
            )

    def wake(self) -> None:
        """Make every waiter look at its `stop` again (call it after setting that event)."""
        # The waiters test `stop` under this condition's lock: set before this notify, it is
        # seen either before a waiter sleeps or when this wakes it; none can miss it.
        with self._changed:
            self._changed.notify_all()

    def subscribe(self, callback: Callable[[], None]) -> None:
        """Call `callback` (in the listener's thread; it must not block) on every notification."""
        self._callbacks.append(callback)
        self._start()

    def close(self) -> None:
        """Stop listening."""
        with self._changed:
            self._stopping = True
            self._changed.notify_all()
        if self._thread is not None:
            # Bounded: the listener notices within its 0.2 s poll, unless stuck connecting (it is
            # a daemon thread: it must not keep a closing store, or its process, waiting).
            self._thread.join(timeout=5)

    def _start(self) -> None:
        # Lazily: a one-shot command that never follows the log opens no listening connection.
        if self._channel is None or self._thread is not None:
            return
        with self._changed:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._listen, name="flowstore-log-listener", daemon=True
                )
                self._thread.start()

    def _connect(self) -> Any:
        return connect_dedicated(self._config, "flowstore log listener")

    def _listen(self) -> None:
        from psycopg import sql

        assert self._channel is not None
        while not self._stopping:
            connection = None
            try:
                connection = self._connect()
                connection.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self._channel)))
                self.listening = True
                self._bump()  # anything appended while we were not listening: look once
                while not self._stopping:
                    # A short timeout so that close() is noticed; one wake per burst is enough.
                    for _ in connection.notifies(timeout=0.2, stop_after=1):
                        self._bump()
            except Exception as exc:
                log.warning("log listener disconnected (%s); followers poll meanwhile", exc)
                self.listening = False
                with self._changed:
                    self._changed.wait_for(lambda: self._stopping, 1.0)
            finally:
                self.listening = False
                if connection is not None:
                    with contextlib.suppress(Exception):
                        connection.close()

    def _bump(self) -> None:
        with self._changed:
            self._generation += 1
            self._changed.notify_all()
        for callback in list(self._callbacks):
            callback()
