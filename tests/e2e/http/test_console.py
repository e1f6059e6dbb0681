"""The web console at /ui without a browser: sign-in, roles, CSRF, its socket, and its figures.

The browser tests (`test_console_browser.py`) drive the pages; these pin down the rules around them
against the session's server, and the windowed funnel against the store's own counters.
"""

from __future__ import annotations

import functools
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import httpx
import pytest
from websockets.sync.client import connect

from flowstore import FlowStore, InvalidTransitionError
from flowstore.adapters.http.console import CLOSE_FORBIDDEN
from flowstore.adapters.http.console.jobs import Job, OperationRunningError, Operations
from flowstore.adapters.http.console.windows import WINDOWS, LogWindows, flow_summary
from flowstore.adapters.http.websocket import CLOSE_UNAUTHENTICATED
from tests.e2e.http.conftest import ONBOARDING, LiveServer, User, mint
from tests.e2e.http.security import console_socket_refusal, csrf_forgeries
from tests.flows import Clock, linear, onboarding

SESSION = "flowstore_console"


@contextmanager
def signed_in(server: LiveServer, user: User) -> Iterator[httpx.Client]:
    """A client that signed in to the console with `/ui?token=` (it keeps the cookie)."""
    with httpx.Client(base_url=server.url, timeout=10.0) as client:
        client.get("/ui", params={"token": user.token})
        yield client


def csrf_of(page: httpx.Response) -> str:
    """The CSRF token a console page carries."""
    found = re.search(r'<meta name="csrf-token" content="([^"]+)">', page.text)
    assert found, "the page has no CSRF token"
    return found.group(1)


def finished(client: httpx.Client, job_id: str, timeout: float = 30.0) -> dict[str, Any]:
    """Poll a console job until it is no longer running."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job: dict[str, Any] = client.get(
            f"/ui/api/jobs/{job_id}", headers={"Accept": "application/json"}
        ).json()
        if job["state"] != "running":
            return job
        time.sleep(0.02)  # the pace of the polling loop; the loop checks the condition
    raise TimeoutError(f"job {job_id} still running after {timeout}s")


@pytest.fixture
def console(server: LiveServer, admin: User) -> Iterator[httpx.Client]:
    """A client signed in to the console as an admin."""
    with signed_in(server, admin) as client:
        yield client


# Signing in


def test_console_pages_without_a_session_redirect_to_the_sign_in_form(
    client: httpx.Client,
) -> None:
    assert client.get("/ui").headers["location"] == "/ui/flows"
    response = client.get("/ui/flows/user-onboarding/funnel", params={"window": "1h"})
    assert response.status_code == 303
    assert response.headers["location"] == (
        "/ui/login?next=%2Fui%2Fflows%2Fuser-onboarding%2Ffunnel%3Fwindow%3D1h"
    )
    form = client.get("/ui/login")
    assert form.status_code == 200
    assert '<label for="token">' in form.text
    # From another site's link, the browser withheld any Strict cookie: a page of ours goes on.
    linked = client.get("/ui/operations", headers={"Sec-Fetch-Site": "cross-site"})
    assert linked.status_code == 200
    assert '<meta http-equiv="refresh" content="0; url=/ui/operations">' in linked.text


def test_a_query_token_becomes_an_httponly_strict_cookie_for_the_console_only(
    server: LiveServer, admin: User
) -> None:
    with httpx.Client(base_url=server.url) as client:
        response = client.get("/ui", params={"token": admin.token})
        assert response.status_code == 200
        # The browser moves on (leaving the token out of the address bar) by a page of ours, not a
        # redirect: a Strict cookie would not be sent along a redirect another site started.
        assert '<meta http-equiv="refresh" content="0; url=/ui/flows">' in response.text
        cookie = next(c for c in response.headers.get_list("set-cookie") if c.startswith(SESSION))
        assert {"HttpOnly", "Path=/ui", "SameSite=strict"} <= {
            part.strip() for part in cookie.split(";")
        }
        page = client.get("/ui/flows")
        assert page.status_code == 200
        assert ONBOARDING in page.text
        assert page.headers["content-security-policy"].startswith("default-src 'self'")
        # The REST API stays bearer-only: the cookie (were it sent) authenticates nothing there.
        api = client.get("/api/flows", headers={"Cookie": f"{SESSION}={admin.token}"})
        assert api.status_code == 401


def test_the_sign_in_form_takes_the_token_and_returns_to_the_page_asked_for(
    client: httpx.Client, admin: User
) -> None:
    form = client.get("/ui/login", params={"next": "/ui/operations"})
    csrf = re.search(r'name="csrf" value="([^"]+)"', form.text)
    assert csrf
    posted = client.post(
        "/ui/login",
        data={"token": admin.token, "csrf": csrf.group(1), "next": "/ui/operations"},
    )
    assert posted.status_code == 303
    assert posted.headers["location"] == "/ui/operations"
    assert client.get("/ui/operations").status_code == 200


def test_the_sign_in_form_needs_its_csrf_token_and_goes_nowhere_else(
    client: httpx.Client, admin: User
) -> None:
    client.get("/ui/login")
    refused = client.post("/ui/login", data={"token": admin.token, "csrf": "forged"})
    assert refused.status_code == 403
    assert "CSRF_INVALID" in refused.text
    form = client.get("/ui/login")
    csrf = re.search(r'name="csrf" value="([^"]+)"', form.text)
    assert csrf
    posted = client.post(
        "/ui/login",
        data={"token": admin.token, "csrf": csrf.group(1), "next": "https://evil.example/"},
    )
    assert posted.headers["location"] == "/ui/flows"


def test_bad_and_expired_tokens_are_refused_at_sign_in(client: httpx.Client) -> None:
    bad = client.get("/ui", params={"token": "not-a-jwt"})
    assert bad.status_code == 401
    assert "not valid here" in bad.text
    expired = client.get("/ui", params={"token": mint("root", roles=["admin"], ttl=-120)})
    assert expired.status_code == 401
    assert "expired" in expired.text
    assert not any(c.startswith(f"{SESSION}=") for c in expired.headers.get_list("set-cookie"))


def test_an_expired_session_sends_the_browser_back_to_sign_in(client: httpx.Client) -> None:
    client.cookies.set(SESSION, mint("root", roles=["admin"], ttl=-120), path="/ui")
    response = client.get("/ui/flows")
    assert response.status_code == 303
    assert response.headers["location"] == "/ui/login?next=%2Fui%2Fflows&reason=expired"


def test_a_user_without_the_admin_role_gets_403(
    server: LiveServer, client: httpx.Client, alice: User
) -> None:
    response = client.get("/ui", params={"token": alice.token})
    assert response.status_code == 403
    assert "needs the <code>admin</code> role" in response.text
    assert not any(c.startswith(f"{SESSION}=ey") for c in response.headers.get_list("set-cookie"))
    client.cookies.set(SESSION, alice.token, path="/ui")
    assert client.get("/ui/flows").status_code == 403
    assert client.get("/ui/users", params={"user": alice.id}).status_code == 403
    api = client.get("/ui/api/positions", headers={"Accept": "application/json"})
    assert api.status_code == 403
    assert api.json()["code"] == "FORBIDDEN"


def test_signing_out_needs_the_csrf_token_and_ends_the_session(console: httpx.Client) -> None:
    assert console.post("/ui/logout", data={"csrf": "forged"}).status_code == 403
    csrf = csrf_of(console.get("/ui/flows"))
    out = console.post("/ui/logout", data={"csrf": csrf})
    assert out.headers["location"] == "/ui/login?reason=signed-out"
    assert console.get("/ui/flows").status_code == 303


def test_the_console_is_not_part_of_the_api_spec(client: httpx.Client) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    assert not [path for path in paths if path.startswith("/ui")]


# CSRF on operations


def test_operations_need_the_csrf_token_of_the_session(
    console: httpx.Client, server: LiveServer, admin: User
) -> None:
    csrf = csrf_of(console.get("/ui/operations"))
    json = {"Accept": "application/json"}
    for forgery in csrf_forgeries(csrf):
        (request,) = forgery.values
        refused = console.post("/ui/operations/verify", **request)
        assert refused.status_code == 403, forgery.id
        if "application/json" in request.get("headers", {}).values():
            assert refused.json()["code"] == "CSRF_INVALID"
    # Another admin's session has another token.
    with signed_in(server, User.new("root", roles=["admin"])) as other:
        assert other.post("/ui/operations/verify", data={"csrf": csrf}).status_code == 403

    started = console.post(
        "/ui/operations/verify",
        headers={**json, "X-CSRF-Token": csrf, "Origin": server.url},
    )
    assert started.status_code == 202
    job = finished(console, started.json()["id"])
    assert job["state"] == "succeeded"
    assert job["startedBy"] == admin.id
    assert job["summary"] == "The projections agree with the log."

    form = console.post("/ui/operations/verify", data={"csrf": csrf})  # no script: a plain form
    assert form.status_code == 303
    job_id = form.headers["location"].split("job=")[1].split("#")[0]
    assert finished(console, job_id)["state"] == "succeeded"
    assert console.post("/ui/operations/nonsense", data={"csrf": csrf}).status_code == 404


# The console's socket


def test_the_console_socket_needs_an_admin_session_from_the_console_itself(
    server: LiveServer, admin: User, alice: User
) -> None:
    refusal = functools.partial(console_socket_refusal, server.ws_url, alice.id)
    assert refusal() == f"close {CLOSE_UNAUTHENTICATED}"
    assert refusal(token=alice.token) == f"close {CLOSE_FORBIDDEN}"
    assert refusal(token=admin.token, origin="https://evil.example") == "handshake 403"
    url = f"{server.ws_url}/ui/ws?user={alice.id}"
    admin_cookie = {"Cookie": f"{SESSION}={admin.token}"}
    with connect(url, proxy=None, additional_headers=admin_cookie) as ws:
        assert '"type":"watching"' in str(ws.recv(timeout=10))


def test_the_console_socket_pushes_the_watched_users_changes(
    server: LiveServer, store: FlowStore, admin: User, alice: User, line: str
) -> None:
    url = f"{server.ws_url}/ui/ws?user={alice.id}"
    with connect(url, proxy=None, additional_headers={"Cookie": f"{SESSION}={admin.token}"}) as ws:
        assert '"type":"watching"' in str(ws.recv(timeout=10))
        store.execute_transition(alice.id, line, "next")
        pushed = str(ws.recv(timeout=10))
    assert '"type":"flow-state-updated"' in pushed
    assert f'"flowId":"{line}"' in pushed


# Pages


def test_a_users_page_shows_each_flows_history_newest_first(
    console: httpx.Client, store: FlowStore, alice: User, line: str
) -> None:
    store.execute_transition(alice.id, line, "next")
    with pytest.raises(InvalidTransitionError):
        store.execute_transition(alice.id, line, "back")
    store.clear_flow_state(alice.id, line)
    page = console.get("/ui/users", params={"user": alice.id})
    assert page.status_code == 200
    kinds = re.findall(r'data-kind="(\w+)" data-success="(\w+)"', page.text)
    assert kinds == [
        ("clear", "true"),
        ("transition", "false"),
        ("transition", "true"),
        ("start", "true"),
    ]
    assert "No state now" in page.text
    card = console.get(f"/ui/users/{alice.id}/flows/{line}")
    assert card.status_code == 200
    assert int(card.headers["x-projection-position"]) >= 1
    assert card.text.lstrip().startswith('<section class="card"')


def test_unknown_flows_get_an_error_page_not_a_problem_document(console: httpx.Client) -> None:
    page = console.get("/ui/flows/no-such-flow")
    assert page.status_code == 404
    assert page.headers["content-type"].startswith("text/html")
    assert "FLOW_NOT_FOUND" in page.text
    assert (
        console.get("/ui/flows/user-onboarding/funnel", params={"window": "1y"}).status_code == 422
    )


def test_the_diagram_is_drawn_by_the_server_even_without_graphviz(
    console: httpx.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No `dot` anywhere: the console draws the same SVG itself and keeps the Mermaid text.
    monkeypatch.setenv("PATH", "")
    page = console.get(f"/ui/flows/{ONBOARDING}")
    assert page.status_code == 200
    assert re.search(r'<svg xmlns="http://www.w3.org/2000/svg" class="flow-diagram"', page.text)
    assert re.search(
        r'<pre class="diagram-text" id="diagram-mermaid"[^>]*>stateDiagram-v2', page.text
    )


def test_the_operations_page_shows_a_running_publishers_lag(
    console: httpx.Client, store: FlowStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    class Status:
        topic, state, position, lag, last_error = "flow-events", "publishing", 7, 3, None

    class Publisher:
        def status(self) -> Status:
            return Status()

        def stop(self) -> None:
            pass

    monkeypatch.setattr(store, "_publisher", Publisher())
    page = console.get("/ui/operations")
    assert "Kafka publisher (flow-events)" in page.text
    assert "3 behind · publishing" in page.text


# Funnels over a time window


def test_a_window_counts_only_what_happened_in_it() -> None:
    clock = Clock()
    with FlowStore("memory://", clock=clock) as store:
        store.create_flow(onboarding())
        windows = LogWindows(store, clock=clock)
        store.execute_transition("early", ONBOARDING, "start")  # a run started two hours ago
        clock.advance(2 * 3600)
        store.execute_transition("early", ONBOARDING, "skip")
        store.execute_transition("late", ONBOARDING, "start")
        with pytest.raises(InvalidTransitionError):
            store.execute_transition("late", ONBOARDING, "save")
        clock.advance(60)

        hour = windows.summary(ONBOARDING, WINDOWS[1])
        steps = {s.step: (s.entered, s.moved_on, s.dropped, s.current) for s in hour.steps}
        assert steps["welcome"] == (1, 1, 0, 0)  # late's start; early's was two hours ago
        assert steps["profile-setup"] == (1, 1, 0, 1)  # late entered; early moved on
        assert steps["verification"] == (1, 0, 0, 1)
        assert hour.runs_started == 1
        assert hour.error_rate == pytest.approx(1 / 3)
        assert hour.throughput_per_second == pytest.approx(3 / 3600)

        day = windows.summary(ONBOARDING, WINDOWS[2])
        assert day.runs_started == 2
        assert {s.step: s.entered for s in day.steps}["welcome"] == 2

        # Completion counts against the runs started in the window.
        store.execute_transition("early", ONBOARDING, "complete")
        assert windows.summary(ONBOARDING, WINDOWS[1]).completion_rate == 0.0
        completed = windows.summary(ONBOARDING, WINDOWS[2])
        assert completed.completion_rate == 0.5
        assert completed.average_duration_ms == pytest.approx(
            timedelta(hours=2, minutes=1).total_seconds() * 1000
        )


def test_a_window_is_read_from_the_activity_table_not_folded_from_the_log(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = Clock()
    with FlowStore("memory://", clock=clock) as store:
        store.create_flow(onboarding())
        store.execute_transition("ann", ONBOARDING, "start")
        clock.advance(60)
        store.sync_projections()  # the projector reads the log; the console must not

        def no_log_reads(*args: object) -> None:
            raise AssertionError("the console folded the event log")

        with monkeypatch.context() as patched:
            patched.setattr(store, "read_events", no_log_reads)
            hour = LogWindows(store, clock=clock).summary(ONBOARDING, WINDOWS[1])
        assert hour.runs_started == 1
        assert {s.step: s.entered for s in hour.steps}["profile-setup"] == 1


def test_a_window_holding_the_whole_log_agrees_with_the_stores_counters() -> None:
    clock = Clock()
    with FlowStore("memory://", clock=clock) as store:
        flow = store.create_flow(linear("windowed", 4, ttl=600))
        for i in range(30):
            user = f"u{i}"
            store.execute_transition(user, flow, "next")
            for _ in range(i % 3):
                store.execute_transition(user, flow, "next")
            if i % 4 == 0:
                with pytest.raises(InvalidTransitionError):
                    store.execute_transition(user, flow, "jump")
            if i % 5 == 0:
                store.reset_flow(user, flow)
            if i % 7 == 0:
                store.clear_flow_state(user, flow)
            if i % 6 == 1:
                store.set_flow_state(user, {"flow": flow, "step": "s2", "service": "svc"})
            clock.advance(17)
        clock.advance(3600)
        assert store.purge_expired_flows() > 0

        windows = LogWindows(store, clock=clock)
        everything = flow_summary(store, windows, flow, WINDOWS[0])
        week = flow_summary(store, windows, flow, WINDOWS[3])
        assert week.steps == everything.steps
        assert week.runs_started == everything.runs_started
        assert week.completion_rate == pytest.approx(everything.completion_rate)
        assert week.average_duration_ms == pytest.approx(everything.average_duration_ms)
        assert week.error_rate == pytest.approx(everything.error_rate)
        assert week.average_response_ms == pytest.approx(everything.average_response_ms)
        assert week.p95_response_ms == pytest.approx(everything.p95_response_ms)


# Operations


def ended(job: Job, timeout: float = 30.0) -> Job:
    """Poll a job until it is no longer running."""
    deadline = time.monotonic() + timeout
    while job.state == "running":
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job.id} still running after {timeout}s")
        time.sleep(0.01)  # the pace of the polling loop; the loop checks the condition
    return job


def test_one_operation_runs_at_a_time_and_a_rebuild_reports_log_positions(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with FlowStore("memory://") as store:
        flow = store.create_flow(linear("ops", 3))
        for i in range(5):
            store.execute_transition(f"u{i}", flow, "next")
        operations = Operations(store)
        release = threading.Event()
        verify = store.verify_projections

        def held() -> Any:
            assert release.wait(30)
            return verify()

        monkeypatch.setattr(store, "verify_projections", held)
        first = operations.start("verify", "root")
        with pytest.raises(OperationRunningError) as busy:
            operations.start("purge", "root")
        assert busy.value.details == {"job": first.id, "action": "verify"}
        release.set()
        assert ended(first).summary == "The projections agree with the log."

        rebuild = ended(operations.start("rebuild", "root"))
        assert rebuild.state == "succeeded"
        assert rebuild.done == rebuild.total == store.log_position()
        assert [job.action for job in operations.recent()] == ["rebuild", "verify"]

        monkeypatch.setattr(store, "purge_expired_flows", lambda: 1 / 0)
        failed = ended(operations.start("purge", "root"))
        assert failed.state == "failed"
        assert failed.summary == "Failed: ZeroDivisionError: division by zero"


def test_a_window_forgets_an_erased_users_id() -> None:
    # Windows read the store's per-minute activity table (counts per flow and step, no user ids):
    # nothing in the console process keeps an erased user's id.
    clock = Clock()
    with FlowStore("memory://", clock=clock) as store:
        store.create_flow(onboarding())
        windows = LogWindows(store, clock=clock)
        store.execute_transition("erase-me-5d1", ONBOARDING, "start")
        store.execute_transition("keep-me", ONBOARDING, "start")
        windows.summary(ONBOARDING, WINDOWS[1])
        store.erase_user("erase-me-5d1")
        after = windows.summary(ONBOARDING, WINDOWS[1])
        assert {s.step: s.dropped for s in after.steps}["profile-setup"] == 1  # still counted
        held = repr(vars(windows))  # the windows come from the activity table: nothing is held
        assert "erase-me-5d1" not in held
        assert "keep-me" not in held


def test_the_timeline_shows_the_owlmeans_commands(
    console: httpx.Client, store: FlowStore, alice: User, bob: User
) -> None:
    from tests.owlmeans import owl_flow

    flow = store.create_flow({**owl_flow("_oa"), "flow": f"_oa-console-{alice.id}"})
    store.reset_flow(alice.id, flow, entity_id="org-<1>")
    store.execute_transition(alice.id, flow, "signup", ok=False, message="try <b>again</b>")
    store.go_back(alice.id, flow)
    store.execute_transition(alice.id, flow, "signup", message="second go")
    store.adopt_state_token(bob.id, store.state_token(alice.id, flow), sender="idp")
    page = console.get("/ui/users", params={"user": alice.id})
    kinds = re.findall(r'data-kind="(\w+)"', page.text)
    assert kinds == ["transition", "back", "transition", "reset"]
    assert "not ok" in page.text
    assert "try &lt;b&gt;again&lt;/b&gt;" in page.text  # escaped, like every value
    assert "entity org-&lt;1&gt;" in page.text
    handed = console.get("/ui/users", params={"user": bob.id})
    assert re.findall(r'data-kind="(\w+)"', handed.text) == ["handoff"]
    assert "handed over by idp" in handed.text
