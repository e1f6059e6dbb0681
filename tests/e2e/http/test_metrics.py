"""Prometheus metrics at /metrics, request ids on every response and in JSON logs."""

from __future__ import annotations

import logging

import orjson
from fastapi.testclient import TestClient

from flowstore import FlowStore
from flowstore.adapters.http import JwtVerifier, create_app
from flowstore.adapters.logs import JsonFormatter, request_id
from tests.e2e.http.conftest import SECRET, User
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
