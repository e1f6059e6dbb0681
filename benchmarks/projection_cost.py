"""What the console's projection tables cost the write path: CPU µs per event, with and without.

    PYTHONPATH=$PWD python -m benchmarks.projection_cost [--instances 2000] [--single 3000]

Builds a log of the console benchmark's signup flow (`benchmarks.console.build`, about ten events a
run), reads it into memory, then projects it into fresh tables (a SQLite file of their own) several
times, side by side in one process, each variant on the same events:

- **layout 3**: everything the projector writes today;
- **without the console's tables**: no `flow_transitions`, no `flow_response_times`, no hour rows in
  `flow_activity`, no `ix_flow_states_flow_idle` (the additions of issue 20; the `stay_ms` and
  `entered_at` values are still written, they are two columns of rows written anyway);
- **without the history (flow_id, timestamp) index** (on top of layout 3);
- **without both**.

Two ways of applying: the whole log in pages of 1,000 events (a rebuild or a catch-up after a
burst) and, for the first `--single` events, one event per transaction (a live store answering
one command at a time). CPU is `time.process_time()` of this process, which runs SQLite itself,
divided by the events applied and by the transition attempts among them.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import flowstore.projections.batch as batch_module
from benchmarks.console import build
from benchmarks.run import machine
from flowstore import FlowStore
from flowstore.domain import DomainEvent, TransitionExecuted, TransitionRejected
from flowstore.projections.ops import RowChanges, fold
from flowstore.projections.sql import SqlProjections
from flowstore.storage import parse_url

Events = Sequence[tuple[int, DomainEvent]]

CONSOLE_INDEXES = ("ix_flow_states_flow_idle",)
HISTORY_TIME_INDEX = "ix_flow_history_flow_time"


class _WithoutConsole:
    """A `RowChanges` that passes on everything but what feeds the console's tables (issue 20)."""

    def __init__(self, rows: RowChanges) -> None:
        self.rows = rows

    def __getattr__(self, name: str) -> Any:
        return getattr(self.rows, name)

    def add(self, table: str, key: tuple[Any, ...], deltas: Mapping[str, float]) -> None:
        if table in ("transitions", "response_times") or (table == "activity" and key[1] != 60):
            return
        self.rows.add(table, key, deltas)

    def add_spans(
        self, table: str, flow_id: str, second: int, last: Any, deltas: Mapping[str, float]
    ) -> None:
        if table == "activity":  # the minute's bucket only
            self.rows.add(table, (flow_id, 60, second - second % 60, last), deltas)

    def repeat(self, changes: Callable[..., None], *key: Any) -> None:
        # The changes are made later, on the rows given: filtered by a `_WithoutConsole` too.
        self.rows.repeat(_repeated_without_console, changes, *key)


def _repeated_without_console(
    rows: RowChanges, times: int, changes: Callable[..., None], *key: Any
) -> None:
    changes(_WithoutConsole(rows), times, *key)


def _fold_without_console(
    kind: str, event: Mapping[str, Any], previous: Any, attempts: int, rows: RowChanges
) -> None:
    fold(kind, event, previous, attempts, _WithoutConsole(rows))


VARIANTS: list[tuple[str, bool, tuple[str, ...]]] = [
    # (name, console ops on, indexes dropped)
    ("layout 3 (all)", True, ()),
    ("without the console's tables", False, CONSOLE_INDEXES),
    ("without history (flow_id, timestamp)", True, (HISTORY_TIME_INDEX,)),
    ("without both", False, (*CONSOLE_INDEXES, HISTORY_TIME_INDEX)),
]


@contextmanager
def _variant(console: bool) -> Iterator[None]:
    if console:
        yield
        return
    batch_module.fold = _fold_without_console
    try:
        yield
    finally:
        batch_module.fold = fold


def project(
    events: Events, directory: Path, name: str, *, console: bool, drop: Sequence[str], page: int
) -> float:
    """CPU seconds to project `events` into fresh tables, `page` events per transaction."""
    path = directory / f"{name.replace(' ', '_').replace('/', '')}-{page}.db"
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    projections = SqlProjections(parse_url(f"sqlite:///{path}"))
    try:
        with projections.engine.begin() as conn:
            for index in drop:
                conn.exec_driver_sql(f'DROP INDEX "{index}"')

        def read(start: int, limit: int) -> Events:
            return events[start - 1 : start - 1 + limit]

        with _variant(console):
            began = time.process_time()
            projections.catch_up(read, page=page)
            return time.process_time() - began
    finally:
        projections.close()


def _renumbered(store: FlowStore) -> list[tuple[int, DomainEvent]]:
    """The whole log, numbered 1..n (so a page is a slice)."""
    found: list[DomainEvent] = []
    start = 1
    while page := store.read_events(start, 5000):
        found += [event for _, event in page]
        start = page[-1][0] + 1
    return list(enumerate(found, start=1))


def run(instances: int, single: int, rounds: int) -> dict[str, Any]:
    """Build the log, project it in every variant, return the report."""
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        url = f"sqlite:///{directory / 'log.db'}"
        build(url, instances, batch=250)
        with FlowStore(url) as store:
            events = _renumbered(store)
        attempts = sum(isinstance(e, TransitionExecuted | TransitionRejected) for _, e in events)
        head = events[:single]
        head_attempts = sum(isinstance(e, TransitionExecuted | TransitionRejected) for _, e in head)
        modes = (
            ("pages of 1000", events, 1000, attempts),
            ("one event per transaction", head, 1, head_attempts),
        )
        best: dict[tuple[str, str], float] = {}
        for _ in range(rounds):  # rounds outside: every variant sees the same machine load
            for name, console, drop in VARIANTS:
                for label, part, page, _tried in modes:
                    cpu = project(part, directory, name, console=console, drop=drop, page=page)
                    best[(name, label)] = min(cpu, best.get((name, label), cpu))
        rows = []
        for name, _, _ in VARIANTS:
            row: dict[str, Any] = {"variant": name}
            for label, part, _page, tried in modes:
                cpu = best[(name, label)]
                row[label] = {
                    "cpu_us_per_event": round(cpu / len(part) * 1e6, 1),
                    "cpu_us_per_transition": round(cpu / tried * 1e6, 1),
                }
            rows.append(row)
        return {
            "events": len(events),
            "transition_attempts": attempts,
            "single_events": len(head),
            "rows": rows,
        }


def main(argv: list[str] | None = None) -> None:
    """Run and write benchmarks/results/projection-cost-<date>.json and a table to stdout."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--instances", type=int, default=2000)
    parser.add_argument("--single", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=3, help="best of this many runs")
    args = parser.parse_args(argv)
    report = run(args.instances, args.single, args.rounds)
    when = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    report |= {
        "command": "python -m benchmarks.projection_cost "
        + " ".join(f"--{k} {v}" for k, v in vars(args).items()),
        "when": when,
        "machine": machine(),
        "load_average": [round(x, 1) for x in os.getloadavg()],
    }
    out = Path(__file__).parent / "results" / f"projection-cost-{when[:10]}.json"
    out.write_text(json.dumps(report, indent=2))
    print(markdown(report))
    print(f"written {out}")


def markdown(report: dict[str, Any]) -> str:
    """The report as a Markdown table (CPU µs per transition attempt, then per event)."""
    base = report["rows"][0]
    lines = [
        "| variant | pages of 1000: µs/transition | µs/event | vs all | "
        "one per transaction: µs/transition | µs/event | vs all |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in report["rows"]:
        cells = [row["variant"]]
        for label in ("pages of 1000", "one event per transaction"):
            figures, ref = row[label], base[label]
            share = figures["cpu_us_per_event"] / ref["cpu_us_per_event"] - 1
            cells += [
                f"{figures['cpu_us_per_transition']:,.0f}",
                f"{figures['cpu_us_per_event']:,.0f}",
                f"{share:+.0%}" if row is not base else "",
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
