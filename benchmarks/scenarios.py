"""The benchmark scenarios: each measures the raw limit, the naive baseline and flowstore, in one run.

Every function takes a database URL (a fresh, empty database per call) and a size, and returns a
`Row` of rates (operations per second, higher is better) or latencies (ms, lower is better).
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import random
import sqlite3
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit
from uuid import NAMESPACE_URL, UUID, uuid5

import orjson
import psycopg
from eventsourcing.application import Application
from eventsourcing.domain import Aggregate, event

from benchmarks.stages import Stages
from flowstore import FlowError, FlowStore
from flowstore.storage import parse_url
from flowstore.testing import Internals

LOOP = {
    "flow": "loop",
    "initialStep": "a",
    "steps": {
        "a": {
            "index": 0,
            "step": "a",
            "service": "bench",
            "transitions": {
                "tick": {"transition": "tick", "step": "a"},
                "done": {"transition": "done", "step": "end"},
            },
        },
        "end": {"index": 1, "step": "end", "service": "bench", "transitions": {}},
    },
}
PAYLOAD = {"form": {"name": "Ada Lovelace", "email": "ada@example.org", "plan": "pro"}, "n": 1}
"""About the size of a real form payload; every scenario writes the same one."""


@dataclass
class Row:
    """One line of the results table."""

    scenario: str
    backend: str
    unit: str
    raw: float | None
    baseline: float | None
    flowstore: float
    extra: dict[str, Any] = field(default_factory=dict)
    cpu: dict[str, float] = field(default_factory=dict)
    """CPU µs per operation (`time.process_time`, every thread of the process) by column."""

    @property
    def vs_raw(self) -> float | None:
        """flowstore / raw limit (for rates; raw / flowstore would be the latency analogue)."""
        return self.flowstore / self.raw if self.raw else None

    @property
    def vs_baseline(self) -> float | None:
        """flowstore / naive baseline."""
        return self.flowstore / self.baseline if self.baseline else None


class Clocks:
    """Wall and CPU time of one measured stretch (CPU: every thread of this process)."""

    def __init__(self) -> None:
        self.wall0, self.cpu0 = time.perf_counter(), time.process_time()
        self.wall = self.cpu = 0.0

    def stop(self) -> Clocks:
        """Freeze the elapsed times."""
        self.wall = time.perf_counter() - self.wall0
        self.cpu = time.process_time() - self.cpu0
        return self

    def cpu_us(self, ops: int) -> float:
        """CPU µs per operation."""
        return self.cpu / ops * 1e6


# The naive baseline: bare eventsourcing, its default JSON transcoder, a mutable aggregate.


class NaiveInstance(Aggregate):
    """What a first eventsourcing implementation of a flow instance looks like."""

    @event("Started")
    def __init__(self, user_id: str, flow_id: str, step: str) -> None:
        self.user_id, self.flow_id, self.step = user_id, flow_id, step

    @staticmethod
    def create_id(user_id: str, flow_id: str) -> UUID:
        """Deterministic id, as flowstore's."""
        return uuid5(NAMESPACE_URL, f"{user_id}/{flow_id}")

    @event("Moved")
    def move(self, transition: str, to_step: str, payload: dict[str, Any]) -> None:
        """Take a transition."""
        self.step = to_step


class NaiveApp(Application[UUID]):
    """A bare eventsourcing application with the aggregate cache on."""


def naive_env(url: str) -> dict[str, str]:
    """The same persistence settings flowstore uses for this URL, with eventsourcing's own
    recorder (flowstore's PostgreSQL recorder is part of what is measured against it)."""
    env = {**parse_url(url).env, "AGGREGATE_CACHE_MAXSIZE": "10000"}
    env.pop("APPLICATION_RECORDER_TOPIC", None)
    return env


def _naive_transitions(url: str, users: list[str], ops: int) -> tuple[float, float]:
    app = NaiveApp(env=naive_env(url))
    for user in users:
        app.save(NaiveInstance(user, "loop", "a"))
    ids = [NaiveInstance.create_id(u, "loop") for u in users]
    clocks = Clocks()
    for i in range(ops):
        instance: NaiveInstance = app.repository.get(ids[i % len(ids)])
        instance.move("tick", "a", PAYLOAD)
        app.save(instance)
    clocks.stop()
    app.close()
    return ops / clocks.wall, clocks.cpu_us(ops)


# The raw limit: the bare driver doing one durable insert of a similar row per operation.

_ROW = orjson.dumps({"transition": "tick", "from_step": "a", "to_step": "a", "payload": PAYLOAD})


def _raw_sqlite(path: str, ops: int, batch: int = 1) -> tuple[float, float]:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")  # as eventsourcing sets it; synchronous stays FULL
    conn.execute(
        "CREATE TABLE IF NOT EXISTS raw (id INTEGER PRIMARY KEY, oid TEXT, v INTEGER, "
        "topic TEXT, state BLOB, UNIQUE (oid, v))"
    )
    clocks = Clocks()
    for start in range(0, ops, batch):
        conn.execute("BEGIN")
        conn.executemany(
            "INSERT INTO raw (oid, v, topic, state) VALUES (?, ?, ?, ?)",
            [(f"u{i}", i, "tick", _ROW) for i in range(start, min(start + batch, ops))],
        )
        conn.execute("COMMIT")
    clocks.stop()
    conn.close()
    return ops / clocks.wall, clocks.cpu_us(ops)


def _pg_conninfo(url: str) -> str:
    parts = urlsplit(url)
    return (
        f"host={parts.hostname} port={parts.port} dbname={parts.path.strip('/')} "
        f"user={parts.username} password={parts.password}"
    )


def _raw_postgres(url: str, ops: int, batch: int = 1) -> tuple[float, float]:
    with psycopg.connect(_pg_conninfo(url), autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE IF NOT EXISTS raw (id BIGSERIAL PRIMARY KEY, oid TEXT, v INTEGER, "
            "topic TEXT, state BYTEA, UNIQUE (oid, v))"
        )
        clocks = Clocks()
        for start in range(0, ops, batch):
            rows = [(f"u{i}", i, "tick", _ROW) for i in range(start, min(start + batch, ops))]
            if batch == 1:
                conn.execute(
                    "INSERT INTO raw (oid, v, topic, state) VALUES (%s, %s, %s, %s)", rows[0]
                )
            else:
                with conn.transaction(), conn.cursor() as cur:
                    cur.executemany(
                        "INSERT INTO raw (oid, v, topic, state) VALUES (%s, %s, %s, %s)", rows
                    )
        clocks.stop()
        return ops / clocks.wall, clocks.cpu_us(ops)


def raw_writes(url: str, ops: int, batch: int = 1) -> tuple[float, float]:
    """Durable single-row inserts (or `batch` rows per transaction) per second with the bare
    driver, and the CPU µs each took."""
    config = parse_url(url)
    if config.backend == "sqlite":
        return _raw_sqlite(config.env["SQLITE_DBNAME"] + ".raw", ops, batch)
    return _raw_postgres(url, ops, batch)


def _started_store(url: str, users: list[str], **options: Any) -> FlowStore:
    store = FlowStore(url, **options)
    with contextlib.suppress(FlowError):
        store.create_flow(LOOP)
    for user in users:
        store.reset_flow(user, "loop")
    return store


def single_transitions(
    urls: Callable[[], str], backend: str, ops: int, stages: Stages | None = None
) -> Row:
    """Scenario 1: one writer, one durable commit per transition (stage timers if `stages`)."""
    users = [f"user-{i}" for i in range(min(200, ops))]
    raw, raw_cpu = raw_writes(urls(), ops)
    baseline, baseline_cpu = _naive_transitions(urls(), users, ops)
    with _started_store(urls(), users) as store, ExitStack() as timing:
        if stages is not None:
            timing.enter_context(stages.active(store))
        clocks = Clocks()
        for i in range(ops):
            store.execute_transition(users[i % len(users)], "loop", "tick", PAYLOAD)
        store.sync_projections()  # the tables' work counts too
        clocks.stop()
    cpu = {"raw": raw_cpu, "baseline": baseline_cpu, "flowstore": clocks.cpu_us(ops)}
    if stages is not None:
        print(f"\nstages of scenario 1 on {backend} ({ops} transitions, wall µs per transition):")
        print(stages.table(ops, clocks.wall, clocks.cpu))
    return Row(
        "1 single transitions", backend, "transitions/s", raw, baseline, ops / clocks.wall, cpu=cpu
    )


def batched_transitions(urls: Callable[[], str], backend: str, ops: int, batch: int = 500) -> Row:
    """Scenario 2: many users' transitions per call, one transaction, vs a bulk insert."""
    users = [f"user-{i}" for i in range(batch)]
    raw, raw_cpu = raw_writes(urls(), ops, batch=batch)
    with _started_store(urls(), users) as store:
        clocks = Clocks()
        for _ in range(0, ops, batch):
            results = store.execute_transitions([(u, "loop", "tick", PAYLOAD) for u in users])
            assert all(not isinstance(r, Exception) for r in results)
        store.sync_projections()
        clocks.stop()
    done = ops // batch * batch
    cpu = {"raw": raw_cpu, "flowstore": clocks.cpu_us(done)}
    return Row(
        "2 batched transitions",
        backend,
        "transitions/s",
        raw,
        None,
        done / clocks.wall,
        {"batch": batch},
        cpu,
    )


def _thread_writer(store: FlowStore, users: list[str], ops: int, barrier: Any) -> None:
    barrier.wait()
    for i in range(ops):
        store.execute_transition(users[i % len(users)], "loop", "tick", PAYLOAD)


def _process_writer(url: str, users: list[str], ops: int, barrier: Any, out: Any) -> None:
    with FlowStore(url) as store:
        barrier.wait()
        began = time.perf_counter()
        _thread_writer(store, users, ops, threading.Barrier(1))
        store.sync_projections()
        out.put((began, time.perf_counter()))


def concurrent_writers(
    urls: Callable[[], str], backend: str, ops: int, stages: Stages | None = None
) -> list[Row]:
    """Scenario 3: 4 threads (and 2 processes on PostgreSQL) on distinct users (stage timers on
    the threads' part if `stages`: "insert + commit" calls per op are the commits per command)."""
    rows = []
    threads = 4
    users = [[f"t{t}-user-{i}" for i in range(50)] for t in range(threads)]
    solo = [f"solo-user-{i}" for i in range(50)]
    url = urls()
    with _started_store(url, [u for group in [*users, solo] for u in group]) as store:
        solo_clocks = Clocks()
        _thread_writer(store, solo, ops // threads, threading.Barrier(1))
        store.sync_projections()
        solo_clocks.stop()
        single = (ops // threads) / solo_clocks.wall
        barrier = threading.Barrier(threads + 1)
        workers = [
            threading.Thread(target=_thread_writer, args=(store, users[t], ops // threads, barrier))
            for t in range(threads)
        ]
        for worker in workers:
            worker.start()
        with ExitStack() as timing:
            if stages is not None:
                timing.enter_context(stages.active(store))
            barrier.wait()
            clocks = Clocks()
            for worker in workers:
                worker.join()
            store.sync_projections()
            clocks.stop()
        done = ops // threads * threads
        if stages is not None:
            print(f"\nstages of scenario 3 on {backend} ({done} transitions by {threads} threads):")
            print(stages.table(done, clocks.wall, clocks.cpu))
        rate = done / clocks.wall
        lost = _lost_updates(store, users, 1 + (ops // threads) // 50)
    cpu = {"raw": solo_clocks.cpu_us(ops // threads), "flowstore": clocks.cpu_us(done)}
    rows.append(
        Row(
            f"3 {threads} threads",
            backend,
            "transitions/s",
            single,
            None,
            rate,
            {"lost": lost},
            cpu,
        )
    )
    if backend == "postgres":
        url = urls()
        groups = [[f"p{p}-user-{i}" for i in range(50)] for p in range(2)]
        _started_store(url, [u for g in groups for u in g]).close()
        context = multiprocessing.get_context("spawn")
        barrier, out = context.Barrier(2), context.Queue()
        procs = [
            context.Process(target=_process_writer, args=(url, groups[p], ops // 2, barrier, out))
            for p in range(2)
        ]
        for proc in procs:
            proc.start()
        spans = [out.get(timeout=600) for _ in procs]
        for proc in procs:
            proc.join()
        elapsed = max(end for _, end in spans) - min(start for start, _ in spans)
        with FlowStore(url) as store:
            lost = _lost_updates(store, groups, 1 + (ops // 2) // 50)
        rows.append(
            Row(
                "3 2 processes",
                backend,
                "transitions/s",
                single,
                None,
                ops // 2 * 2 / elapsed,
                {"lost": lost},
            )
        )
    return rows


def _lost_updates(store: FlowStore, groups: list[list[str]], expected_version: int) -> int:
    """How many instances ended with fewer events than the writers were told succeeded."""
    lost = 0
    for group in groups:
        for user in group:
            state = store.get_flow_state(user, "loop")
            lost += state is None or state.version < expected_version
    return lost


def _percentiles(samples: list[float]) -> dict[str, float]:
    qs = statistics.quantiles(samples, n=100, method="inclusive")
    return {"p50": qs[49], "p95": qs[94], "p99": qs[98]}


def read_latency(
    urls: Callable[[], str], backend: str, instances: int, reads: int = 2000
) -> list[Row]:
    """Scenario 4: get_flow_state / get_flow_history latency (ms) on a warm store."""
    url = urls()
    users = [f"user-{i}" for i in range(instances)]
    with FlowStore(url) as store:
        store.create_flow(LOOP)
        store.execute_transitions([(u, "loop", "tick", PAYLOAD) for u in users], batch_size=1000)
        rng = random.Random(3)
        sample = [rng.choice(users) for _ in range(reads)]
        for user in sample:  # warm: the store's cache and the database pages
            store.get_flow_state(user, "loop")
        rows = []
        for name, call in (
            ("get_flow_state", store.get_flow_state),
            ("get_flow_history", store.get_flow_history),
        ):
            times = []
            for user in sample:
                began = time.perf_counter()
                call(user, "loop")
                times.append((time.perf_counter() - began) * 1000)
            p = _percentiles(times)
            rows.append(
                Row(
                    f"4 {name} p95",
                    backend,
                    "ms",
                    None,
                    None,
                    p["p95"],
                    {**p, "instances": instances},
                )
            )
    return rows


_REBUILD = """
import json, resource, sys, time
from flowstore import FlowStore
with FlowStore(sys.argv[1], live_projections=False) as store:
    wall, cpu = time.perf_counter(), time.process_time()
    replayed = store.rebuild_projections()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
child = resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps([replayed, wall, cpu + child.ru_utime + child.ru_stime, rss, child.ru_maxrss / 1024]))
"""
"""A rebuild in a fresh process (so its peak RSS is the rebuild's) of whichever code PYTHONPATH
names: events, wall s, CPU s, peak RSS MB, and the read-ahead process's peak RSS MB (0 without
one: `flowstore.projections.readahead`, on large logs). The CPU includes that process's: the
rebuild has reaped it by the time it returns."""

_RAW_READ = """
import json, sys
from benchmarks.scenarios import raw_read
from flowstore import FlowStore
with FlowStore(sys.argv[1], live_projections=False) as store:
    count, clocks = raw_read(store)
print(json.dumps(count / clocks.wall))
"""
"""Scenario 5's raw read (events/s) again, in a fresh process, after the rebuilds."""

_PUBLISH = """
import json, sys
from benchmarks.kafka import publisher_rate
from flowstore import FlowStore
from flowstore.adapters.kafka.publisher import ensure_topic
url, bootstrap, topic = sys.argv[1:]
ensure_topic(bootstrap, topic, partitions=6)
with FlowStore(url, live_projections=False) as store:
    print(json.dumps(publisher_rate(store, bootstrap, topic, 500)))
"""
"""`KafkaPublisher.publish_pending` of the whole log into a new topic, in a fresh process."""


def in_tree(tree: str, code: str, *args: str) -> Any:
    """Run `code` in a new interpreter importing flowstore (and benchmarks) from `tree`; its
    last line of output, as JSON. `tree` "" is this checkout: a before/after pair in one run."""
    root = tree or str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": root}
    # In `root` too: `python -c` puts the working directory before PYTHONPATH on sys.path.
    done = subprocess.run(
        [sys.executable, "-c", code, *args],
        env=env,
        cwd=root,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode:
        raise RuntimeError(f"in {root}: {done.stderr[-2000:]}")
    return json.loads(done.stdout.splitlines()[-1])


def raw_read(store: FlowStore) -> tuple[int, Clocks]:
    """Scenario 5's raw limit: the whole log in order by the recorder's `select_notifications`,
    without decoding; the events read and the read's clocks."""
    recorder = Internals(store).recorder
    clocks, count, start = Clocks(), 0, 1
    while page := recorder.select_notifications(start, 5000):
        count += len(page)
        start = page[-1].id + 1
    return count, clocks.stop()


def _rebuild_notes(name: str, measured: list[float], raw: float) -> dict[str, Any]:
    """A further rebuild's notes, from `_REBUILD`'s output: `name=` (events/s), `name_raw=` (its
    ratio to the raw read), `name_cpu_us=` (per event) and `name_rss_mb=` (peak)."""
    done, took, spent, peak, _ = measured
    return {
        name: round(done / took),
        f"{name}_raw": round(done / took / raw, 3),
        f"{name}_cpu_us": round(spent / done * 1e6, 1),
        f"{name}_rss_mb": round(peak),
    }


def rebuild(urls: Callable[[], str], backend: str, events: int, before: str | None = None) -> Row:
    """Scenario 5: projection rebuild vs the raw ordered log read; peak RSS of the rebuilding process.

    The row's rate is the first build, into empty tables (a store restored from its log; what
    this scenario's row measured before `--before` existed, and without it since). The notes
    hold a second rebuild, of the same code, replacing those full tables (`rebuild_projections`
    on a store in use: dropping the old tables, whose freed pages SQLite overwrites, is part of
    its cost): `replace=` and `replace_raw=`. `child_rss_mb=`: the first build's read-ahead
    process's peak RSS (0 without one). `before`: a checkout of older code, whose rebuild replaces
    the first build's tables before that second rebuild runs (`before=`, `before_raw=`).
    `raw_after=`: the raw read again, in a fresh process after the rebuilds, and the first
    build's ratio to it (`raw_after_ratio=`).
    """
    url = urls()
    users = [f"user-{i}" for i in range(1000)]
    with FlowStore(url, live_projections=False) as store:
        store.create_flow(LOOP)
        while store.log_position() < events:
            store.execute_transitions(
                [(u, "loop", "tick", PAYLOAD) for u in users], batch_size=1000
            )
        count, clocks = raw_read(store)
        raw = count / clocks.wall
    replayed, wall, cpu, rss, child_rss = in_tree("", _REBUILD, url)
    extra: dict[str, Any] = {
        "events": replayed,
        "peak_rss_mb": round(rss),
        "child_rss_mb": round(child_rss),
    }
    if before is not None:
        extra.update(_rebuild_notes("before", in_tree(before, _REBUILD, url), raw))
    extra.update(_rebuild_notes("replace", in_tree("", _REBUILD, url), raw))
    # The same read in a fresh process, after the rebuilds (the one above follows the writes in
    # the writing process): how far the raw limit itself moves, beside the ratios.
    again = in_tree("", _RAW_READ, url)
    extra.update(raw_after=round(again), raw_after_ratio=round(replayed / wall / again, 3))
    return Row(
        "5 rebuild",
        backend,
        "events/s",
        raw,
        None,
        replayed / wall,
        extra,
        {"raw": clocks.cpu_us(count), "flowstore": cpu / replayed * 1e6},
    )


def kafka_publisher(
    urls: Callable[[], str], backend: str, events: int, rounds: int = 2, before: str | None = None
) -> Row:
    """Scenario 6: the Kafka publisher vs the raw kafka-python producer, same payloads and broker.

    Each round measures raw, then `before`'s publisher (a checkout of older code), then this
    one's, each into a new topic; every figure is the best of its rounds.
    """
    from benchmarks.kafka import raw_rate, write_log
    from flowstore.adapters.kafka.envelope import FlowEventEnvelope, message_key
    from flowstore.adapters.kafka.publisher import ensure_topic, producer_settings
    from tests.e2e.kafka.broker import TansuBroker

    url = urls()
    rates: dict[str, list[float]] = {"raw": [], "settings": [], "before": [], "after": []}
    # The publisher's producer settings (one request in flight, for per-key order) on the bare
    # producer: what the settings cost, apart from the publisher's own work.
    settings = producer_settings("")
    settings.pop("bootstrap_servers")
    with TansuBroker.start() as broker:
        with FlowStore(url, live_projections=False) as store:
            write_log(store, events)
            log = store.read_events(1, store.log_position() + 1)
        messages = [(message_key(e), FlowEventEnvelope.of(n, e).to_bytes()) for n, e in log]
        bootstrap = broker.bootstrap
        for _ in range(rounds):
            topic = f"bench-{uuid.uuid4().hex[:8]}"
            ensure_topic(bootstrap, topic, partitions=6)
            rates["raw"].append(raw_rate(bootstrap, topic, messages))
            topic = f"bench-{uuid.uuid4().hex[:8]}"
            ensure_topic(bootstrap, topic, partitions=6)
            rates["settings"].append(raw_rate(bootstrap, topic, messages, **settings))
            for name, tree in (("before", before), ("after", "")):
                if tree is not None:
                    topic = f"bench-{uuid.uuid4().hex[:8]}"
                    rates[name].append(in_tree(tree, _PUBLISH, url, bootstrap, topic))
    raw = max(rates["raw"])
    extra: dict[str, Any] = {
        "events": len(log),
        "raw_publisher_settings": round(max(rates["settings"])),
        "settings_raw": max(rates["settings"]) / raw,
    }
    if rates["before"]:
        extra |= {"before": round(max(rates["before"])), "before_raw": max(rates["before"]) / raw}
    return Row("6 kafka publisher", backend, "events/s", raw, None, max(rates["after"]), extra)


__all__ = [
    "Row",
    "batched_transitions",
    "concurrent_writers",
    "in_tree",
    "kafka_publisher",
    "raw_read",
    "read_latency",
    "rebuild",
    "single_transitions",
]
