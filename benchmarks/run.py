"""Projection rebuild vs the raw ordered read of the same log, on SQLite and PostgreSQL.

    python -m benchmarks.run [--events N] [--backends sqlite,postgres]

Writes a log of about N events with live projections off, then measures, back to back in this
process: the raw limit (the eventsourcing recorder's `select_notifications` reading the whole log in
pages, no decoding) and `FlowStore.rebuild_projections()` over the same log. Prints one row per
backend with both rates and their ratio, and saves JSON in benchmarks/results/. The rest of the
benchmark suite (single and batched transitions, concurrency, latencies, Kafka) is issue 4.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import resource
import tempfile
import time
from contextlib import ExitStack, suppress
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from flowstore import FlowError, FlowStore
from flowstore.storage import parse_url
from tests.flows import onboarding
from tests.pgserver import PostgresServer

RESULTS = Path(__file__).parent / "results"
FLOW = "user-onboarding"


def fill(url: str, events: int, seed: int = 1) -> int:
    """Write about `events` events (onboarding runs, some rejected attempts); return the log size."""
    rng = random.Random(seed)
    with FlowStore(url, live_projections=False) as store:
        store.create_flow(onboarding())
        user = 0
        while store.log_position() < events:
            user += 1
            for transition in (
                "start",
                rng.choice(["skip", "continue", "bogus"]),
                "save",
                "complete",
            ):
                with suppress(FlowError):
                    store.execute_transition(f"u{user}", FLOW, transition)
        return store.log_position()


def raw_read(url: str, page: int = 5000) -> tuple[int, float]:
    """Read the whole log in order through the bare recorder; return (notifications, seconds)."""
    with FlowStore(url, live_projections=False) as store:
        recorder = store._app.recorder
        began, count, start = time.perf_counter(), 0, 1
        while batch := recorder.select_notifications(start, page):
            count += len(batch)
            start = batch[-1].id + 1
        return count, time.perf_counter() - began


def rebuild(url: str) -> tuple[int, float]:
    """Rebuild the projections from the whole log; return (events, seconds)."""
    with FlowStore(url, live_projections=False) as store:
        began = time.perf_counter()
        replayed = store.rebuild_projections()
        return replayed, time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--backends", default="sqlite,postgres")
    args = parser.parse_args()
    rows: list[dict[str, Any]] = []
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        for backend in args.backends.split(","):
            if backend == "sqlite":
                url = f"sqlite:///{tmp / 'bench.db'}"
            else:
                url = stack.enter_context(PostgresServer.start()).create_database()
            parse_url(url)
            size = fill(url, args.events)
            n_raw, t_raw = raw_read(url)
            n_rebuild, t_rebuild = rebuild(url)
            row = {
                "backend": backend,
                "events": size,
                "raw_read_per_s": n_raw / t_raw,
                "rebuild_per_s": n_rebuild / t_rebuild,
            }
            row["ratio"] = row["rebuild_per_s"] / row["raw_read_per_s"]
            rows.append(row)
            print(
                f"{backend:9} {size:>9,} events  raw read {row['raw_read_per_s']:>10,.0f}/s  "
                f"rebuild {row['rebuild_per_s']:>8,.0f}/s  rebuild/raw {row['ratio']:.3f}"
            )
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS of this process: {peak_rss_mb:.0f} MB")
    RESULTS.mkdir(exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    report = {
        "when": stamp,
        "machine": {"python": platform.python_version(), "cpu": platform.machine()},
        "versions": {p: metadata.version(p) for p in ("eventsourcing", "sqlalchemy", "psycopg")},
        "peak_rss_mb": peak_rss_mb,
        "rows": rows,
    }
    (RESULTS / f"rebuild-{stamp}.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
