"""OpenTelemetry spans (the `otel` extra): one HTTP transition, from the request to its projection."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

pytest.importorskip("opentelemetry.sdk")

from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
    InMemorySpanExporter,
)
from opentelemetry.trace import SpanKind

from flowstore import FlowStore
from flowstore.adapters.http import JwtVerifier, create_app
from flowstore.adapters.tracing import trace_store, traced
from tests.e2e.http.conftest import SECRET, LiveServer, User
from tests.flows import linear

ROOT = Path(__file__).resolve().parents[3]
ROUTE = "/api/flow/{flowId}/transition/{transition}"
EMAIL = "alice.private@example.com"


def one(spans: list[ReadableSpan], name: str, **attributes: Any) -> ReadableSpan:
    found = [
        s
        for s in spans
        if s.name == name and all((s.attributes or {}).get(k) == v for k, v in attributes.items())
    ]
    assert len(found) == 1, (name, [(s.name, s.attributes) for s in spans])
    return found[0]


def children(spans: list[ReadableSpan], parent: ReadableSpan) -> list[str]:
    return sorted(
        s.name for s in spans if s.parent is not None and s.parent.span_id == parent.context.span_id
    )


def test_one_http_transition_yields_its_span_tree_without_personal_data(store_url: str) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    alice = User.new("alice")
    with FlowStore(store_url) as store:
        store.create_flow(linear("f", 3))
        assert traced(store) is None
        trace_store(store, tracer_provider=provider)
        assert trace_store(store) is traced(store)  # once per store
        with LiveServer(create_app(store, JwtVerifier(SECRET))) as server:
            response = httpx.post(
                f"{server.url}/api/flow/f/transition/next",
                headers={**alice.headers, "X-Request-ID": "req-1"},
                json={"payload": {"email": EMAIL}},
            )
            assert response.is_success, response.text
            position = store.log_position()

            def projected() -> bool:
                return any(
                    s.name == "flowstore.project"
                    and (s.attributes or {}).get("flowstore.log.last", 0) >= position
                    for s in exporter.get_finished_spans()
                )

            while not projected():  # the live projector's batch; pytest-timeout bounds it
                time.sleep(0.01)
    spans = list(exporter.get_finished_spans())

    request = one(spans, f"HTTP POST {ROUTE}")
    assert request.kind is SpanKind.SERVER
    assert request.attributes == {
        "http.request.method": "POST",
        "http.route": ROUTE,
        "http.response.status_code": 200,
    }
    command = one(
        spans,
        "flowstore.command",
        **{"flowstore.command.kind": "transition", "flowstore.flow_id": "f"},
    )
    assert command.parent is not None
    assert command.parent.span_id == request.context.span_id
    assert command.context.trace_id == request.context.trace_id
    assert command.attributes is not None
    assert command.attributes["flowstore.command.outcome"] == "accepted"
    assert children(spans, command) == ["flowstore.append", "flowstore.decide"]
    append = one(spans, "flowstore.append", **{"flowstore.log.position": position})
    # The catch-up that projected the append is linked to it (a batch may hold many commands).
    project = next(
        s
        for s in spans
        if s.name == "flowstore.project"
        and (s.attributes or {})["flowstore.log.first"]
        <= position
        <= (s.attributes or {})["flowstore.log.last"]
    )
    assert [link.context.span_id for link in project.links] == [append.context.span_id]

    # Personal data: no user id, payload value, token or raw path in any name or attribute.
    for span in spans:
        texts = [span.name, *map(str, (span.attributes or {}).values())]
        for text in texts:
            assert alice.id not in text, (span.name, text)
            assert EMAIL not in text, (span.name, text)
            assert alice.token not in text, (span.name, text)
            assert "/api/flow/f/" not in text, (span.name, text)


def test_an_untraced_store_gets_no_tracing_middleware(store_url: str) -> None:
    from flowstore.adapters.tracing import TracingMiddleware

    with FlowStore(store_url) as store:
        app = create_app(store, JwtVerifier(SECRET))
        assert traced(store) is None
        assert not any(m.cls is TracingMiddleware for m in app.user_middleware)


def test_fastapis_own_request_tracing_records_no_raw_path_of_the_app() -> None:
    # FastAPI (0.165 and later) traces every request into the *global* provider with `url.path`
    # (user ids in admin paths); create_app turns that off. Global state: a process of its own.
    code = """
import sys
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from fastapi import FastAPI
from fastapi.testclient import TestClient
from flowstore.adapters.http import JwtVerifier, create_app
from flowstore.testing import memory_store

exporter = InMemorySpanExporter()
provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(exporter))
trace.set_tracer_provider(provider)
probe = FastAPI()
probe.get("/probe/{x}")(lambda x: x)
with TestClient(probe) as client:
    client.get("/probe/someone")
native = any((s.attributes or {}).get("url.path") for s in exporter.get_finished_spans())
exporter.clear()
with memory_store() as store, TestClient(create_app(store, JwtVerifier("s" * 32))) as client:
    client.delete("/api/admin/users/tenant-7%2Fann")
    client.get("/healthz")
leaked = [dict(s.attributes or {}) for s in exporter.get_finished_spans()]
print(leaked)
sys.exit(3 if not native else 1 if leaked else 0)
"""
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    if done.returncode == 3:
        pytest.skip("this FastAPI does not trace requests itself")
    assert done.returncode == 0, done.stdout + done.stderr
