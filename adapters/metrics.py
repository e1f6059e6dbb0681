"""Prometheus metrics for `flowstore serve` (at `/metrics`) and `flowstore worker` (`--metrics-port`).

Needs the `metrics` extra (`prometheus-client`). Each app or worker has a registry of its own, so
several in one process (tests) do not collide. Exposed:

- `flowstore_requests_total{method,route,outcome}`: API calls by route template (the command kind,
  e.g. `POST /api/flow/{flowId}/transition/{transition}`) and outcome (the HTTP status);
- `flowstore_request_seconds{method,route}`: their latency;
- `flowstore_projection_lag_events`, `flowstore_log_position`: read at scrape time;
- `flowstore_publisher_lag_events{topic}`: when a publisher has recorded a position;
- `flowstore_pool_connections{state}`: the store's pool (`size`, `checked_out`, `overflow`);
- `flowstore_leader{job}` (worker): 1 while this process leads the job;
- `flowstore_expired_total` (worker): instances expired by its expiry job.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from flowstore import FlowStore

__all__ = ["CONTENT_TYPE", "FleetMetrics", "StoreCollector"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

log = logging.getLogger(__name__)


class StoreCollector(Collector):
    """Reads the store's positions and pool at scrape time (nothing is kept between scrapes)."""

    def __init__(self, store: FlowStore) -> None:
        self._store = store

    def collect(self) -> Iterator[GaugeMetricFamily]:
        """The store's gauges; a database that does not answer leaves the positions out."""
        pool: Any = self._store.engine.pool
        connections = GaugeMetricFamily(
            "flowstore_pool_connections", "The store's connection pool", labels=["state"]
        )
        for state, read in (
            ("size", "size"),
            ("checked_out", "checkedout"),
            ("overflow", "overflow"),
        ):
            method = getattr(pool, read, None)
            if method is not None:
                connections.add_metric([state], float(method()))
        yield connections
        try:
            head = self._store.log_position()
            position = self._store.projection_position()
        except Exception as exc:  # the scrape must answer even when the database does not
            log.debug("metrics: positions unavailable (%s)", exc)
            return
        yield GaugeMetricFamily("flowstore_log_position", "Newest notification id", value=head)
        yield GaugeMetricFamily(
            "flowstore_projection_lag_events",
            "Events in the log not yet in the tables",
            value=max(0, head - position),
        )
        lag = GaugeMetricFamily(
            "flowstore_publisher_lag_events",
            "Events in the log not yet acknowledged by the broker",
            labels=["topic"],
        )
        for topic, published in _publisher_positions(self._store):
            lag.add_metric([topic], float(max(0, head - published)))
        yield lag


def _publisher_positions(store: FlowStore) -> list[tuple[str, int]]:
    from sqlalchemy import inspect, text

    with store.engine.connect() as conn:
        if not inspect(conn).has_table("kafka_publisher_tracking"):
            return []
        rows = conn.execute(text("SELECT topic, position FROM kafka_publisher_tracking"))
        return [(str(topic), int(position)) for topic, position in rows]


class FleetMetrics:
    """One registry: the store's gauges plus request counters and leadership, for one process."""

    def __init__(self, store: FlowStore) -> None:
        self.registry = CollectorRegistry()  # collect() only when scraped
        self.registry.register(StoreCollector(store))
        self.requests = Counter(
            "flowstore_requests",
            "API calls by route and outcome",
            ["method", "route", "outcome"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "flowstore_request_seconds",
            "API call latency",
            ["method", "route"],
            registry=self.registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )
        self.leader = Gauge(
            "flowstore_leader",
            "1 while this process leads the job",
            ["job"],
            registry=self.registry,
        )
        self.expired = Counter(
            "flowstore_expired", "Flow instances expired by this worker", registry=self.registry
        )

    def observe(self, method: str, route: str, outcome: str, seconds: float) -> None:
        """Count one API call and its latency."""
        self.latency.labels(method, route).observe(seconds)
        self.requests.labels(method, route, outcome).inc()

    def exposition(self) -> bytes:
        """The metrics in Prometheus' text format."""
        return generate_latest(self.registry)
