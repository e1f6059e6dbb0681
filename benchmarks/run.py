"""flowstore side by side with the raw limit and the naive baseline, in one run, as ratios.

    python -m benchmarks.run [--ops N] [--events N] [--instances N] [--backends sqlite,postgres]
                             [--scenarios 1,2,3,4,5,6] [--profile]

`--profile` also prints where scenario 1's time goes, stage by stage (`benchmarks.stages`), and
scenario 3's (the 4 threads).

Starts its own PostgreSQL (as the tests do), gives every measurement a fresh database, prints one
row per scenario and backend, and writes `benchmarks/results/<time>.json`; the quick profile (no
flags) also rewrites `benchmarks/RESULTS.md`.
The quick profile (the defaults) takes a couple of minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import uuid
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import asdict
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

from rich.console import Console
from rich.table import Table

from benchmarks.scenarios import (
    Row,
    batched_transitions,
    concurrent_writers,
    kafka_publisher,
    read_latency,
    rebuild,
    single_transitions,
)
from benchmarks.stages import Stages
from tests.pgserver import PostgresServer

HERE = Path(__file__).parent
PACKAGES = ("eventsourcing", "sqlalchemy", "psycopg", "pydantic", "orjson")
NOTES_MARKER = "<!-- analysis: kept when the table above is regenerated -->"


def _fmt(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _cpu(row: Row) -> str:
    """CPU µs per operation: raw / baseline / flowstore ("-" where not measured)."""
    if not row.cpu:
        return "-"
    return " / ".join(_fmt(row.cpu.get(k), 0) for k in ("raw", "baseline", "flowstore"))


def render(rows: list[Row]) -> Table:
    """The results as a table."""
    table = Table(title="flowstore vs raw limit and naive baseline")
    for column in (
        "scenario",
        "backend",
        "unit",
        "raw",
        "baseline",
        "flowstore",
        "/raw",
        "/baseline",
        "CPU µs/op",
        "notes",
    ):
        table.add_column(
            column,
            justify="left" if column in ("scenario", "backend", "unit", "notes") else "right",
        )
    for row in rows:
        digits = 3 if row.unit == "ms" else 0
        notes = ", ".join(
            f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.extra.items()
        )
        table.add_row(
            row.scenario,
            row.backend,
            row.unit,
            _fmt(row.raw, digits),
            _fmt(row.baseline, digits),
            _fmt(row.flowstore, digits),
            _fmt(row.vs_raw, 2),
            _fmt(row.vs_baseline, 2),
            _cpu(row),
            notes,
        )
    return table


def machine() -> dict[str, object]:
    """What the figures were measured on."""
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {
        "cores": os.cpu_count(),
        "memory_gib": round(memory, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": {p: metadata.version(p) for p in PACKAGES},
    }


def write_markdown(rows: list[Row], info: dict[str, object], command: str) -> None:
    """benchmarks/RESULTS.md: the latest table, the machine and the command."""
    lines = [
        "# Benchmark results",
        "",
        f"Measured {info['when']} with `{command}` (the quick profile).",
        "Every row ran its raw limit, baseline and flowstore back to back in one process tree.",
        "",
        "| scenario | backend | unit | raw limit | naive baseline | flowstore | flowstore/raw | flowstore/baseline | CPU µs/op (raw / baseline / flowstore) | notes |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        digits = 3 if row.unit == "ms" else 0
        notes = ", ".join(
            f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.extra.items()
        )
        lines.append(
            f"| {row.scenario} | {row.backend} | {row.unit} | {_fmt(row.raw, digits)} | "
            f"{_fmt(row.baseline, digits)} | {_fmt(row.flowstore, digits)} | {_fmt(row.vs_raw, 2)} | "
            f"{_fmt(row.vs_baseline, 2)} | {_cpu(row)} | {notes} |"
        )
    packages = info["machine"]["packages"]  # type: ignore[index]
    lines += [
        "",
        f"Machine: {info['machine']['cores']} cores, {info['machine']['memory_gib']} GiB, "  # type: ignore[index]
        f"Python {info['machine']['python']}; "  # type: ignore[index]
        + ", ".join(f"{k} {v}" for k, v in packages.items()),
        "",
        "Raw limit: the bare driver (sqlite3 with WAL and synchronous=FULL as eventsourcing sets it, or",
        "psycopg autocommit) inserting one similar row per transition, or `batch` rows per transaction;",
        "for rebuild, the recorder's ordered `select_notifications` without decoding. Naive baseline: a",
        "bare eventsourcing Application with its default transcoder, `repository.get` + `save` per",
        "transition. For latencies (ms) lower is better and no ratio applies; for scenario 3 the raw",
        "column holds one thread's rate in the same run, so /raw is the concurrency speed-up.",
        "CPU µs/op: `time.process_time` (every thread of the process, so the live projector's work",
        "counts) per operation; for scenario 3 the raw figure is the single thread's; for rebuild the",
        "read-ahead process's CPU counts too. Rebuild's rate is the first build, into empty tables;",
        "replace= in its notes is a second rebuild replacing those full tables, raw_after= the raw",
        "read again in a fresh process after both (raw_after_ratio=: the first build's ratio to it).",
        "",
    ]
    # The hand-written analysis below the marker (targets met or missed, and why) survives reruns.
    results = HERE / "RESULTS.md"
    kept = results.read_text().partition(NOTES_MARKER)[2] if results.exists() else ""
    results.write_text("\n".join(lines) + (NOTES_MARKER + kept if kept else ""))


def _plan(
    urls: Callable[[], str], backend: str, args: argparse.Namespace
) -> list[tuple[str, Callable[[], list[Row]]]]:
    """The scenarios for one backend, by number."""
    return [
        (
            "1",
            lambda: [
                single_transitions(urls, backend, args.ops, Stages() if args.profile else None)
            ],
        ),
        ("2", lambda: [batched_transitions(urls, backend, max(args.ops * 5, 500))]),
        (
            "3",
            lambda: concurrent_writers(urls, backend, args.ops, Stages() if args.profile else None),
        ),
        ("4", lambda: read_latency(urls, backend, args.instances)),
        ("5", lambda: [rebuild(urls, backend, args.events, args.before)]),
        # The publisher only reads the log; measured once, on the embedded backend.
        (
            "6",
            lambda: (
                [kafka_publisher(urls, backend, 10_000, before=args.before)]
                if backend == "sqlite"
                else []
            ),
        ),
    ]


def main(argv: list[str] | None = None) -> None:
    """Run the chosen scenarios on the chosen backends."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ops", type=int, default=2000, help="transitions per write scenario")
    parser.add_argument("--events", type=int, default=50_000, help="log size for the rebuild")
    parser.add_argument("--instances", type=int, default=10_000, help="warm store size for latency")
    parser.add_argument("--backends", default="sqlite,postgres")
    parser.add_argument("--scenarios", default="1,2,3,4,5,6")
    parser.add_argument(
        "--profile", action="store_true", help="print scenarios 1's and 3's time per stage"
    )
    parser.add_argument(
        "--before",
        metavar="CHECKOUT",
        help="scenarios 5 and 6: also run this checkout's code (e.g. the main branch) on the same "
        "log, in the same run; its rate goes in the notes (before=, before_raw=)",
    )
    args = parser.parse_args(argv)
    chosen = set(args.scenarios.split(","))
    console = Console()
    rows: list[Row] = []
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        for backend in args.backends.split(","):
            if backend == "sqlite":
                urls: Callable[[], str] = lambda: f"sqlite:///{tmp / uuid.uuid4().hex}.db"  # noqa: E731
            else:
                server = stack.enter_context(PostgresServer.start())
                urls = server.create_database
            plan = _plan(urls, backend, args)
            for key, scenario in plan:
                if key in chosen:
                    with console.status(f"scenario {key} on {backend}"):
                        new = scenario()
                    rows.extend(new)
                    for row in new:
                        console.print(
                            f"  {row.scenario} {backend}: {_fmt(row.flowstore, 3 if row.unit == 'ms' else 0)} {row.unit}"
                        )
    console.print(render(rows))
    when = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    info = {"when": when, "machine": machine(), "args": vars(args)}
    results = HERE / "results"
    results.mkdir(exist_ok=True)
    report = {
        **info,
        "rows": [asdict(r) | {"vs_raw": r.vs_raw, "vs_baseline": r.vs_baseline} for r in rows],
    }
    (results / f"{when.replace(':', '')}.json").write_text(json.dumps(report, indent=2))
    flags = argv if argv is not None else sys.argv[1:]
    if not flags:  # RESULTS.md holds the quick profile; other runs leave their JSON only
        write_markdown(rows, info, "make bench")


if __name__ == "__main__":
    main()
