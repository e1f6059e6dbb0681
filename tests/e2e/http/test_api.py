"""Every REST endpoint over a real server: answers in camelCase, errors as problem+json."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from flowstore import FlowStore, HistoryKind
from flowstore.adapters.http import JwtVerifier, create_app
from flowstore.adapters.http.instances import MAX_HISTORY_RESPONSE_BYTES
from flowstore.storage import parse_url
from tests.e2e.http.conftest import MAX_BODY_BYTES, ONBOARDING, SECRET, LiveServer, User, mint
from tests.flows import Clock, linear

PROBLEM = "application/problem+json"


def assert_problem(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    """The response is RFC 9457 problem details with this status and code; returns the body."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM
    body: dict[str, Any] = response.json()
    assert body["status"] == status
    assert body["code"] == code
    assert body["type"].startswith("urn:flowstore:problem:")
    assert body["title"]
    assert body["detail"]
    assert isinstance(body["details"], dict)
    return body


# The caller's own flows


def test_get_state_answers_the_callers_state_in_camel_case(
    store: FlowStore, client: httpx.Client, alice: User
) -> None:
    store.execute_transition(alice.id, ONBOARDING, "start")
    response = client.get(f"/api/flow/{ONBOARDING}/state", headers=alice.headers)
    assert response.status_code == 200
    state = response.json()
    assert state["step"] == "profile-setup"
    assert state["userId"] == alice.id
    assert state["definitionVersion"] == 1
    assert {"startedAt", "updatedAt", "completedAt", "expiresAt"} <= state.keys()


def test_get_state_without_state_is_200_null_as_in_the_seed(
    client: httpx.Client, alice: User
) -> None:
    response = client.get(f"/api/flow/{ONBOARDING}/state", headers=alice.headers)
    assert response.status_code == 200
    assert response.json() is None


def test_get_state_of_an_unknown_flow_is_404_flow_not_found(
    client: httpx.Client, alice: User
) -> None:
    body = assert_problem(
        client.get("/api/flow/nope/state", headers=alice.headers), 404, "FLOW_NOT_FOUND"
    )
    assert body["details"]["flow_id"] == "nope"


def test_transition_with_a_payload_returns_the_new_state_and_records_it(
    client: httpx.Client, alice: User
) -> None:
    response = client.post(
        f"/api/flow/{ONBOARDING}/transition/start",
        json={"payload": {"a": 1}},
        headers=alice.headers,
    )
    assert response.status_code == 200, response.text
    assert response.json()["step"] == "profile-setup"
    assert response.json()["payload"] == {"a": 1}
    history = client.get(f"/api/flow/{ONBOARDING}/history", headers=alice.headers).json()
    assert [h["kind"] for h in history] == [HistoryKind.START, HistoryKind.TRANSITION]
    assert history[-1]["payload"] == {"a": 1}
    assert history[-1]["toStep"] == "profile-setup"


def test_transition_without_a_body_starts_the_flow(
    line: str, client: httpx.Client, alice: User
) -> None:
    response = client.post(f"/api/flow/{line}/transition/next", headers=alice.headers)
    assert response.status_code == 200
    assert response.json()["step"] == "s1"


def test_transition_the_step_does_not_offer_is_422_and_recorded(
    store: FlowStore, client: httpx.Client, alice: User
) -> None:
    response = client.post(f"/api/flow/{ONBOARDING}/transition/complete", headers=alice.headers)
    body = assert_problem(response, 422, "INVALID_TRANSITION")
    assert body["details"]["transition"] == "complete"
    assert body["details"]["from_step"] == "welcome"
    assert store.get_flow_history(alice.id, ONBOARDING)[-1].success is False


def test_payload_failing_the_transitions_schema_is_422_payload_invalid(
    store: FlowStore, client: httpx.Client, alice: User
) -> None:
    flow = linear(f"typed-{alice.id}", 2)
    flow["steps"]["s0"]["transitions"]["next"]["payloadSchema"] = {
        "type": "object",
        "required": ["age"],
        "properties": {"age": {"type": "integer"}},
    }
    path = f"/api/flow/{store.create_flow(flow)}/transition/next"
    bad = client.post(path, json={"payload": {}}, headers=alice.headers)
    assert_problem(bad, 422, "PAYLOAD_INVALID")
    good = client.post(path, json={"payload": {"age": 3}}, headers=alice.headers)
    assert good.json()["step"] == "s1"


def test_payload_over_the_stores_limit_is_413_payload_too_large(
    store: FlowStore, client: httpx.Client, alice: User
) -> None:
    payload = {"blob": "x" * (store.max_payload_bytes + 1)}  # the body itself is under the cap
    response = client.post(
        f"/api/flow/{ONBOARDING}/transition/start", json={"payload": payload}, headers=alice.headers
    )
    body = assert_problem(response, 413, "PAYLOAD_TOO_LARGE")
    assert body["details"]["limit"] == store.max_payload_bytes
    assert store.get_flow_state(alice.id, ONBOARDING) is None  # refused before anything was written


def test_body_over_the_servers_cap_is_413_even_without_content_length(
    client: httpx.Client, alice: User
) -> None:
    path = f"/api/flow/{ONBOARDING}/transition/start"
    declared = client.post(path, content=b" " * (MAX_BODY_BYTES + 1), headers=alice.headers)
    assert assert_problem(declared, 413, "PAYLOAD_TOO_LARGE")["details"]["limit"] == MAX_BODY_BYTES

    def chunked() -> Iterator[bytes]:
        for _ in range(MAX_BODY_BYTES // 10_000 + 1):
            yield b" " * 10_000

    streamed = client.post(path, content=chunked(), headers=alice.headers)
    assert "content-length" not in streamed.request.headers
    assert_problem(streamed, 413, "PAYLOAD_TOO_LARGE")


@pytest.mark.parametrize(
    ("content", "where"),
    [
        (b'{"payload": ', "body"),  # not JSON
        (b'{"payload": [1, 2]}', "payload"),  # not an object
        (b'{"paylod": {}}', "paylod"),  # misspelt key
        (b'"start"', "body"),  # not an object at all
    ],
)
def test_malformed_bodies_are_422_request_invalid(
    client: httpx.Client, alice: User, content: bytes, where: str
) -> None:
    response = client.post(
        f"/api/flow/{ONBOARDING}/transition/start",
        content=content,
        headers={**alice.headers, "Content-Type": "application/json"},
    )
    body = assert_problem(response, 422, "REQUEST_INVALID")
    assert any(where in map(str, e["loc"]) for e in body["details"]["errors"]), body


def test_payload_that_is_not_plain_json_is_422_payload_invalid(
    client: httpx.Client, alice: User
) -> None:
    response = client.post(
        f"/api/flow/{ONBOARDING}/transition/start",
        content=b'{"payload": {"x": NaN}}',
        headers={**alice.headers, "Content-Type": "application/json"},
    )
    assert_problem(response, 422, "PAYLOAD_INVALID")


@pytest.mark.parametrize(
    ("method", "path", "body", "where"),
    [
        ("POST", "/api/flow/{flow}/transition/next", {"payload": {"a": "x\x00"}}, "a"),
        ("POST", "/api/flow/{flow}/transition/next", {"payload": {"k\x00": [1]}}, "k\x00"),
        ("POST", "/api/flow/{flow}/reset", {"step": "s\x001"}, "step"),
        (
            "PUT",
            "/api/admin/users/u/flows/{flow}/state",
            {"step": "s1", "service": "\x00"},
            "service",
        ),
        ("PATCH", "/api/flows/{flow}", {"config": {"nested": ["\x00"]}}, "nested"),
    ],
    ids=["payload-value", "payload-key", "step", "service", "definition"],
)
def test_nul_characters_are_refused_before_they_reach_the_log(
    line: str,
    store: FlowStore,
    client: httpx.Client,
    admin: User,
    method: str,
    path: str,
    body: dict[str, Any],
    where: str,
) -> None:
    # PostgreSQL cannot hold NUL in text or JSON: an event carrying one could not be projected.
    before = store.log_position()
    response = client.request(method, path.format(flow=line), json=body, headers=admin.headers)
    problem = assert_problem(response, 422, "REQUEST_INVALID")
    assert where in problem["details"]["errors"][0]["loc"]
    assert store.log_position() == before


def test_ids_too_long_or_with_control_characters_are_422(client: httpx.Client, alice: User) -> None:
    assert_problem(
        client.get(f"/api/flow/{'f' * 257}/state", headers=alice.headers), 422, "REQUEST_INVALID"
    )
    response = client.get("/api/flow/a%00b/state", headers=alice.headers)
    assert_problem(response, 422, "REQUEST_INVALID")


def test_reset_restarts_at_the_initial_step_or_the_step_given(
    line: str, store: FlowStore, client: httpx.Client, alice: User
) -> None:
    store.execute_transition(alice.id, line, "next")
    restarted = client.post(f"/api/flow/{line}/reset", headers=alice.headers)
    assert restarted.status_code == 200
    assert restarted.json()["step"] == "s0"
    moved = client.post(f"/api/flow/{line}/reset", json={"step": "s1"}, headers=alice.headers)
    assert moved.json()["step"] == "s1"
    assert moved.json()["status"] == "active"


def test_reset_to_a_step_the_flow_lacks_is_422_invalid_step(
    line: str, client: httpx.Client, alice: User
) -> None:
    response = client.post(
        f"/api/flow/{line}/reset", json={"step": "nowhere"}, headers=alice.headers
    )
    assert_problem(response, 422, "INVALID_STEP")


def test_clear_state_is_204_then_the_state_is_gone_and_the_history_stays(
    line: str, store: FlowStore, client: httpx.Client, alice: User
) -> None:
    store.execute_transition(alice.id, line, "next")
    response = client.delete(f"/api/flow/{line}/state", headers=alice.headers)
    assert response.status_code == 204
    assert response.content == b""
    assert client.get(f"/api/flow/{line}/state", headers=alice.headers).json() is None
    kinds = [
        h["kind"] for h in client.get(f"/api/flow/{line}/history", headers=alice.headers).json()
    ]
    assert kinds[-1] == HistoryKind.CLEAR
    again = client.delete(f"/api/flow/{line}/state", headers=alice.headers)
    assert_problem(again, 404, "FLOW_STATE_NOT_FOUND")


def test_history_of_an_unknown_flow_is_404(client: httpx.Client, alice: User) -> None:
    assert_problem(
        client.get("/api/flow/nope/history", headers=alice.headers), 404, "FLOW_NOT_FOUND"
    )


def test_mine_lists_the_callers_flows(
    line: str, store: FlowStore, client: httpx.Client, alice: User
) -> None:
    assert client.get("/api/flows/mine", headers=alice.headers).json() == []
    store.execute_transition(alice.id, line, "next")
    store.execute_transition(alice.id, ONBOARDING, "start")
    mine = client.get("/api/flows/mine", headers=alice.headers).json()
    assert sorted(s["flow"] for s in mine) == sorted([line, ONBOARDING])
    assert {s["userId"] for s in mine} == {alice.id}


def test_concurrent_transitions_over_http_lose_no_update(
    store: FlowStore, client: httpx.Client, alice: User
) -> None:
    loop = linear(f"loop-{alice.id}", 2)
    loop["steps"]["s0"]["transitions"]["tick"] = {"transition": "tick", "step": "s0"}
    flow = store.create_flow(loop)
    threads, each = 6, 5
    statuses: list[int] = []

    def tick() -> None:
        with httpx.Client(base_url=str(client.base_url), timeout=30) as own:
            statuses.extend(
                own.post(f"/api/flow/{flow}/transition/tick", headers=alice.headers).status_code
                for _ in range(each)
            )

    workers = [threading.Thread(target=tick) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert statuses == [200] * threads * each
    state = client.get(f"/api/flow/{flow}/state", headers=alice.headers).json()
    assert state["version"] == 1 + threads * each  # the start, then every tick


# Administration


def test_admin_lists_creates_and_reads_flows(client: httpx.Client, admin: User) -> None:
    fresh = f"fresh-{admin.id}"
    created = client.post("/api/flows", json=linear(fresh, 2, ttl=30), headers=admin.headers)
    assert created.status_code == 201
    assert created.json()["version"] == 1
    assert created.json()["initialStep"] == "s0"
    assert created.json()["ttl"] == 30
    fetched = client.get(f"/api/flows/{fresh}", headers=admin.headers).json()
    assert fetched == created.json()
    flows = client.get("/api/flows", headers=admin.headers).json()
    assert {ONBOARDING, fresh} <= {f["flow"] for f in flows}
    assert created.json() in flows


def test_creating_an_existing_flow_is_409_flow_exists(
    line: str, client: httpx.Client, admin: User
) -> None:
    response = client.post("/api/flows", json=linear(line), headers=admin.headers)
    assert_problem(response, 409, "FLOW_EXISTS")


def test_an_invalid_definition_is_422_with_every_problem_listed(
    client: httpx.Client, admin: User
) -> None:
    broken = linear("broken", 2, initialStep="missing")
    broken["steps"]["s0"]["transitions"]["next"]["step"] = "nowhere"
    body = assert_problem(
        client.post("/api/flows", json=broken, headers=admin.headers), 422, "DEFINITION_INVALID"
    )
    assert len(body["details"]["problems"]) == 2


def test_update_makes_a_new_version_and_old_versions_stay_readable(
    line: str, client: httpx.Client, admin: User
) -> None:
    updated = client.patch(f"/api/flows/{line}", json={"ttl": 60}, headers=admin.headers)
    assert updated.status_code == 200
    assert updated.json()["version"] == 2
    assert (
        client.get(f"/api/flows/{line}?version=1", headers=admin.headers).json().get("ttl") is None
    )
    assert client.get(f"/api/flows/{line}", headers=admin.headers).json()["ttl"] == 60
    missing = client.get(f"/api/flows/{line}?version=9", headers=admin.headers)
    assert_problem(missing, 404, "FLOW_NOT_FOUND")
    assert_problem(
        client.get(f"/api/flows/{line}?version=0", headers=admin.headers), 422, "REQUEST_INVALID"
    )


def test_update_with_an_unknown_key_is_422(line: str, client: httpx.Client, admin: User) -> None:
    response = client.patch(f"/api/flows/{line}", json={"colour": "red"}, headers=admin.headers)
    assert_problem(response, 422, "DEFINITION_INVALID")
    assert_problem(
        client.patch("/api/flows/nope", json={"ttl": 5}, headers=admin.headers),
        404,
        "FLOW_NOT_FOUND",
    )


def test_delete_flow_is_204_then_the_flow_is_not_found(
    line: str, client: httpx.Client, admin: User, alice: User
) -> None:
    assert client.delete(f"/api/flows/{line}", headers=admin.headers).status_code == 204
    assert_problem(client.get(f"/api/flows/{line}", headers=admin.headers), 404, "FLOW_NOT_FOUND")
    moved = client.post(f"/api/flow/{line}/transition/next", headers=alice.headers)
    assert_problem(moved, 404, "FLOW_NOT_FOUND")
    assert_problem(
        client.delete(f"/api/flows/{line}", headers=admin.headers), 404, "FLOW_NOT_FOUND"
    )


def test_statistics_and_funnel(
    line: str, store: FlowStore, client: httpx.Client, admin: User
) -> None:
    store.execute_transition(f"{line}-u1", line, "next")
    store.execute_transition(f"{line}-u1", line, "next")  # completes
    store.execute_transition(f"{line}-u2", line, "next")
    one = client.get(f"/api/flows/{line}/statistics", headers=admin.headers).json()
    assert one["totalFlows"] == 2
    assert one["completionRate"] == 0.5
    assert {"averageResponseTime", "p95ResponseTime", "throughputPerSecond"} == set(
        one["performanceMetrics"]
    )
    every = client.get("/api/statistics", headers=admin.headers).json()
    assert every["totalFlows"] >= 2  # the session's other tests count too
    funnel = client.get(f"/api/flows/{line}/funnel", headers=admin.headers).json()
    assert [(s["step"], s["entered"], s["movedOn"]) for s in funnel] == [
        ("s0", 2, 2),
        ("s1", 2, 1),
        ("s2", 1, 0),
    ]
    assert_problem(
        client.get("/api/flows/nope/statistics", headers=admin.headers), 404, "FLOW_NOT_FOUND"
    )
    assert_problem(
        client.get("/api/flows/nope/funnel", headers=admin.headers), 404, "FLOW_NOT_FOUND"
    )


def test_admin_override_puts_a_user_at_a_step(
    client: httpx.Client, admin: User, alice: User
) -> None:
    path = f"/api/admin/users/{alice.id}/flows/{ONBOARDING}/state"
    response = client.put(
        path,
        json={"step": "verification", "ok": False, "payload": {"by": "root"}},
        headers=admin.headers,
    )
    assert response.status_code == 200, response.text
    assert response.json()["userId"] == alice.id
    state = client.get(f"/api/flow/{ONBOARDING}/state", headers=alice.headers).json()
    assert (state["step"], state["ok"], state["payload"]) == ("verification", False, {"by": "root"})
    assert_problem(
        client.put(path, json={"step": "nowhere"}, headers=admin.headers), 422, "INVALID_STEP"
    )
    assert_problem(
        client.put(
            f"/api/admin/users/{alice.id}/flows/nope/state",
            json={"step": "x"},
            headers=admin.headers,
        ),
        404,
        "FLOW_NOT_FOUND",
    )
    assert_problem(client.put(path, json={}, headers=admin.headers), 422, "REQUEST_INVALID")


def test_purge_expired_expires_idle_instances(sqlite_url: str, admin: User, alice: User) -> None:
    clock = Clock()
    with FlowStore(sqlite_url, clock=clock) as store:
        store.create_flow(linear("short", 3, ttl=60))
        store.execute_transition(alice.id, "short", "next")
        with (
            LiveServer(create_app(store, JwtVerifier(SECRET))) as live,
            httpx.Client(base_url=live.url) as client,
        ):
            assert client.post("/api/admin/purge-expired", headers=admin.headers).json() == {
                "purged": 0
            }
            clock.advance(61)
            assert client.post("/api/admin/purge-expired", headers=admin.headers).json() == {
                "purged": 1
            }
            state = client.get("/api/flow/short/state", headers=alice.headers)
            assert (state.status_code, state.json()) == (200, None)


def test_an_admin_erases_a_user_and_nobody_else_can(
    sqlite_url: str, admin: User, alice: User, bob: User
) -> None:
    with FlowStore(sqlite_url) as store:
        store.create_flow(linear("line"))
        for user in (alice, bob):
            store.execute_transition(user.id, "line", "next", {"secret": user.id})
        with (
            LiveServer(create_app(store, JwtVerifier(SECRET))) as live,
            httpx.Client(base_url=live.url) as client,
        ):
            path = f"/api/admin/users/{alice.id}"
            assert_problem(client.delete(path, headers=bob.headers), 403, "FORBIDDEN")
            assert_problem(client.delete(path), 401, "UNAUTHENTICATED")
            assert client.get("/api/flow/line/state", headers=alice.headers).status_code == 200
            erased = client.delete(path, headers=admin.headers)
            assert erased.json() == {"userId": alice.id, "erasedInstances": 1}
            state = client.get("/api/flow/line/state", headers=alice.headers)
            assert (state.status_code, state.json()) == (200, None)
            assert client.get("/api/flow/line/history", headers=alice.headers).json() == []
            assert client.get("/api/flow/line/state", headers=bob.headers).status_code == 200
            again = client.delete(path, headers=admin.headers)
            assert again.json() == {"userId": alice.id, "erasedInstances": 0}


def test_a_command_that_gives_up_on_conflicts_is_409(sqlite_url: str, alice: User) -> None:
    # A store allowed no retries gives up at once: the mapping of CONCURRENCY_CONFLICT is what is
    # under test here (tests/test_concurrency.py shows the retries themselves).
    with FlowStore(sqlite_url) as setup:
        setup.create_flow(linear("line"))
    with (
        FlowStore(sqlite_url, max_retries=0) as store,
        LiveServer(create_app(store, JwtVerifier(SECRET))) as live,
        httpx.Client(base_url=live.url) as client,
    ):
        response = client.post("/api/flow/line/transition/next", headers=alice.headers)
        assert_problem(response, 409, "CONCURRENCY_CONFLICT")


# Probes, the spec, and what the framework answers


def test_healthz_and_readyz_need_no_token(store: FlowStore, client: httpx.Client) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    # Unauthenticated: ready or not, nothing about the log (its position counts every write).
    assert client.get("/readyz").json() == {"status": "ready"}


class _UnreachableStore:
    """Stands in for a store whose database is down: every read fails."""

    max_payload_bytes = 1024
    config = parse_url("postgresql://flows@db.invalid/flows")  # sizes the async store's threads

    def log_position(self) -> int:
        raise ConnectionRefusedError("database is down")

    def add_observer(self, observer: object) -> Callable[[], None]:
        return lambda: None  # the app's metrics observe the store's commands


def test_readyz_is_503_when_the_database_is_unreachable() -> None:
    app = create_app(_UnreachableStore(), JwtVerifier(SECRET))  # type: ignore[arg-type]
    with LiveServer(app) as live, httpx.Client(base_url=live.url) as client:
        assert client.get("/healthz").status_code == 200
        assert_problem(client.get("/readyz"), 503, "STORAGE_UNAVAILABLE")


def test_openapi_and_docs_are_served(client: httpx.Client) -> None:
    spec = client.get("/openapi.json").json()
    assert {
        "/api/flow/{flowId}/state",
        "/api/flow/{flowId}/transition/{transition}",
        "/api/flow/{flowId}/reset",
        "/api/flow/{flowId}/history",
        "/api/flow/{flowId}/transitions",
        "/api/flow/{flowId}/back",
        "/api/flow/{flowId}/next",
        "/api/flow/{flowId}/token",
        "/api/flow/{flowId}/handoff",
        "/api/flows/mine",
        "/api/flows",
        "/api/flows/{flowId}",
        "/api/flows/{flowId}/statistics",
        "/api/statistics",
        "/api/flows/{flowId}/funnel",
        "/api/flows/{flowId}/instances",
        "/api/admin/purge-expired",
        "/api/admin/users/{userId}/flows/{flowId}/state",
        "/api/admin/users/{userId}",
        "/healthz",
        "/readyz",
    } == set(spec["paths"])
    errors = spec["paths"]["/api/flow/{flowId}/state"]["get"]["responses"]["404"]["content"]
    assert set(errors) == {PROBLEM}
    assert client.get("/docs").status_code == 200


def test_unknown_routes_and_methods_are_problems_too(client: httpx.Client, alice: User) -> None:
    assert_problem(client.get("/api/nothing-here"), 404, "NOT_FOUND")
    response = client.put(f"/api/flow/{ONBOARDING}/history", headers=alice.headers)
    assert_problem(response, 405, "METHOD_NOT_ALLOWED")
    assert response.headers["allow"] == "GET"
    both = client.options("/api/flows", headers=alice.headers)  # a GET route and a POST route
    assert_problem(both, 405, "METHOD_NOT_ALLOWED")
    assert both.headers["allow"] == "GET, POST"
    # The concrete path wins over /api/flows/{flowId} for every method, as OpenAPI matches paths.
    mine = client.delete("/api/flows/mine", headers=alice.headers)
    assert_problem(mine, 405, "METHOD_NOT_ALLOWED")
    assert mine.headers["allow"] == "GET"


@pytest.mark.parametrize(
    "user_id",
    ["tenant-7/ann", "a/flows/line", "/lead", "trail/", "x%2Fy", "dots/../.."],
)
def test_user_ids_with_slashes_can_be_overridden_and_erased(
    client: httpx.Client, admin: User, line: str, user_id: str
) -> None:
    user = User(user_id, mint(user_id))
    assert client.post(f"/api/flow/{line}/transition/next", headers=user.headers).status_code == 200
    # Quoted (as a client library sends an id) and, where the id allows it, as written.
    for path_id in {quote(user_id, safe=""), quote(user_id, safe="/")}:
        if "/." in path_id or path_id.startswith("/"):
            continue  # a client normalises /../ and // away before sending: only quoted ids reach us
        state = client.put(
            f"/api/admin/users/{path_id}/flows/{line}/state",
            json={"step": "s1"},
            headers=admin.headers,
        )
        assert state.status_code == 200, state.text
    assert client.get(f"/api/flow/{line}/state", headers=user.headers).json()["step"] == "s1"
    erased = client.delete(f"/api/admin/users/{quote(user_id, safe='')}", headers=admin.headers)
    assert erased.json() == {"userId": user_id, "erasedInstances": 1}
    gone = client.get(f"/api/flow/{line}/state", headers=user.headers)
    assert (gone.status_code, gone.json()) == (200, None)  # no state: null, as the seed answers


def test_one_history_response_holds_at_most_its_cap(
    client: httpx.Client, store: FlowStore, line: str
) -> None:
    user = User.new("hoarder")
    big = {"blob": "x" * 60_000}
    for _ in range(80):  # rejected attempts keep their payloads: 4.8 MB of history
        response = client.post(
            f"/api/flow/{line}/transition/nope", json={"payload": big}, headers=user.headers
        )
        assert response.status_code == 422
    answer = client.get(f"/api/flow/{line}/history", headers=user.headers)
    assert answer.status_code == 200
    assert answer.headers["X-History-Truncated"] == "true"
    rows = answer.json()
    assert 0 < len(rows) < 81
    assert sum(len(json.dumps(row["payload"])) for row in rows) <= MAX_HISTORY_RESPONSE_BYTES
    assert (
        rows
        == [
            r.model_dump(mode="json", by_alias=True) for r in store.get_flow_history(user.id, line)
        ][: len(rows)]
    )
    # A history under the cap comes whole, unmarked.
    small = User.new("small")
    client.post(
        f"/api/flow/{line}/transition/next", json={"payload": {"a": 1}}, headers=small.headers
    )
    whole = client.get(f"/api/flow/{line}/history", headers=small.headers)
    assert "X-History-Truncated" not in whole.headers
    assert len(whole.json()) == len(store.get_flow_history(small.id, line))


def test_a_delete_on_the_state_route_is_405_not_an_erasure(
    client: httpx.Client, admin: User, line: str
) -> None:
    # The erasure route takes the rest of the path as the user id, except a path that ends like
    # the override route: that is a DELETE the override route does not have.
    victim = User("u/flows/f/state", mint("u/flows/f/state"))
    assert (
        client.post(f"/api/flow/{line}/transition/next", headers=victim.headers).status_code == 200
    )
    answer = client.delete("/api/admin/users/u/flows/f/state", headers=admin.headers)
    assert_problem(answer, 405, "METHOD_NOT_ALLOWED")
    assert client.get(f"/api/flow/{line}/state", headers=victim.headers).status_code == 200
