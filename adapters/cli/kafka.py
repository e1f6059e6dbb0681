"""The Kafka commands `publish`, `restore` and `audit`: calls into `adapters/kafka/commands.py`."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from flowstore.adapters.cli.output import Note, Output, Result

if TYPE_CHECKING:
    from flowstore import FlowStore

__all__ = ["audit", "publish", "restore"]


def _kafka_commands() -> Any:
    try:
        # Imported here, not at the top: the rest of the CLI works without the `kafka` extra.
        from flowstore.adapters.kafka import commands
    except ImportError as exc:
        hint = "this command needs the kafka extra: pip install 'flowstore-es[kafka]'"
        raise SystemExit(f"{hint} ({exc})") from None
    return commands


def publish(store: FlowStore, args: argparse.Namespace, out: Output) -> Result:
    """`publish`: send every event to a Kafka topic (at least once) until SIGTERM/SIGINT."""
    return Note(*_kafka_commands().publish(store, args, out))


def restore(store: FlowStore, args: argparse.Namespace, out: Output) -> Result:
    """`restore --from-kafka`: rebuild this empty store from every event on a topic."""
    return Note(*_kafka_commands().restore(store, args, out))


def audit(store: FlowStore, args: argparse.Namespace, out: Output) -> Result:
    """`audit`: report events missing, duplicated or out of order on a topic."""
    return Note(*_kafka_commands().audit(store, args, out))
