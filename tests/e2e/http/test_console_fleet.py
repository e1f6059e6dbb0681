"""The console across servers: one CSRF key for the fleet, jobs recorded in the database."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import update
from starlette.requests import Request

from flowstore import FlowStore
from flowstore.adapters.http.auth import JwtVerifier
from flowstore.adapters.http.console.jobs import (
    JOBS_TABLE,
    STALE_SECONDS,
    Job,
    OperationRunningError,
    Operations,
)
from flowstore.adapters.http.console.session import (
    CONSOLE_KEY_ENV,
    SESSION_COOKIE,
    ConsoleSessions,
)
from flowstore.errors import AuthConfigError, CsrfError
from tests.e2e.http.conftest import SECRET
from tests.flows import linear


def request_with_session(token: str) -> Request:
    cookie = f"{SESSION_COOKIE}={token}".encode()
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/ui/operations/verify",
        "headers": [(b"cookie", cookie), (b"host", b"testserver")],
        "scheme": "http",
        "server": ("testserver", 80),
        "query_string": b"",
    }
    return Request(scope)


def test_a_csrf_token_of_one_server_is_valid_on_another_with_the_fleet_key(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    request = request_with_session("a-bearer-token")
    verifier = JwtVerifier(SECRET)
    lone_a, lone_b = ConsoleSessions(verifier), ConsoleSessions(verifier)
    with pytest.raises(CsrfError):  # random keys: each server refuses the other's tokens
        lone_b.check_csrf(request, lone_a.csrf_token(request))
    monkeypatch.setenv(CONSOLE_KEY_ENV, "k" * 32)
    a, b = ConsoleSessions(verifier), ConsoleSessions(verifier)
    b.check_csrf(request, a.csrf_token(request))
    monkeypatch.setenv(CONSOLE_KEY_ENV, "short")
    with pytest.raises(AuthConfigError):
        ConsoleSessions(verifier)


def ended(operations: Operations, job_id: str) -> Job:
    """Poll the job through `operations` until it is no longer running (pytest-timeout bounds it)."""
    while (job := operations.get(job_id)) is not None and job.state == "running":
        time.sleep(0.01)  # the pace of the polling loop; the loop checks the condition
    assert job is not None
    return job


@pytest.mark.timeout(120)
def test_jobs_are_shared_by_every_server_and_survive_a_restart(
    store_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with FlowStore(store_url) as server_a, FlowStore(store_url) as server_b:
        flow = server_a.create_flow(linear("ops", 3))
        for i in range(5):
            server_a.execute_transition(f"u{i}", flow, "next")
        a, b = Operations(server_a), Operations(server_b)
        release = threading.Event()
        verify = server_a.verify_projections

        def held() -> Any:
            assert release.wait(60)
            return verify()

        monkeypatch.setattr(server_a, "verify_projections", held)
        job = a.start("verify", "root")
        seen = b.get(job.id)  # server B shows the job A runs
        assert seen is not None
        assert seen.state == "running"
        assert seen.action == "verify"
        with pytest.raises(OperationRunningError):
            b.start("purge", "root")  # one at a time across servers
        release.set()
        assert ended(b, job.id).summary == "The projections agree with the log."
        rebuilt = ended(b, b.start("rebuild", "root").id)
        assert rebuilt.done == rebuilt.total == server_b.log_position()
        assert [j.action for j in a.recent()] == ["rebuild", "verify"]
    with FlowStore(store_url) as restarted:  # a new process: the jobs are still there
        assert [j.id for j in Operations(restarted).recent()] == [rebuilt.id, job.id]


def test_a_job_left_running_by_a_dead_server_counts_as_failed(store_url: str) -> None:
    with FlowStore(store_url) as store:
        operations = Operations(store)
        job = ended(operations, operations.start("purge", "root").id)
        long_ago = datetime.now(UTC) - timedelta(seconds=STALE_SECONDS * 2)
        with store.engine.begin() as conn:  # as if its server died mid-run
            conn.execute(
                update(JOBS_TABLE)
                .where(JOBS_TABLE.c.id == job.id)
                .values(state="running", heartbeat_at=long_ago, finished_at=None)
            )
        stale = operations.get(job.id)
        assert stale is not None
        assert stale.state == "failed"
        assert ended(operations, operations.start("purge", "root").id).state == "succeeded"
