"""The read-model tables: `projections status|rebuild|migrate|verify|repair|run`."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import TYPE_CHECKING

from flowstore.adapters.cli.output import Note, Output, Result
from flowstore.adapters.cli.running import stop_on_signals
from flowstore.adapters.errors import DIFFERENCES_EXIT_CODE

if TYPE_CHECKING:
    from flowstore import FlowStore
    from flowstore.projections.sql import Difference

__all__ = [
    "projections_migrate",
    "projections_rebuild",
    "projections_repair",
    "projections_run",
    "projections_status",
    "projections_verify",
]


def projections_status(store: FlowStore, args: argparse.Namespace, out: Output) -> Result:
    """`projections status`: how far the tables are behind the log, and what they had to skip."""
    position, head = store.projection_position(), store.log_position()
    unreadable = store.unreadable_events()
    data = {
        "position": position,
        "logPosition": head,
        "lag": max(0, head - position),
        "unreadable": [
            {
                "position": row["position"],
                "aggregateId": row["originator_id"],
                "version": row["originator_version"],
                "detail": row["detail"],
            }
            for row in unreadable
        ],
    }
    text = f"tables at event {position} of {head} (lag {data['lag']})"
    for row in unreadable:
        text += (
            f"\nunreadable event {row['position']} ({row['originator_id']} "
            f"v{row['originator_version']}), skipped: {row['detail']}"
            f"\n  move it aside: flowstore quarantine {row['position']} --reason '...'"
        )
    return Note(text, data)


def projections_migrate(store: FlowStore, args: argparse.Namespace, out: Output) -> Result:
    """`projections migrate`: build this version's table layout beside the old one, then swap."""
    replayed = store.migrate_projections()
    text = f"migrated: replayed {replayed} events" if replayed else "tables already current"
    return Note(text, {"replayed": replayed})


def projections_rebuild(store: FlowStore, args: argparse.Namespace, out: Output) -> Result:
    """`projections rebuild`: replay the whole log into fresh tables, then swap them in."""
    import time

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    began = time.perf_counter()
    with Progress(
        TextColumn("rebuilding"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]:,.0f} events/s"),
        console=out.console,
        transient=out.as_json,
    ) as bar:
        task = bar.add_task("rebuild", total=max(store.log_position(), 1), rate=0.0)

        def progress(replayed: int, position: int) -> None:
            rate = replayed / max(time.perf_counter() - began, 1e-9)
            bar.update(task, completed=position, rate=rate)

        replayed = store.rebuild_projections(progress)
    seconds = time.perf_counter() - began
    rate = replayed / seconds if seconds else 0.0
    return Note(
        f"Rebuilt from {replayed} events in {seconds:.2f} s ({rate:,.0f} events/s)",
        {"events": replayed, "seconds": seconds, "eventsPerSecond": rate},
    )


def _differences(found: Sequence[Difference], verb: str) -> Note:
    lines = [d.describe() for d in found]
    text = "\n".join([*lines, f"{len(found)} difference(s) {verb}"])
    data = {
        "differences": [{"table": d.table, "key": list(d.key), "problem": d.problem} for d in found]
    }
    return Note(text, data, exit_code=DIFFERENCES_EXIT_CODE if found and verb == "found" else 0)


def projections_verify(store: FlowStore, args: argparse.Namespace, out: Output) -> Result:
    """`projections verify`: replay the log in memory and compare with the tables."""
    return _differences(store.verify_projections(), "found")


def projections_repair(store: FlowStore, args: argparse.Namespace, out: Output) -> Result:
    """`projections repair [--user U] [--flow F]`: rewrite exactly the rows that differ."""
    return _differences(store.repair_projections(args.user, args.flow), "repaired")


def projections_run(store: FlowStore, args: argparse.Namespace, out: Output) -> Result:
    """`projections run`: follow the log and keep the tables up to date until SIGTERM/SIGINT."""
    stop = stop_on_signals()
    out.console.print(f"following the log (every {args.interval}s); stop with Ctrl-C or SIGTERM")
    # Elected like `flowstore worker`'s projections job (the same lock): one runner leads.
    from flowstore.adapters.worker import WorkerSettings, run_worker

    settings = WorkerSettings(interval=args.interval, batch=args.batch, jobs=("projections",))
    run_worker(store, stop, settings)
    position = store.projection_position()
    return Note(f"stopped at event {position}", {"position": position})
