"""The `flowstore` command line: manage flows and users' state in a store, and run the demo.

    flowstore [--url URL] [--json] COMMAND ...

`--url` defaults to $FLOWSTORE_URL, else the embedded `sqlite:///flowstore.db`. Output is rich
tables for people; with `--json` stdout carries nothing but JSON (camelCase, like the HTTP API).
A flowstore error prints `error[CODE]: message` on stderr and exits with the code from
`flowstore.adapters.errors.mapping_for`; command-line usage errors exit with 2.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

# Only the standard library at import time: `flowstore --help` and a usage error must not pay for
# eventsourcing, SQLAlchemy, pydantic or rich (about 0.5 s cold). Each handler imports what it uses;
# the modules below hold to the same rule.
from flowstore.adapters.cli import admin, flows, kafka, projections, running, users
from flowstore.adapters.cli.arguments import PROJECTOR_ENV, PROJECTOR_MODES
from flowstore.adapters.cli.output import Handler, Listing, Note, Output
from flowstore.adapters.cli.parser import DIAGRAM_FORMATS, build_parser
from flowstore.adapters.errors import mapping_for
from flowstore.adapters.logs import configure_logging
from flowstore.errors import FlowError, InvalidArgumentError
from flowstore.storage import StorageConfigError, parse_url, resolve_url

__all__ = [
    "COMMANDS",
    "DIAGRAM_FORMATS",
    "READ_ONLY_COMMANDS",
    "Listing",
    "Note",
    "Output",
    "build_parser",
    "main",
]

READ_ONLY_COMMANDS = frozenset(
    {
        "flows list",
        "flows show",
        "flows export",
        "diagram",
        "state get",
        "state list",
        "state token",
        "transitions",
        "history",
        "instances",
        "stats",
        "funnel",
        "projections status",
        "projections verify",
        "audit",
    }
)
"""Commands that only read: on a SQLite URL naming no file they fail rather than create one."""

COMMANDS: dict[str, Handler] = {
    "flows list": flows.flows_list,
    "flows show": flows.flows_show,
    "flows create": flows.flows_create,
    "flows update": flows.flows_update,
    "flows delete": flows.flows_delete,
    "flows load": flows.flows_load,
    "flows export": flows.flows_export,
    "flows migrate": flows.flows_migrate,
    "diagram": flows.diagram,
    "state get": users.state_get,
    "state set": users.state_set,
    "state clear": users.state_clear,
    "state list": users.state_list,
    "state token": users.state_token,
    "state adopt": users.state_adopt,
    "erase-user": admin.erase_user,
    "transition": users.transition,
    "transitions": users.transitions,
    "back": users.back,
    "next": users.next_step,
    "reset": users.reset,
    "history": users.history,
    "instances": users.instances,
    "stats": admin.stats,
    "purge": admin.purge,
    "demo": admin.demo,
    "funnel": admin.funnel,
    "projections status": projections.projections_status,
    "projections rebuild": projections.projections_rebuild,
    "projections migrate": projections.projections_migrate,
    "projections verify": projections.projections_verify,
    "projections repair": projections.projections_repair,
    "projections run": projections.projections_run,
    "follow": running.follow,
    "quarantine": admin.quarantine,
    "serve": running.serve,
    "worker": running.worker,
    "publish": kafka.publish,
    "restore": kafka.restore,
    "audit": kafka.audit,
}
"""The dispatch table: command name (as typed) -> handler."""


def _live_projections(args: argparse.Namespace) -> bool:
    """Whether this command's store keeps its tables current in a background thread."""
    if args.command in ("projections run", "projections migrate", "worker", "follow"):
        return False  # the worker moves the tables; it must not do a whole catch-up on opening
    if args.command == "serve":
        mode = args.projector or os.environ.get(PROJECTOR_ENV) or "live"
        if mode not in PROJECTOR_MODES:
            raise InvalidArgumentError(PROJECTOR_ENV, mode, f"one of {', '.join(PROJECTOR_MODES)}")
        return mode == "live"
    return True


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the exit code (the console script exits with it)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error argparse has already reported
        return exc.code if isinstance(exc.code, int) else 2
    out = Output(args.json)
    try:
        if args.command in READ_ONLY_COMMANDS:
            _refuse_missing_database(args.url, args.command)
        from flowstore.store import FlowStore

        live = _live_projections(args)
        if hasattr(args, "log_level"):
            configure_logging(args.log_level, args.log_format)
        # Only the long-running server publishes to Kafka from $FLOWSTORE_KAFKA_BOOTSTRAP; a
        # one-shot command must not start (and drain) a publisher on every call.
        publish = None if args.command == "serve" else False
        with FlowStore(args.url, live_projections=live, kafka=publish) as store:
            result = COMMANDS[args.command](store, args, out)
            out.show(result)
            if isinstance(result, Note):
                return result.exit_code
    except FlowError as err:
        out.error(err)
        return mapping_for(err).exit_code
    except KeyboardInterrupt:
        return 130
    return 0


def _refuse_missing_database(url: str | None, command: str) -> None:
    """A read-only command on a SQLite file that does not exist: an error, not a new empty database."""
    config = parse_url(resolve_url(url))
    path = config.env.get("SQLITE_DBNAME")
    if config.backend == "sqlite" and path is not None and not Path(path).exists():
        raise StorageConfigError(
            f"No database at {path!r}: `{command}` only reads, so it does not create one "
            "(check --url or $FLOWSTORE_URL)",
            url=config.display,
        )
