"""Operations the console runs in the background: rebuild, verify, purge; one at a time.

Each runs in a thread of its own, so the request that starts it answers at once; the page follows
its progress by polling the job (rebuild reports events replayed out of the log's length; verify and
purge report only when they finish).
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from flowstore import FlowStore
from flowstore.errors import OperationRunningError

__all__ = ["ACTIONS", "Job", "OperationRunningError", "Operations"]

log = logging.getLogger(__name__)

ACTIONS: dict[str, str] = {
    "rebuild": "Rebuild projections",
    "verify": "Verify projections",
    "purge": "Purge expired flows",
}
"""The operations, by the name in their URL, with their button label."""

_SHOWN_DIFFERENCES = 20


@dataclass
class Job:
    """One run of an operation, as the page shows it."""

    id: str
    action: str
    started_by: str
    started_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    state: Literal["running", "succeeded", "failed"] = "running"
    done: int | None = None
    total: int | None = None
    summary: str | None = None
    lines: list[str] = field(default_factory=list)
    finished_at: datetime | None = None

    @property
    def label(self) -> str:
        """The operation's name."""
        return ACTIONS[self.action]

    def to_dict(self) -> dict[str, Any]:
        """The job as JSON-ready data (what the page's script polls)."""
        return {
            "id": self.id,
            "action": self.action,
            "label": self.label,
            "state": self.state,
            "done": self.done,
            "total": self.total,
            "summary": self.summary,
            "lines": list(self.lines),
            "startedBy": self.started_by,
            "startedAt": self.started_at.isoformat(),
            "finishedAt": self.finished_at.isoformat() if self.finished_at else None,
        }


class Operations:
    """Starts operations on a store and keeps the most recent jobs."""

    def __init__(self, store: FlowStore, *, keep: int = 20) -> None:
        self._store = store
        self._keep = keep
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._lock = threading.Lock()
        self._ids = itertools.count(1)

    def start(self, action: str, started_by: str) -> Job:
        """Start `action` in the background; `OperationRunningError` while another one runs."""
        work = self._work(action)
        with self._lock:
            for job in self._jobs.values():
                if job.state == "running":
                    raise OperationRunningError(ACTIONS[job.action], job=job.id, action=job.action)
            job = Job(id=str(next(self._ids)), action=action, started_by=started_by)
            self._jobs[job.id] = job
            while len(self._jobs) > self._keep:
                self._jobs.popitem(last=False)
        thread = threading.Thread(
            target=self._run, args=(job, work), name=f"console-{action}-{job.id}", daemon=True
        )
        thread.start()
        return job

    def get(self, job_id: str) -> Job | None:
        """A job by id (None once it is forgotten)."""
        with self._lock:
            return self._jobs.get(job_id)

    def recent(self) -> list[Job]:
        """The jobs kept, newest first."""
        with self._lock:
            return list(reversed(self._jobs.values()))

    def _work(self, action: str) -> Callable[[Job], None]:
        if action == "rebuild":
            return self._rebuild
        if action == "verify":
            return self._verify
        if action == "purge":
            return self._purge
        raise KeyError(action)

    def _run(self, job: Job, work: Callable[[Job], None]) -> None:
        try:
            work(job)
        except Exception as exc:
            log.exception("console operation %s failed", job.action)
            job.summary = f"Failed: {type(exc).__name__}: {exc}"
            job.state = "failed"
        else:
            job.state = "succeeded"
        finally:
            job.finished_at = datetime.now(UTC)

    def _rebuild(self, job: Job) -> None:
        # Progress is the log position reached, out of the log's head when the rebuild began.
        job.done, job.total = 0, self._store.log_position()

        def progress(replayed: int, position: int) -> None:
            job.done, job.total = position, max(job.total or 0, position)

        replayed = self._store.rebuild_projections(progress=progress)
        job.done = job.total
        job.summary = f"Rebuilt the projections from {replayed} events."

    def _verify(self, job: Job) -> None:
        differences = self._store.verify_projections()
        job.lines = [d.describe() for d in differences[:_SHOWN_DIFFERENCES]]
        if not differences:
            job.summary = "The projections agree with the log."
        else:
            more = len(differences) - len(job.lines)
            job.summary = f"{len(differences)} differences between the projections and the log."
            if more:
                job.lines.append(f"… and {more} more")

    def _purge(self, job: Job) -> None:
        purged = self._store.purge_expired_flows()
        job.summary = f"Expired {purged} idle {'flow' if purged == 1 else 'flows'}."
