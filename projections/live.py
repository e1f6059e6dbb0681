"""The live path: a background thread that keeps the tables up to date with this process's writes.

Commands append their events and tell the projector the notification id of the last one; they do not
wait for the tables. The thread lingers 20 ms after a write (unless a reader is waiting),
then catches up in one batch (many commands' events in one transaction, which is what makes it cheaper
than a catch-up per command); it also picks up other processes' events every `poll` seconds. A query that reads the tables first waits until they have reached everything this
process wrote, so every query in the process still reads its writes.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from flowstore.errors import ProjectionLagError, ProjectionLayoutError

__all__ = ["LiveProjector", "ProjectionLagError"]

log = logging.getLogger(__name__)


class LiveProjector:
    """Runs `catch_up()` in a thread whenever this process writes (and every `poll` seconds)."""

    FAILING = 3
    """Catch-ups failed in a row (about 0.35 s of backoff) after which readers stop waiting."""

    def __init__(
        self, catch_up: Callable[[], int], *, poll: float = 1.0, linger: float = 0.02
    ) -> None:
        self._catch_up = catch_up
        self._poll = poll
        self._linger = linger
        self._waiters = 0
        self._changed = threading.Condition()
        self._target = 0  # the newest notification id this process wrote
        self._nudged = False  # another process appended (PostgreSQL notified us)
        self._reached = 0  # the tables' position after the last catch-up
        self._error: BaseException | None = None
        self._failures = 0  # catch-ups failed in a row
        self._failed_total = 0  # catch-ups failed since the start
        self._stopping = False
        self._idle = False  # the thread waits for something to do (not lingering, not working)
        self._thread = threading.Thread(target=self._run, name="flowstore-projector", daemon=True)
        self._thread.start()

    def written(self, notification_id: int) -> None:
        """This process appended events up to `notification_id`: project them soon."""
        with self._changed:
            if notification_id > self._target:
                self._target = notification_id
                # Only an idle thread needs waking: one lingering or catching up sees the new
                # target when it looks next. Waking it on every command would hand it the GIL
                # (to find nothing to do) each time the command thread releases it.
                if self._idle:
                    self._idle = False
                    self._changed.notify_all()

    def nudge(self) -> None:
        """Another process appended to the log: catch up now rather than at the next poll."""
        with self._changed:
            self._nudged = True
            if self._idle:  # as in `written`: a busy or lingering thread sees it next time
                self._idle = False
                self._changed.notify_all()

    def wait(self, timeout: float = 60.0) -> None:
        """Return once the tables reflect every event this process wrote before the call.

        Writes made while waiting do not count: under a steady stream of writes the target would
        otherwise keep moving away. Raises `ProjectionLagError` (the projector's error chained)
        after `timeout`, or once `FAILING` catch-ups in a row have failed, the last of them after
        this call began (a waiting reader cuts the projector's backoff short): the database is
        unavailable, and a reader learns it in a second rather than a minute.
        """
        with self._changed:
            target, failed_before = self._target, self._failed_total
            self._waiters += 1  # a reader is waiting: the projector stops lingering
            self._changed.notify_all()
            try:
                self._changed.wait_for(
                    lambda: (
                        self._reached >= target
                        or self._stopping
                        or (self._failures >= self.FAILING and self._failed_total > failed_before)
                    ),
                    timeout,
                )
                if self._reached < target and isinstance(self._error, ProjectionLayoutError):
                    raise self._error  # not a lag: these tables will not catch up in this version
                if self._reached < target and not self._stopping:
                    raise ProjectionLagError(
                        f"projections at {self._reached}, this process wrote up to {target}"
                        + (
                            f"; catching up failed: {_first_line(self._error)}"
                            if self._error
                            else ""
                        )
                    ) from self._error
            finally:
                self._waiters -= 1

    def close(self) -> None:
        """Stop the thread after a last catch-up."""
        with self._changed:
            self._stopping = True
            self._changed.notify_all()
        self._thread.join()
        self._reached = max(self._reached, self._catch_up())

    def _run(self) -> None:
        while True:
            with self._changed:
                if (
                    self._failures
                ):  # back off while the database is unavailable, unless a reader waits
                    self._changed.wait_for(
                        lambda: self._stopping or self._waiters > 0,
                        min(0.05 * 2**self._failures, 5.0),
                    )
                else:
                    self._idle = True
                    self._changed.wait_for(
                        lambda: self._stopping or self._reached < self._target or self._nudged,
                        self._poll,
                    )
                    self._idle = False
                    self._nudged = False
                    # Linger a moment so that a burst of commands is projected in one batch
                    # (one transaction instead of one each), unless a reader is waiting.
                    self._changed.wait_for(
                        lambda: self._stopping or self._waiters > 0, self._linger
                    )
                if self._stopping:
                    return
            try:
                position = self._catch_up()
            except Exception as exc:  # keep following: the database may come back
                log.warning("projection catch-up failed (%s); retrying", _first_line(exc))
                with self._changed:
                    self._error = exc
                    self._failures += 1
                    self._failed_total += 1
                    self._changed.notify_all()
                continue
            with self._changed:
                self._reached = max(self._reached, position)
                self._error = None
                self._failures = 0
                self._changed.notify_all()


def _first_line(exc: BaseException) -> str:
    """An error without SQLAlchemy's statement and parameters (which can fill a screen)."""
    return str(getattr(exc, "orig", None) or exc).split("\n", 1)[0]
