"""The `flowstore` argument parser: every command's arguments."""

from __future__ import annotations

import argparse

from flowstore import __version__
from flowstore.adapters.cli.arguments import (
    PROJECTOR_ENV,
    PROJECTOR_MODES,
    handler_spec,
    json_file,
    json_object,
    logging_options,
    moment,
    positive,
    seconds,
    step_pair,
)
from flowstore.adapters.errors import DIFFERENCES_EXIT_CODE

__all__ = ["DESCRIPTION", "DIAGRAM_FORMATS", "build_parser"]

DESCRIPTION = (
    "The `flowstore` command line: manage flows and users' state in a store, and run the demo."
)
"""The first line of `flowstore --help`."""

DIAGRAM_FORMATS = ("mermaid", "dot", "svg", "png")
"""`diagram --format` choices (`flowstore.adapters.diagrams.OUTPUT_FORMATS`, not imported: it is slow)."""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser; each command's parser sets `command` to its key in `COMMANDS`."""
    url_help = "database URL (default: $FLOWSTORE_URL, else sqlite:///flowstore.db)"
    json_help = "print JSON (camelCase) instead of tables"
    parser = argparse.ArgumentParser(prog="flowstore", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"flowstore {__version__}")
    parser.add_argument("--url", help=url_help)
    parser.add_argument("--json", action="store_true", help=json_help)
    # The global options are also accepted after the command (`flowstore flows list --json`).
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", default=argparse.SUPPRESS, help=url_help)
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help=json_help)

    top = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)
    groups = {
        "flows": top.add_parser("flows", help="define and inspect flows").add_subparsers(
            metavar="ACTION", required=True
        ),
        "state": top.add_parser("state", help="read and override users' state").add_subparsers(
            metavar="ACTION", required=True
        ),
        "projections": top.add_parser(
            "projections", help="the read-model tables: status, rebuild, verify, repair, run"
        ).add_subparsers(metavar="ACTION", required=True),
    }

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        *group, leaf = name.split()
        subparsers = groups[group[0]] if group else top
        sub = subparsers.add_parser(leaf, parents=[common], help=help_text, description=help_text)
        sub.set_defaults(command=name)
        return sub

    def window(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--since", type=moment, help="window start, ISO 8601 (UTC if no zone)")
        sub.add_argument("--until", type=moment, help="window end, ISO 8601 (default: now)")

    def payload(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--payload", type=json_object, help="a JSON object")

    command("flows list", "list flows (latest versions)")
    sub = command("flows show", "show a flow's definition")
    sub.add_argument("flow")
    sub.add_argument("--version", type=positive, help="a past version (default: latest)")
    sub = command("flows create", "define a flow from a JSON or YAML file in the seed's shape")
    sub.add_argument("file", type=json_file, help="JSON or .yaml/.yml file, or - for stdin (JSON)")
    sub = command("flows update", "make a new version: the file's top-level keys replace the old")
    sub.add_argument("flow")
    sub.add_argument("file", type=json_file, help="JSON or YAML object file, or - for stdin (JSON)")
    command("flows delete", "delete a flow").add_argument("flow")
    sub = command("flows load", "create or version flows from a YAML/JSON file or folder")
    sub.add_argument("path", help="a .json/.yaml/.yml file, or a folder of them")
    sub = command("flows export", "print a flow's definition as seed JSON")
    sub.add_argument("flow")
    sub.add_argument("--version", type=positive, help="a past version (default: latest)")
    sub = command("flows migrate", "move a flow's active instances to another version")
    sub.add_argument("flow")
    sub.add_argument(
        "--to", dest="to_version", metavar="N", type=positive, required=True, help="target version"
    )
    sub.add_argument(
        "--map",
        type=step_pair,
        action="append",
        default=[],
        metavar="OLD=NEW",
        help="send users at step OLD to step NEW (repeatable)",
    )
    sub.add_argument("--dry-run", action="store_true", help="report only; write nothing")
    sub = command("diagram", "the flow as a state diagram (Mermaid, DOT, SVG or PNG)")
    sub.add_argument("flow")
    sub.add_argument(
        "--format", choices=DIAGRAM_FORMATS, default="mermaid", help="default: mermaid"
    )
    sub.add_argument("--stats", action="store_true", help="label with users now and transitions")
    sub.add_argument("--output", metavar="FILE", help="write to this file (needed for png)")
    sub.add_argument("--version", type=positive, help="a past version (default: latest)")

    for name, help_text in (
        ("state get", "where a user stands in a flow"),
        ("state clear", "forget where a user stands in a flow (history stays)"),
        ("history", "the commands on a user's flow, oldest first"),
    ):
        sub = command(name, help_text)
        sub.add_argument("user")
        sub.add_argument("flow")
    sub.add_argument("--limit", type=positive, help="at most N rows")
    sub.add_argument("--after", metavar="ROW_ID", help="rows after this row id (the next page)")
    sub.add_argument(
        "--kind", action="append", default=[], help="only this kind (repeatable: start, reset, ...)"
    )
    sub = command("instances", "a flow's instances: who is where, and for how long")
    sub.add_argument("flow")
    sub.add_argument("--step", help="only those at this step")
    sub.add_argument("--status", choices=("active", "completed"), default="active")
    sub.add_argument(
        "--idle-for", type=seconds, metavar="SECONDS", help="only those untouched this long"
    )
    sub.add_argument("--limit", type=positive, default=100, help="per page (default 100)")
    sub.add_argument("--cursor", help="the next page's cursor, from the previous page")
    sub = command("state set", "put a user at a step (administrative override)")
    sub.add_argument("user")
    sub.add_argument("flow")
    sub.add_argument("step")
    payload(sub)
    sub.add_argument("--service", help="service to record (default: the step's)")
    sub.add_argument("--not-ok", action="store_true", help="record the state as not ok")
    sub.add_argument("--previous", help="the step `back` returns to")
    sub.add_argument("--entity", help="the entity the run is about")
    sub.add_argument("--message", help="a message on the state")
    command("state list", "every flow a user has state in").add_argument("user")
    sub = command("state token", "a user's state as an OwlMeans state token, to hand over")
    sub.add_argument("user")
    sub.add_argument("flow")
    sub = command("state adopt", "take over a user's flow handed over as a state token")
    sub.add_argument("user")
    sub.add_argument("token")
    sub.add_argument("--sender", help="the service that sent it (default: the token's)")
    sub = command("transitions", "the transitions a user's current step offers")
    sub.add_argument("user")
    sub.add_argument("flow")
    which = sub.add_mutually_exclusive_group()
    which.add_argument(
        "--explicit", action="store_true", default=None, help="only those the user chooses"
    )
    which.add_argument(
        "--implicit", dest="explicit", action="store_false", help="only those `next` may take"
    )
    for name, help_text in (
        ("back", "return a user to the previous step (left by a reversible transition)"),
        ("next", "take the first transition of the user's step that is not explicit"),
    ):
        sub = command(name, help_text)
        sub.add_argument("user")
        sub.add_argument("flow")
        if name == "next":
            payload(sub)
    command(
        "erase-user", "erase a user for good: state, history and payloads (crypto-shredding)"
    ).add_argument("user")

    sub = command("transition", "take a transition from the user's current step")
    sub.add_argument("user")
    sub.add_argument("flow")
    sub.add_argument("transition")
    payload(sub)
    sub.add_argument("--not-ok", action="store_true", help="the step's work failed (ok=false)")
    sub.add_argument("--message", help="a message recorded with the transition")
    sub = command("reset", "start a user's run again")
    sub.add_argument("user")
    sub.add_argument("flow")
    sub.add_argument("--step", help="where to start (default: the initial step)")
    sub.add_argument("--service", help="the run's target service")
    sub.add_argument("--entity", help="the entity the run is about")
    sub = command("stats", "usage and performance statistics")
    sub.add_argument("--flow", help="one flow (default: all)")
    window(sub)
    command("purge", "expire instances idle past their flow's ttl")
    sub = command("demo", "drive simulated users through the README's onboarding flow")
    sub.add_argument("--users", type=positive, default=300, help="how many (default: 300)")
    sub.add_argument("--seed", type=int, default=7, help="random seed (default: 7)")
    sub = command("funnel", "per-step funnel of a flow")
    sub.add_argument("flow")
    window(sub)
    command("projections status", "how far the tables are behind the log; unreadable events")
    sub = command(
        "quarantine", "move an unreadable event (see projections status) out of the log, audited"
    )
    sub.add_argument("position", type=positive, help="the event's position in the log")
    sub.add_argument("--reason", required=True, help="why (kept in the audit record)")
    command("projections rebuild", "replay the log into fresh tables and swap them in")
    command(
        "projections migrate",
        "build this version's table layout beside the old tables (which keep serving), then swap",
    )
    command(
        "projections verify",
        f"compare the tables with the log; exit {DIFFERENCES_EXIT_CODE} on any difference",
    )
    sub = command("projections repair", "rewrite the rows that differ from the log")
    sub.add_argument("--user", help="only this user's rows")
    sub.add_argument("--flow", help="only this flow's rows")
    sub = command("projections run", "follow the log and keep the tables current")
    logging_options(sub)
    sub.add_argument("--interval", type=float, default=0.5, help="poll interval in seconds")
    sub.add_argument("--batch", type=positive, default=1000, help="events per transaction")
    sub = command("follow", "a durable follower: call a handler once per event, until stopped")
    sub.add_argument("name", help="the follower's name (its position is kept under it)")
    sub.add_argument(
        "--handler",
        required=True,
        type=handler_spec,
        metavar="MODULE:FUNCTION",
        help="called as function(event, connection); its writes commit with the position",
    )
    sub.add_argument("--once", action="store_true", help="stop when caught up")
    sub.add_argument("--interval", type=float, default=0.2, help="poll interval in seconds")
    sub = command("serve", "serve the HTTP and WebSocket API (token settings: FLOWSTORE_JWT_*)")
    sub.add_argument("--host", default="127.0.0.1", help="interface (default: 127.0.0.1)")
    sub.add_argument("--port", type=positive, default=8000, help="TCP port (default: 8000)")
    sub.add_argument(
        "--projector",
        choices=PROJECTOR_MODES,
        default=None,
        help="live: this server keeps the tables current; off: a worker does "
        f"(default: ${PROJECTOR_ENV}, else live)",
    )
    logging_options(sub)
    sub = command("worker", "run projections, expiry and the publisher, one leader per job")
    sub.add_argument("--interval", type=float, default=0.5, help="seconds between catch-ups")
    sub.add_argument("--batch", type=positive, default=1000, help="events per transaction")
    sub.add_argument(
        "--expire-every", type=float, default=60.0, help="seconds between expiry rounds (0: off)"
    )
    sub.add_argument("--bootstrap", help="Kafka brokers (default: $FLOWSTORE_KAFKA_BOOTSTRAP)")
    sub.add_argument("--topic", help="default: $FLOWSTORE_KAFKA_TOPIC, else flowstore.events")
    sub.add_argument("--metrics-port", type=positive, help="serve Prometheus metrics on this port")
    sub.add_argument("--metrics-host", default="127.0.0.1", help="default: 127.0.0.1")
    logging_options(sub)

    def kafka(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--bootstrap", help="brokers (default: $FLOWSTORE_KAFKA_BOOTSTRAP)")
        sub.add_argument("--topic", help="default: $FLOWSTORE_KAFKA_TOPIC, else flowstore.events")

    sub = command("publish", "send every event to a Kafka topic, at least once, until stopped")
    kafka(sub)
    sub.add_argument("--once", action="store_true", help="stop when caught up")
    sub.add_argument("--batch", type=positive, default=500, help="events per flush")
    sub.add_argument("--interval", type=float, default=0.2, help="poll interval in seconds")
    sub.add_argument("--partitions", type=positive, default=6, help="for a new topic")
    sub.add_argument("--replication-factor", type=positive, default=1, help="for a new topic")
    sub.add_argument("--report-every", type=float, default=5.0, help="seconds between lines")
    logging_options(sub)
    sub = command("restore", "rebuild this empty store (--url) from a Kafka topic")
    sub.add_argument("--from-kafka", action="store_true", required=True, help="the source")
    kafka(sub)
    sub = command(
        "audit",
        f"compare a Kafka topic with the log; exit {DIFFERENCES_EXIT_CODE} on any gap",
    )
    kafka(sub)
    sub.add_argument("--up-to", type=int, help="last event due (default: publisher position)")
    return parser
