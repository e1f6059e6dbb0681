"""Prometheus metrics at /metrics, request ids on every response and in JSON logs."""

from __future__ import annotations

import logging
import socket

import httpx
import orjson
import pytest
from fastapi.testclient import TestClient

from flowstore import FlowNotFoundError, FlowStore, InvalidTransitionError
from flowstore.adapters.http import JwtVerifier, create_app
from flowstore.adapters.logs import JsonFormatter, request_id
from tests.e2e.http.conftest import SECRET, LiveServer, User
from tests.flows import linear


def test_metrics_count_commands_by_kind_and_outcome_and_show_lag_and_pool(store_url: str) -> None:
    alice = User.new("alice")
    with FlowStore(store_url) as store:
        store.create_flow(linear("f"))
        with TestClient(create_app(store, JwtVerifier(SECRET))) as client:
            assert client.post("/api/flow/f/transition/next", headers=alice.headers).is_success
            rejected = client.post("/api/flow/f/transition/nope", headers=alice.headers)
            assert rejected.status_code == 422
            text = client.get("/metrics").text
    route = "/api/flow/{flowId}/transition/{transition}"
    assert f'flowstore_requests_total{{method="POST",outcome="200",route="{route}"}} 1.0' in text
    assert f'flowstore_requests_total{{method="POST",outcome="422",route="{route}"}} 1.0' in text
    assert f'flowstore_request_seconds_count{{method="POST",route="{route}"}} 2.0' in text
    assert "flowstore_projection_lag_events " in text
    assert 'flowstore_pool_connections{state="size"} 5.0' in text


def test_every_response_carries_a_request_id_and_a_sane_one_sent_is_kept() -> None:
    with FlowStore("memory://") as store, TestClient(create_app(store, JwtVerifier(SECRET))) as c:
        generated = c.get("/healthz").headers["x-request-id"]
        assert len(generated) == 32
        assert c.get("/healthz", headers={"X-Request-ID": "abc-123"}).headers["x-request-id"] == (
            "abc-123"
        )
        odd = c.get("/healthz", headers={"X-Request-ID": "no spaces <b>"}).headers
        assert odd["x-request-id"] != "no spaces <b>"


def test_json_log_lines_name_the_request() -> None:
    record = logging.LogRecord(
        "flowstore.x", logging.WARNING, __file__, 1, "hello %s", ("you",), None
    )
    token = request_id.set("req-7")
    try:
        record.request_id = request_id.get()
        line = orjson.loads(JsonFormatter().format(record))
    finally:
        request_id.reset(token)
    assert line["message"] == "hello you"
    assert line["level"] == "warning"
    assert line["request_id"] == "req-7"


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The samples a real /metrics endpoint serves: {(name, sorted labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    response = httpx.get(url, timeout=10)
    assert response.status_code == 200
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def commands(
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], kind: str
) -> dict[str, float]:
    """flowstore_commands_total of `kind`, by outcome."""
    return {
        dict(labels)["outcome"]: value
        for (name, labels), value in samples.items()
        if name == "flowstore_commands_total" and dict(labels)["kind"] == kind
    }


def test_store_commands_are_counted_by_kind_and_outcome_whoever_calls_the_store(
    store_url: str,
) -> None:
    alice = User.new("alice")
    with FlowStore(store_url) as store, FlowStore(store_url) as other:
        store.create_flow(linear("f", 5))
        with LiveServer(create_app(store, JwtVerifier(SECRET))) as server:
            url = f"{server.url}/api/flow/f/transition"
            assert httpx.post(f"{url}/next", headers=alice.headers).is_success
            assert httpx.post(f"{url}/nope", headers=alice.headers).status_code == 422
            # Another process moves alice on: the server's next append conflicts, and the
            # command is decided again on the fresh state.
            other.execute_transition(alice.id, "f", "next")
            assert httpx.post(f"{url}/next", headers=alice.headers).is_success
            store.reset_flow(alice.id, "f")  # library calls on the same store count too
            with pytest.raises(FlowNotFoundError):
                store.reset_flow(alice.id, "nowhere")
            with pytest.raises(InvalidTransitionError):
                store.go_back(alice.id, "f")  # nothing to go back to
            samples = scrape(f"{server.url}/metrics")
    assert commands(samples, "transition") == {
        "accepted": 2.0,
        "rejected": 1.0,
        "conflict-retried": 1.0,
    }
    assert commands(samples, "reset") == {"accepted": 1.0, "rejected": 1.0}
    assert commands(samples, "back") == {"rejected": 1.0}
    histogram = ("flowstore_command_seconds_count", (("kind", "transition"),))
    assert samples[histogram] == 3.0  # a retry is timed within its command, not apart


def test_rebuild_progress_is_served_while_it_runs_and_after(store_url: str) -> None:
    from prometheus_client import start_http_server

    from flowstore.adapters.metrics import FleetMetrics

    with FlowStore(store_url) as store:
        store.create_flow(linear("f", 5))
        for user in ("ann", "bob", "cid"):
            store.execute_transition(user, "f", "next")
        metrics = FleetMetrics(store)
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        server, thread = start_http_server(port, addr="127.0.0.1", registry=metrics.registry)
        try:
            url = f"http://127.0.0.1:{port}/metrics"
            during: list[dict[tuple[str, tuple[tuple[str, str], ...]], float]] = []
            store.rebuild_projections(progress=lambda *_: during.append(scrape(url)))
            after = scrape(url)
            head = float(store.log_position())
        finally:
            server.shutdown()
            thread.join()
            metrics.close()
    assert during, "no progress reported"
    assert all(s[("flowstore_rebuild_running", ())] == 1.0 for s in during)
    assert during[-1][("flowstore_rebuild_events_done", ())] == head
    assert after[("flowstore_rebuild_running", ())] == 0.0
    assert after[("flowstore_rebuild_events_done", ())] == head
    assert after[("flowstore_rebuild_events_total", ())] == head
