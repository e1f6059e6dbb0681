"""Operations the console runs in the background: rebuild, verify, purge; one at a time.

Each runs in a thread of its own, so the request that starts it answers at once; the page follows
its progress by polling the job (rebuild reports events replayed out of the log's length; verify and
purge report only when they finish).

Jobs are recorded in the store's database (`console_jobs`, in the store's schema), so every
server of a fleet shows every job and its progress, one job runs at a time across them, and a
job survives a restart of the server that shows it. A job whose server died while running it
stops beating (`heartbeat_at`) and counts as failed after `STALE_SECONDS`. memory:// stores keep
their jobs in the process.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from sqlalchemy import (
    JSON,
    Column,
    DateTime,
    Engine,
    Integer,
    MetaData,
    String,
    Table,
    select,
    update,
)

from flowstore import FlowStore
from flowstore.errors import OperationRunningError
from flowstore.storage import serialize_ddl

__all__ = ["ACTIONS", "Job", "OperationRunningError", "Operations"]

log = logging.getLogger(__name__)

ACTIONS: dict[str, str] = {
    "rebuild": "Rebuild projections",
    "verify": "Verify projections",
    "purge": "Purge expired flows",
}
"""The operations, by the name in their URL, with their button label."""

_SHOWN_DIFFERENCES = 20

STALE_SECONDS = 30.0
"""A running job not heard of for this long was left by a server that died: it counts as failed."""
_BEAT_SECONDS = 0.5  # progress is written at most this often (and so a job beats)

_metadata = MetaData()
JOBS_TABLE = Table(
    "console_jobs",
    _metadata,
    Column("id", String(32), primary_key=True),
    Column("action", String(32), nullable=False),
    Column("started_by", String(256), nullable=False),
    Column("started_at", DateTime(timezone=True), nullable=False),
    Column("state", String(16), nullable=False),
    Column("done", Integer, nullable=True),
    Column("total", Integer, nullable=True),
    Column("summary", String, nullable=True),
    Column("lines", JSON, nullable=False),
    Column("finished_at", DateTime(timezone=True), nullable=True),
    Column("heartbeat_at", DateTime(timezone=True), nullable=False),
)
"""The console's jobs, newest by `started_at`, shared by every server of the store."""


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
    """Starts operations on a store and keeps the most recent jobs (in its database)."""

    def __init__(self, store: FlowStore, *, keep: int = 20) -> None:
        self._store = store
        self._keep = keep
        self._jobs: OrderedDict[str, Job] = OrderedDict()  # this process's, as they run
        self._lock = threading.Lock()
        self._beats: dict[str, float] = {}
        self._table_ready = False

    @property
    def _engine(self) -> Engine | None:
        """The store's engine, its table created on first use (None: jobs stay in this process).

        memory:// has no database to share (its engine's one connection is the tables').
        """
        if self._store.config.sqlalchemy_url is None:
            return None
        engine = self._store.engine
        if not self._table_ready:
            with engine.begin() as conn:
                serialize_ddl(conn)  # servers of a fleet start together
                _metadata.create_all(conn)
            self._table_ready = True
        return engine

    def start(self, action: str, started_by: str) -> Job:
        """Start `action` in the background; `OperationRunningError` while another one runs."""
        work = self._work(action)
        with self._lock:
            for running in self._running():
                raise OperationRunningError(
                    ACTIONS[running.action], job=running.id, action=running.action
                )
            job = Job(id=uuid.uuid4().hex[:16], action=action, started_by=started_by)
            self._jobs[job.id] = job
            while len(self._jobs) > self._keep:
                self._jobs.popitem(last=False)
            self._record(job, new=True)
        thread = threading.Thread(
            target=self._run, args=(job, work), name=f"console-{action}-{job.id}", daemon=True
        )
        thread.start()
        return job

    def get(self, job_id: str) -> Job | None:
        """A job by id, whichever server runs it (None once it is forgotten)."""
        if self._engine is None:
            with self._lock:
                return self._jobs.get(job_id)
        with self._engine.connect() as conn:
            row = conn.execute(select(JOBS_TABLE).where(JOBS_TABLE.c.id == job_id)).first()
        return _job(row._mapping) if row is not None else None

    def recent(self) -> list[Job]:
        """The most recent jobs of every server, newest first."""
        if self._engine is None:
            with self._lock:
                return list(reversed(self._jobs.values()))
        query = select(JOBS_TABLE).order_by(JOBS_TABLE.c.started_at.desc()).limit(self._keep)
        with self._engine.connect() as conn:
            return [_job(row._mapping) for row in conn.execute(query)]

    def _running(self) -> list[Job]:
        if self._engine is None:
            return [job for job in self._jobs.values() if job.state == "running"]
        query = select(JOBS_TABLE).where(JOBS_TABLE.c.state == "running")
        with self._engine.connect() as conn:
            return [
                job for row in conn.execute(query) if (job := _job(row._mapping)).state == "running"
            ]

    def _record(self, job: Job, *, new: bool = False) -> None:
        """Write the job's row (its progress at most every _BEAT_SECONDS, unless it ended)."""
        if self._engine is None:
            return
        now = time.monotonic()
        if not new and job.state == "running" and now - self._beats.get(job.id, 0) < _BEAT_SECONDS:
            return
        self._beats[job.id] = now
        values = {f.name: getattr(job, f.name) for f in fields(Job)}
        values["heartbeat_at"] = datetime.now(UTC)
        with self._engine.begin() as conn:
            if new:
                conn.execute(JOBS_TABLE.insert().values(values))
            else:
                conn.execute(update(JOBS_TABLE).where(JOBS_TABLE.c.id == job.id).values(values))

    def _work(self, action: str) -> Callable[[Job], None]:
        if action == "rebuild":
            return self._rebuild
        if action == "verify":
            return self._verify
        if action == "purge":
            return self._purge
        raise KeyError(action)

    def _run(self, job: Job, work: Callable[[Job], None]) -> None:
        beating = threading.Event()

        def beat() -> None:  # a long step without progress (verify) must not look abandoned
            while not beating.wait(STALE_SECONDS / 3):
                self._record(job)

        threading.Thread(target=beat, name=f"console-beat-{job.id}", daemon=True).start()
        try:
            work(job)
        except Exception as exc:
            log.exception("console operation %s failed", job.action)
            job.summary = f"Failed: {type(exc).__name__}: {exc}"
            job.state = "failed"
        else:
            job.state = "succeeded"
        finally:
            beating.set()
            job.finished_at = datetime.now(UTC)
            try:
                self._record(job)
            except Exception:
                log.exception("could not record the end of console job %s", job.id)
            self._beats.pop(job.id, None)

    def _rebuild(self, job: Job) -> None:
        # Progress is the log position reached, out of the log's head when the rebuild began.
        job.done, job.total = 0, self._store.log_position()

        def progress(replayed: int, position: int) -> None:
            job.done, job.total = position, max(job.total or 0, position)
            self._record(job)

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


def _job(row: Any) -> Job:
    """A job from its row; a running one whose server stopped beating has failed."""
    job = Job(**{f.name: row[f.name] for f in fields(Job)})
    job.lines = list(job.lines or [])
    for name in ("started_at", "finished_at"):
        value = getattr(job, name)
        if value is not None and value.tzinfo is None:  # SQLite keeps no time zone
            setattr(job, name, value.replace(tzinfo=UTC))
    beat = row["heartbeat_at"]
    if beat is not None and beat.tzinfo is None:
        beat = beat.replace(tzinfo=UTC)
    if job.state == "running" and datetime.now(UTC) - beat > timedelta(seconds=STALE_SECONDS):
        job.state = "failed"
        job.summary = "Failed: the server running it stopped"
    return job
