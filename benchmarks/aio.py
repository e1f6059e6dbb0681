"""The event loop under load: FlowStore called from `async def` directly, vs AsyncFlowStore.

    python -m benchmarks.aio [--calls 100] [--rounds 5] [--backends sqlite,postgres]

Each round starts `--calls` concurrent request handlers (a transition, the user's history and the
flow's statistics, as a web handler would) while a heartbeat task asks the loop to wake it every
millisecond; a gap is how late a wake-up came. Three ways to call the store:

- `sync`: the blocking FlowStore straight from `async def` (what a new user writes first);
- `to_thread`: each call through `asyncio.to_thread` (the default executor, up to 32+ threads);
- `aio`: `AsyncFlowStore` (its own pool, sized to the database's connections).

Prints heartbeat gaps (p50, p99, max, in ms) and throughput (handlers/s) per mode and backend and
writes `benchmarks/results/aio-<time>.json`. Target (issue 19): p99 gap < 20 ms for `aio`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from contextlib import ExitStack
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from flowstore import AsyncFlowStore, FlowStore
from tests.flows import linear
from tests.pgserver import PostgresServer

HERE = Path(__file__).parent
_TICK = 0.001


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def _heartbeat(gaps: list[float], running: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    while not running.is_set():
        before = loop.time()
        await asyncio.sleep(_TICK)
        gaps.append(max(0.0, loop.time() - before - _TICK))


Handler = Callable[[str], Awaitable[None]]


def _handlers(mode: str, store: FlowStore, astore: AsyncFlowStore) -> Handler:
    if mode == "sync":

        async def direct(user: str) -> None:
            store.execute_transition(user, "line", "next")
            store.get_flow_history(user, "line")
            store.get_flow_statistics("line")

        return direct
    if mode == "to_thread":

        async def threaded(user: str) -> None:
            await asyncio.to_thread(store.execute_transition, user, "line", "next")
            await asyncio.to_thread(store.get_flow_history, user, "line")
            await asyncio.to_thread(store.get_flow_statistics, "line")

        return threaded

    async def pooled(user: str) -> None:
        await astore.execute_transition(user, "line", "next")
        await astore.get_flow_history(user, "line")
        await astore.get_flow_statistics("line")

    return pooled


async def _measure(
    mode: str, url: str, calls: int, rounds: int, threads: int | None
) -> dict[str, Any]:
    store = FlowStore(url)
    store.create_flow(linear("line", steps=rounds + 2))
    astore = AsyncFlowStore.wrap(store, threads=threads)
    handler = _handlers(mode, store, astore)
    gaps: list[float] = []
    elapsed = 0.0
    try:
        for round_ in range(rounds):
            running = asyncio.Event()
            beat = asyncio.create_task(_heartbeat(gaps, running))
            await asyncio.sleep(0.01)  # the heartbeat is ticking before the load starts
            started = time.perf_counter()
            await asyncio.gather(*(handler(f"{mode}-{i}") for i in range(calls)))
            elapsed += time.perf_counter() - started
            running.set()
            await beat
            del round_
    finally:
        await astore.close()
    return {
        "mode": mode,
        "p50_gap_ms": 1000 * statistics.median(gaps),
        "p99_gap_ms": 1000 * _percentile(gaps, 0.99),
        "max_gap_ms": 1000 * max(gaps),
        "handlers_per_s": calls * rounds / elapsed,
        "threads": astore.threads if mode == "aio" else None,
    }


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; print and save the results."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.aio")
    parser.add_argument("--calls", type=int, default=100, help="concurrent handlers per round")
    parser.add_argument("--rounds", type=int, default=5, help="rounds (each a new transition)")
    parser.add_argument("--backends", default="sqlite,postgres")
    parser.add_argument("--threads", type=int, help="AsyncFlowStore's pool (default: its own)")
    parser.add_argument("--modes", default="sync,to_thread,aio")
    args = parser.parse_args(argv)
    rows: list[dict[str, Any]] = []
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        pg: PostgresServer | None = None
        for backend in args.backends.split(","):
            for mode in args.modes.split(","):
                if backend == "sqlite":
                    url = f"sqlite:///{tmp / f'{mode}.db'}"
                else:
                    if pg is None:
                        pg = stack.enter_context(PostgresServer.start())
                    url = pg.create_database()
                row = asyncio.run(_measure(mode, url, args.calls, args.rounds, args.threads))
                rows.append({"backend": backend, **row})
    table = Table(title=f"event loop with {args.calls} concurrent handlers x {args.rounds} rounds")
    for column in ("backend", "mode", "p50 gap ms", "p99 gap ms", "max gap ms", "handlers/s"):
        table.add_column(column, justify="right" if "gap" in column or "/" in column else "left")
    for row in rows:
        table.add_row(
            row["backend"],
            row["mode"],
            f"{row['p50_gap_ms']:.1f}",
            f"{row['p99_gap_ms']:.1f}",
            f"{row['max_gap_ms']:.1f}",
            f"{row['handlers_per_s']:,.0f}",
        )
    Console().print(table)
    stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H%M%SZ")
    out = HERE / "results" / f"aio-{stamp}.json"
    out.write_text(json.dumps({"calls": args.calls, "rounds": args.rounds, "rows": rows}, indent=2))
    print(f"written {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
