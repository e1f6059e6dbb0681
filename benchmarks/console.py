"""Console page times on a big store: `python -m benchmarks.console --instances 100000`.

Builds a SQLite store whose instances run a looping flow over the last 30 days (about ten events
per instance: the run starts, moves on, loops back now and then, is refused now and then, and
stops at some step or completes), then asks the console for each page through the real app
(`create_app`, an admin session) and reports the first (cold) and the median of five warm answers,
in ms. The store file can be kept (`--keep PATH`) and reused (`--reuse PATH`) between runs.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from starlette.testclient import TestClient

from benchmarks.run import machine
from flowstore import FlowStore
from flowstore.adapters.http import JwtVerifier, create_app

FLOW = "signup"
SECRET = "benchmark-only-hs256-secret-" + "0123456789abcdef" * 3
STEPS = ["email", "verify", "profile", "plan", "payment", "review", "done"]


def definition() -> dict[str, Any]:
    """A seven-step signup whose review can send the run back to the profile."""

    def step(i: int, name: str, **moves: str) -> dict[str, Any]:
        transitions = {t: {"transition": t, "step": to} for t, to in moves.items()}
        return {"index": i, "step": name, "service": "bench", "transitions": transitions}

    return {
        "flow": FLOW,
        "initialStep": "email",
        "steps": {
            "email": step(0, "email", submit="verify"),
            "verify": step(1, "verify", confirm="profile", resend="verify"),
            "profile": step(2, "profile", save="plan"),
            "plan": step(3, "plan", choose="payment", skip="review"),
            "payment": step(4, "payment", pay="review"),
            "review": step(5, "review", fix="profile", accept="done"),
            "done": step(6, "done"),
        },
    }


_PATH = ["submit", "resend", "confirm", "save", "choose", "pay", "fix", "save", "choose", "pay"]
_PATH += ["fix", "save", "skip", "accept"]  # 14 moves from email to done, twice round the loop


def build(
    url: str,
    instances: int,
    *,
    span: timedelta = timedelta(days=30),
    prefix: str = "u",
    seed: int = 7,
    batch: int = 500,
) -> int:
    """Add `instances` runs, in cohorts of `batch`, over the `span` up to now; return the log size.

    Each cohort's moves take about ten minutes, the last cohort's ending now, so every window the
    console offers (the last hour included) holds events.
    """
    rnd = random.Random(seed)
    start = datetime.now(UTC) - span
    clock = [start]
    cohorts = (instances + batch - 1) // batch
    with FlowStore(url, clock=lambda: clock[0]) as store:
        if FLOW not in {d.flow for d in store.list_flows()}:
            store.create_flow(definition())
        for cohort in range(cohorts):
            count = min(batch, instances - cohort * batch)
            users = [f"{prefix}{cohort * batch + i}" for i in range(count)]
            # How far each user gets: most finish, some stop at a step (they are the stuck ones).
            lengths = {u: rnd.choice([1, 2, 3, 5, 8, 12, 14, 14, 14, 14]) for u in users}
            base = start + span * (cohort + 1) / cohorts - timedelta(minutes=10)
            for move in range(len(_PATH)):
                clock[0] = base + timedelta(seconds=40 * move + rnd.random() * 30)
                requests = []
                for user in users:
                    if move < lengths[user]:
                        requests.append((user, FLOW, _PATH[move], None))
                    if move == 3 and rnd.random() < 0.1:
                        requests.append((user, FLOW, "teleport", None))  # refused
                if requests:
                    store.execute_transitions(requests, batch_size=batch)
            if cohort % 20 == 0:
                print(f"  cohort {cohort + 1}/{cohorts}, log at {store.log_position()}", flush=True)
        store.sync_projections()
        return store.log_position()


PAGES = [
    ("flows list", "/ui/flows"),
    ("flow + diagram", f"/ui/flows/{FLOW}"),
    ("funnel, all time", f"/ui/flows/{FLOW}/funnel"),
    ("activity 1h / minute", f"/ui/flows/{FLOW}/activity?window=1h"),
    ("activity 24h / hour", f"/ui/flows/{FLOW}/activity?window=24h"),
    ("activity 7d / hour", f"/ui/flows/{FLOW}/activity?window=7d"),
    ("activity 30d / day", f"/ui/flows/{FLOW}/activity?window=30d"),
    ("stuck, idle 1h", f"/ui/flows/{FLOW}/stuck?idle=1h"),
    ("stuck + idle users of a step", f"/ui/flows/{FLOW}/stuck?idle=1h&step=profile"),
]


def copy_to_postgres(sqlite_path: Path, url: str) -> None:
    """Copy a SQLite store's log (its events and user keys, byte for byte) into an empty
    PostgreSQL store at `url`, then build its tables from it: a 1M-event PostgreSQL store in
    minutes, where writing it command by command would take hours on this machine."""
    import sqlite3

    import psycopg

    from flowstore.storage import parse_url

    with FlowStore(url, live_projections=False):
        pass  # creates the schema
    env = parse_url(url).env
    source = sqlite3.connect(f"file:{sqlite_path}?mode=ro", uri=True)
    with (
        psycopg.connect(
            host=env["POSTGRES_HOST"],
            port=int(env["POSTGRES_PORT"]),
            dbname=env["POSTGRES_DBNAME"],
            user=env["POSTGRES_USER"],
            password=env["POSTGRES_PASSWORD"],
        ) as target,
        target.cursor() as cur,
    ):
        with cur.copy(
            "COPY flowstore_events (originator_id, originator_version, topic, state) FROM STDIN"
        ) as copy:
            for row in source.execute(
                "SELECT originator_id, originator_version, topic, state FROM stored_events "
                "ORDER BY rowid"
            ):
                copy.write_row(row)
        with cur.copy('COPY flowstore_user_keys (subject, user_ref, "key") FROM STDIN') as copy:
            for row in source.execute('SELECT subject, user_ref, "key" FROM flowstore_user_keys'):
                copy.write_row(row)
    source.close()
    with FlowStore(url, live_projections=False) as store:
        store.rebuild_projections()


def measure(url: str, warm: int = 5) -> list[dict[str, Any]]:
    """Each page's cold and warm answer times through the app, in ms."""
    import jwt

    token = jwt.encode(
        {"sub": "bench-admin", "roles": ["admin"], "exp": int(time.time()) + 3600}, SECRET
    )
    rows = []
    with FlowStore(url) as store, TestClient(create_app(store, JwtVerifier(SECRET))) as client:
        client.get("/ui", params={"token": token})
        for name, path in PAGES:
            times = []
            for _ in range(warm + 1):
                began = time.perf_counter()
                answer = client.get(path)
                times.append((time.perf_counter() - began) * 1000)
                assert answer.status_code == 200, (path, answer.status_code, answer.text[:300])
            rows.append(
                {
                    "page": name,
                    "path": path,
                    "cold_ms": round(times[0], 1),
                    "warm_median_ms": round(statistics.median(times[1:]), 1),
                    "bytes": len(answer.content),
                }
            )
            print(
                f"  {name:32} cold {times[0]:8.1f} ms   warm {statistics.median(times[1:]):8.1f} ms"
            )
    return rows


def main(argv: list[str] | None = None) -> None:
    """Build (or reuse) the store, time the pages, write a JSON report to benchmarks/results/."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--instances", type=int, default=10_000)
    parser.add_argument("--keep", type=Path, help="build the store in this file and keep it")
    parser.add_argument("--reuse", type=Path, help="time the pages of a store built before")
    parser.add_argument(
        "--postgres",
        action="store_true",
        help="time the pages on PostgreSQL too: a throwaway server (tests/pgserver.py) gets a "
        "copy of the SQLite store's log and rebuilds its tables from it",
    )
    parser.add_argument(
        "--top-up",
        type=int,
        default=0,
        help="with --reuse: first add this many runs over the last hour (a store built hours ago "
        "has none in it)",
    )
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        path = args.reuse or args.keep or Path(tmp) / "console.db"
        url = f"sqlite:///{path}"
        built_s = None
        if args.reuse is None:
            began = time.perf_counter()
            print(f"building {args.instances} instances in {path}", flush=True)
            build(url, args.instances)
            built_s = round(time.perf_counter() - began, 1)
        elif args.top_up:
            print(f"adding {args.top_up} runs over the last hour", flush=True)
            build(url, args.top_up, span=timedelta(hours=1), prefix="recent-", seed=11)
        with FlowStore(url) as store:
            events = store.log_position()
            instances = store.get_flow_statistics(FLOW).total_flows
        print(f"{instances} instances, {events} events; timing pages", flush=True)
        backends = {"sqlite": measure(url)}
        if args.postgres:
            from tests.pgserver import PostgresServer

            with PostgresServer.start() as pg:
                pg_url = pg.create_database()
                began = time.perf_counter()
                print("copying the log to PostgreSQL and rebuilding its tables", flush=True)
                copy_to_postgres(path, pg_url)
                print(f"  done in {time.perf_counter() - began:.0f} s; timing pages", flush=True)
                backends["postgres"] = measure(pg_url)
    when = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    flags = argv if argv is not None else sys.argv[1:]
    report = {
        "command": " ".join(["python -m benchmarks.console", *flags]),
        "when": when,
        "machine": machine(),
        "load_average": [round(x, 1) for x in os.getloadavg()],
        "store": {
            "instances": instances,
            "events": events,
            "built_s": built_s,
        },
        "pages": backends,
    }
    out = Path(__file__).parent / "results" / f"console-{instances}-{when[:10]}.json"
    out.write_text(json.dumps(report, indent=2))
    write_markdown(report)
    print(f"written {out} and benchmarks/CONSOLE.md")


BEFORE = Path(__file__).parent / "results" / "console-100000-layout2-2026-11-30.json"
"""The page times before the console's projection tables (layout 2: pages read history rows),
measured on the same store (main at 62f6515, before its tables were migrated to layout 3)."""


def _write_cost() -> list[str]:
    """The latest `benchmarks.projection_cost` report, as a section (none when it was not run)."""
    from benchmarks.projection_cost import markdown

    found = sorted((Path(__file__).parent / "results").glob("projection-cost-*.json"))
    if not found:
        return []
    cost = json.loads(found[-1].read_text())
    return [
        "",
        "## What the console's tables cost each write",
        "",
        f"`{cost['command']}`, {cost['when']}, SQLite, load average {cost['load_average']}: a log "
        f"of {cost['events']:,} events ({cost['transition_attempts']:,} transition attempts) "
        "projected into fresh tables in each variant, side by side in one process, best of the "
        "rounds; CPU of the process (SQLite runs in it) per transition attempt and per event. "
        "Pages of 1,000 events are a catch-up after a burst or a rebuild; one event per "
        f"transaction (the first {cost['single_events']:,} events) is a store answering one "
        "command at a time, where the fixed cost of a transaction dominates.",
        "",
        markdown(cost),
    ]


def write_markdown(report: dict[str, Any]) -> None:
    """benchmarks/CONSOLE.md: the latest page times per backend, the ones before, the machine."""
    store, info = report["store"], report["machine"]
    backends = list(report["pages"])
    before = json.loads(BEFORE.read_text()) if BEFORE.exists() else None
    old = {p["path"]: p for p in before["pages"]} if before else {}
    lines = [
        "# Console page times",
        "",
        f"Measured {report['when']} with `{report['command']}` on a store of "
        f"{store['instances']:,} instances and {store['events']:,} events spread over 30 days"
        + (f" (built in {store['built_s']:.0f} s)" if store["built_s"] else "")
        + f", on {' and '.join(backends)}"
        + (
            " (PostgreSQL: a throwaway server, tests/pgserver.py, with a byte-for-byte copy of the "
            "SQLite store's log and its tables rebuilt from it)."
            if "postgres" in backends
            else "."
        ),
        "Each page is asked through the real app (`create_app`, an admin session, Starlette's test "
        "client): the first answer (cold: a fresh process) and the median of the next five, in ms.",
        "",
        "| page | path | "
        + " | ".join(f"{b} cold | {b} warm" for b in backends)
        + (" | before (SQLite, layout 2) warm |" if old else " |"),
        "|---|---|" + "---|---|" * len(backends) + ("---|" if old else ""),
    ]
    for index, page in enumerate(report["pages"][backends[0]]):
        cells = [page["page"], f"`{page['path']}`"]
        for backend in backends:
            found = report["pages"][backend][index]
            cells += [f"{found['cold_ms']:,.0f}", f"**{found['warm_median_ms']:,.0f}**"]
        if old:
            cells.append(
                f"{old[page['path']]['warm_median_ms']:,.0f}" if page["path"] in old else ""
            )
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "What the pages read (layout 3): the flow page's diagram labels come from "
        "`flow_transitions` (a counter per flow, step and transition) and the funnel counters; "
        "the activity charts from `flow_activity` and `flow_response_times` (minute rows for the "
        "last hour, hour rows for 24 hours, 7 days and 30 days: at most 720 rows a chart); the "
        "stays on the stuck page from the flow's newest 10,000 transition rows (`stay_ms`, walked "
        "backwards on the (flow_id, timestamp) index); idle runs from `flow_states` through its "
        "(flow_id, status, step, updated_at) index.",
    ]
    if before:
        lines += [
            "",
            f"Before: `{before['command']}` with main at 62f6515 (layout 2) on the same store "
            f"before its migration to layout 3, {before['when']}, SQLite, "
            f"{before['store']['instances']:,} instances / {before['store']['events']:,} events, "
            f"load average {before.get('load_average')}: the flow page counted transitions over "
            "the flow's whole history, activity and stays read the history rows of the window.",
        ]
    lines += _write_cost()
    lines += [
        "",
        f"Machine: {info['cores']} cores, {info['memory_gib']} GiB, Python {info['python']}; "
        f"shared with other work while measured (load average {report.get('load_average', '?')}), "
        "so the figures are noisy.",
        "",
    ]
    (Path(__file__).parent / "CONSOLE.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
