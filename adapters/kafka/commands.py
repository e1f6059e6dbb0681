"""The Kafka commands of the `flowstore` CLI: publish, restore --from-kafka, audit.

`adapters/cli/kafka.py` holds the thin handlers that call these (`adapters/cli/parser.py` their
arguments), importing this module only when one of them runs, so the rest of the CLI works without
the `kafka` extra.
"""

from __future__ import annotations

import argparse
import signal
import threading
import time
from typing import TYPE_CHECKING, Any, Protocol

from flowstore import FlowStore
from flowstore.adapters.errors import DIFFERENCES_EXIT_CODE
from flowstore.adapters.kafka.audit import audit_topic
from flowstore.adapters.kafka.publisher import KafkaPublisher, PublisherStatus
from flowstore.adapters.kafka.restore import TopicIncompleteError, restore_from_kafka

if TYPE_CHECKING:
    from rich.console import Console


class Output(Protocol):
    """What these commands need of the CLI's output (`adapters/cli/output.py`): its console.

    A protocol rather than an import, so the CLI depends on this module and not the other way round.
    """

    console: Console


__all__ = ["Outcome", "audit", "publish", "restore"]

Outcome = tuple[str, dict[str, Any], int]
"""What a command reports: a sentence for people, an object for JSON, the exit code.

Plain data rather than `flowstore.adapters.cli.Note`: under `python -m flowstore.adapters.cli` that module is
`__main__`, and importing it by name here would make a second, different `Note` class.
"""


def _note(text: str, data: dict[str, Any], exit_code: int = 0) -> Outcome:
    return text, data, exit_code


def _line(status: PublisherStatus) -> str:
    text = (
        f"{status.state}: published up to event {status.position} of {status.log_position} "
        f"(lag {status.lag}, {status.rate:,.0f} events/s)"
    )
    if status.state in ("waiting for broker", "failing") and status.last_error:
        text += f": {status.last_error}"
    return text


def publish(store: FlowStore, args: argparse.Namespace, out: Output) -> Outcome:
    """Send the log to a topic until SIGTERM/SIGINT (or, with --once, until caught up)."""
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    shown: dict[str, float | str] = {"at": 0.0, "state": ""}

    def report(status: PublisherStatus) -> None:
        # A line on every change of state, else at most one every --report-every seconds.
        now = time.monotonic()
        if status.state != shown["state"] or now - float(shown["at"]) >= args.report_every:
            out.console.print(_line(status), highlight=False, soft_wrap=True)
            shown.update(at=now, state=status.state)

    publisher = KafkaPublisher(
        store,
        args.bootstrap,
        args.topic,
        partitions=args.partitions,
        replication_factor=args.replication_factor,
        batch=args.batch,
        poll_interval=args.interval,
        on_status=report,
    )
    out.console.print(
        f"publishing {store.config.display} to {publisher.topic} at {publisher.bootstrap}; "
        "stop with Ctrl-C or SIGTERM",
        highlight=False,
        soft_wrap=True,
    )
    try:
        if args.once:
            if publisher.lock.acquire(stop):
                publisher.publish_pending(stop)
        else:
            publisher.run(stop)
        # Read again: a stop may come before the publisher has looked at anything.
        position, head = publisher.tracking.position(publisher.topic), store.log_position()
    finally:
        publisher.close()
    status = publisher.status()
    lag = max(0, head - position)
    return _note(
        f"stopped at event {position} of {head} (lag {lag})",
        {
            "topic": publisher.topic,
            "position": position,
            "logPosition": head,
            "lag": lag,
            "published": status.published,
            "failures": status.failures,
        },
    )


def restore(store: FlowStore, args: argparse.Namespace, out: Output) -> Outcome:
    """Rebuild the (empty) store from every event on the topic."""
    with out.console.status("restoring") as spinner:

        def progress(phase: str, count: int) -> None:
            spinner.update(f"{'read' if phase == 'read' else 'wrote'} {count:,} events")

        try:
            report = restore_from_kafka(store, args.bootstrap, args.topic, progress=progress)
        except TopicIncompleteError as err:
            return _note(err.message, err.to_dict(), DIFFERENCES_EXIT_CODE)
    return _note(
        f"Restored {report.events} events of {report.aggregates} aggregates from "
        f"{report.messages} messages on {report.topic} ({report.duplicates} duplicates dropped) "
        f"in {report.seconds:.2f} s",
        {
            "topic": report.topic,
            "messages": report.messages,
            "events": report.events,
            "duplicates": report.duplicates,
            "aggregates": report.aggregates,
            "seconds": report.seconds,
        },
    )


def audit(store: FlowStore, args: argparse.Namespace, out: Output) -> Outcome:
    """Compare the topic with the log; exit with DIFFERENCES_EXIT_CODE on any gap."""
    report = audit_topic(store, args.bootstrap, args.topic, up_to=args.up_to)
    lines = [finding.describe() for finding in report.findings]
    lines += [f"unreadable message at partition {p}, offset {o}" for p, o in report.unreadable]
    gaps = sum(1 for f in report.findings if f.is_gap) + len(report.unreadable)
    lines.append(
        f"{report.topic}: {report.messages} messages, {report.checked} events checked (up to "
        f"event {report.up_to}; {report.unpublished} not yet published): "
        f"{report.count('missing')} aggregate(s) missing events, "
        f"{report.count('out of order')} out of order, {report.count('changed')} changed, "
        f"{report.count('extra')} with extra events, {report.duplicates} duplicate message(s)"
        + ("" if report.ok else f" -> {gaps} gap(s)")
    )
    data = {
        "topic": report.topic,
        "ok": report.ok,
        "messages": report.messages,
        "checked": report.checked,
        "upTo": report.up_to,
        "unpublished": report.unpublished,
        "duplicates": report.duplicates,
        "findings": [
            {
                "aggregateId": str(f.aggregate_id),
                "userId": f.user_id,
                "flowId": f.flow_id,
                "problem": f.problem,
                "versions": list(f.versions),
            }
            for f in report.findings
        ],
        "unreadable": [{"partition": p, "offset": o} for p, o in report.unreadable],
    }
    return _note("\n".join(lines), data, 0 if report.ok else DIFFERENCES_EXIT_CODE)
