"""Prometheus metrics for `flowstore serve` (at `/metrics`) and `flowstore worker` (`--metrics-port`).

Needs the `metrics` extra (`prometheus-client`). Each app or worker has a registry of its own, so
several in one process (tests) do not collide. The command, rebuild and expiry figures come from
the store itself (`CommandMetrics`, a `flowstore.telemetry.StoreObserver` registered with
`FlowStore.add_observer`), so they count every caller of the process's store: HTTP requests,
WebSocket transitions, the console, the worker's jobs, library calls. Exposed:

- `flowstore_commands_total{kind,outcome}`: store commands by kind (`transition`, `reset`, `back`,
  `set_state`, `clear_state`, `adopt_token`, `expire`, `erase`, `migrate`, `create_flow`,
  `update_flow`, `delete_flow`) and outcome (`accepted`, `rejected`, `error`; and
  `conflict-retried` once per optimistic-concurrency retry, see `flowstore.telemetry`);
- `flowstore_command_seconds{kind}`: their latency (a histogram);
- `flowstore_rebuild_running`: 1 while this process rebuilds or migrates the projections;
  `flowstore_rebuild_events_done` / `flowstore_rebuild_events_total`: how far it got (log
  positions, the total being the log's length when it began);
- `flowstore_expired_total`: instances expired by this process (the worker's expiry job, or
  `purge-expired` from the CLI or the API);
- `flowstore_projected_events_total`: events this process's catch-ups wrote into the tables;
- `flowstore_requests_total{method,route,outcome}`: API calls by route template and HTTP status;
- `flowstore_request_seconds{method,route}`: their latency;
- `flowstore_projection_lag_events`, `flowstore_log_position`: read at scrape time;
- `flowstore_publisher_lag_events{topic}`: when a publisher has recorded a position;
- `flowstore_pool_connections{state}`: the store's pool (`size`, `checked_out`, `overflow`);
- `flowstore_leader{job}` (worker): 1 while this process leads the job.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from flowstore import FlowStore
from flowstore.telemetry import StoreObserver

__all__ = ["CONTENT_TYPE", "CommandMetrics", "FleetMetrics", "StoreCollector"]

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


_SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class CommandMetrics(StoreObserver):
    """Counts a store's commands, rebuild progress, expiry and projection into a registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.commands = Counter(
            "flowstore_commands",
            "Store commands by kind and outcome (conflict-retried: once per retry)",
            ["kind", "outcome"],
            registry=registry,
        )
        self.latency = Histogram(
            "flowstore_command_seconds",
            "Store command latency, retries included",
            ["kind"],
            registry=registry,
            buckets=_SECONDS,
        )
        self.running = Gauge(
            "flowstore_rebuild_running",
            "1 while this process rebuilds or migrates the projections",
            registry=registry,
        )
        self.rebuild_done = Gauge(
            "flowstore_rebuild_events_done",
            "Log position the running (or last) rebuild has replayed up to",
            registry=registry,
        )
        self.rebuild_total = Gauge(
            "flowstore_rebuild_events_total",
            "Log length the running (or last) rebuild replays up to",
            registry=registry,
        )
        self.expired_total = Counter(
            "flowstore_expired", "Flow instances expired by this process", registry=registry
        )
        self.projected_total = Counter(
            "flowstore_projected_events",
            "Events this process's catch-ups wrote into the tables",
            registry=registry,
        )

    def command(self, kind: str, outcome: str, seconds: float) -> None:
        """Count the command; time it unless it is a retry (whose time its command includes)."""
        self.commands.labels(kind, outcome).inc()
        if outcome != "conflict-retried":
            self.latency.labels(kind).observe(seconds)

    def rebuild(self, done: int, total: int) -> None:
        """Note how far the rebuild got."""
        self.rebuild_done.set(done)
        self.rebuild_total.set(total)

    def rebuild_running(self, running: bool) -> None:
        """Raise or lower the running gauge."""
        self.running.set(1 if running else 0)

    def expired(self, count: int) -> None:
        """Count the expired instances."""
        self.expired_total.inc(count)

    def projected(self, first: int, last: int, count: int, began_ns: int) -> None:
        """Count the projected events."""
        self.projected_total.inc(count)


class FleetMetrics:
    """One registry for one process: the store's gauges, its commands (observed on the store
    itself), request counters and leadership. `close()` stops observing the store."""

    def __init__(self, store: FlowStore) -> None:
        self.registry = CollectorRegistry()  # collect() only when scraped
        self.registry.register(StoreCollector(store))
        self.store_metrics = CommandMetrics(self.registry)
        self._unobserve = store.add_observer(self.store_metrics)
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
            buckets=_SECONDS,
        )
        self.leader = Gauge(
            "flowstore_leader",
            "1 while this process leads the job",
            ["job"],
            registry=self.registry,
        )

    def close(self) -> None:
        """Stop observing the store (the registry keeps what it counted)."""
        self._unobserve()

    def observe(self, method: str, route: str, outcome: str, seconds: float) -> None:
        """Count one API call and its latency."""
        self.latency.labels(method, route).observe(seconds)
        self.requests.labels(method, route, outcome).inc()

    def exposition(self) -> bytes:
        """The metrics in Prometheus' text format."""
        return generate_latest(self.registry)
