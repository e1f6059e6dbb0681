"""The `flowstore` command line: manage flows and users' state in a store, and run the demo.

    flowstore [--url URL] [--json] COMMAND ...

`--url` defaults to $FLOWSTORE_URL, else the embedded `sqlite:///flowstore.db`. Output is rich
tables for people; with `--json` stdout carries nothing but JSON (camelCase, like the HTTP API).
A flowstore error prints `error[CODE]: message` on stderr and exits with the code from
`adapters.errors.mapping_for`; command-line usage errors exit with 2.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from rich.console import Console, RenderableType
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

from adapters.demo import DEMO_FLOW, run_demo
from adapters.errors import DIFFERENCES_EXIT_CODE, mapping_for
from adapters.render import HISTORY_FIELDS, Model, model_view, record, table
from flowstore import FlowError, FlowState, FlowStateNotFoundError, FlowStore
from projections.sql import Difference

__all__ = ["COMMANDS", "Listing", "Note", "Output", "build_parser", "main"]


# Output


@dataclass(frozen=True)
class Listing:
    """Models of one kind: a table with a row each for people, a JSON array for machines."""

    items: Sequence[Model]
    fields: tuple[str, ...]
    """The models' (snake_case) fields to show as columns."""
    title: str


@dataclass(frozen=True)
class Note:
    """The answer of a command that returns no model: a sentence for people, an object for JSON."""

    text: str
    data: dict[str, Any]
    exit_code: int = 0


Result = Model | Listing | Note | None

_PIPE_WIDTH = 120


class Output:
    """The one place results are printed: as rich tables, or as JSON with `--json`."""

    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json
        # With --json, stdout is for JSON only: anything for people (the demo) goes to stderr.
        # Piped output (logs, CI) gets 120 columns rather than rich's 80 unless $COLUMNS says.
        stream = sys.stderr if as_json else sys.stdout
        width = None if stream.isatty() or "COLUMNS" in os.environ else _PIPE_WIDTH
        self.console = Console(stderr=as_json, width=width)

    def show(self, result: Result) -> None:
        """Print a command's result (nothing for None)."""
        if result is None:
            return
        if self.as_json:
            sys.stdout.write(orjson.dumps(self._data(result)).decode() + "\n")
        else:
            self.console.print(self._view(result))

    @staticmethod
    def _data(result: Model | Listing | Note) -> Any:
        if isinstance(result, Listing):
            return [record(item) for item in result.items]
        if isinstance(result, Note):
            return result.data
        return record(result)

    @staticmethod
    def _view(result: Model | Listing | Note) -> RenderableType:
        if isinstance(result, Listing):
            return table(result.items, result.fields, title=result.title)
        if isinstance(result, Note):
            return escape(result.text)  # row keys in brackets are data, not rich markup
        return model_view(result)


# Commands: one function each, (store, args, output) -> what to show.

Handler = Callable[[FlowStore, argparse.Namespace, Output], Result]

_FLOW_FIELDS = ("flow", "version", "initial_step", "steps", "ttl")
_STATE_FIELDS = ("flow", "step", "status", "ok", "version", "definition_version", "updated_at")


def flows_list(store: FlowStore, args: argparse.Namespace, out: Output) -> Result:
    """`flows list`: the latest version of every flow."""
    return Listing(store.list_flows(), _FLOW_FIELDS, "Flows")


def flows_show(store: FlowStore, args: argparse.Namespace, out: Output) -> Result:
    """`flows show FLOW [--version N]`: a flow's definition."""
    return store.get_flow(args.flow, args.version)


def flows_create(store: FlowStore, args: argparse.Namespace, out: Output) -> Result:
    """`flows create FILE`: define a flow from a seed-shaped JSON file (`-` for stdin)."""
    return store.get_flow(store.create_flow(args.file))


def flows_update(store: FlowStore, args: argparse.Namespace, out: Output) -> Result:
    """`flows update FLOW FILE`: a new version with the file's top-level keys replaced."""
    return store.update_flow(args.flow, args.file)


def flows_delete(store: FlowStore, args: argparse.Namespace, out: Output) -> Result:
    """`flows delete FLOW`."""
    store.delete_flow(args.flow)
    return Note(f"Deleted flow {args.flow}", {"flow": args.flow, "deleted": True})


def state_get(store: FlowStore, args: argparse.Namespace, out: Output) -> Result:
    """`state get USER FLOW`: where the user stands (FLOW_STATE_NOT_FOUND if nowhere)."""
    state = store.get_flow_state(args.user, args.flow)
    if state is None:
        store.get_flow(args.flow)  # an unknown flow is FLOW_NOT_FOUND rather than no state
        raise FlowStateNotFoundError(args.user, args.flow)
    return state


def state_set(store: FlowStore, args: argparse.Namespace, out: Output) -> Result:
    """`state set USER FLOW STEP ...`: administrative override of the user's step."""
    state = FlowState(
        flow=args.flow,
        step=args.step,
        service=args.service,
        ok=not args.not_ok,
        payload=args.payload,
    )
    return store.set_flow_state(args.user, state)


def state_clear(store: FlowStore, args: argparse.Namespace, out: Output) -> Result:
    """`state clear USER FLOW`: forget where the user stands (the history stays)."""
    store.clear_flow_state(args.user, args.flow)
    text = f"Cleared the state of {args.user} in {args.flow}"
    return Note(text, {"userId": args.user, "flow": args.flow, "cleared": True})


def state_list(store: FlowStore, args: argparse.Namespace, out: Output) -> Result:
    """`state list USER`: every flow the user has state in."""
    return Listing(store.get_user_flows(args.user), _STATE_FIELDS, f"Flows of {args.user}")


def transition(store: FlowStore, args: argparse.Namespace, out: Output) -> Result:
    """`transition USER FLOW TRANSITION [--payload JSON]`."""
    return store.execute_transition(args.user, args.flow, args.transition, args.payload)


def reset(store: FlowStore, args: argparse.Namespace, out: Output) -> Result:
    """`reset USER FLOW [--step STEP]`: start the user's run again."""
    return store.reset_flow(args.user, args.flow, args.step)


def history(store: FlowStore, args: argparse.Namespace, out: Output) -> Result:
    """`history USER FLOW`: every command on the user's flow, oldest first."""
    rows = store.get_flow_history(args.user, args.flow)
    return Listing(rows, HISTORY_FIELDS, f"History of {args.user} in {args.flow}")


def stats(store: FlowStore, args: argparse.Namespace, out: Output) -> Result:
    """`stats [--flow FLOW]`: usage and performance of one flow or all."""
    return store.get_flow_statistics(args.flow)


def purge(store: FlowStore, args: argparse.Namespace, out: Output) -> Result:
    """`purge`: expire instances idle past their flow's ttl."""
    purged = store.purge_expired_flows()
    return Note(f"Purged {purged} expired flow instance(s)", {"purged": purged})


def demo(store: FlowStore, args: argparse.Namespace, out: Output) -> Result:
    """`demo [--users N] [--seed N]`: the onboarding flow driven by simulated users."""
    run_demo(store, users=args.users, seed=args.seed, console=out.console)
    # People have seen the report; with --json, stdout gets the flow's statistics.
    return store.get_flow_statistics(DEMO_FLOW) if out.as_json else None


def funnel(store: FlowStore, args: argparse.Namespace, out: Output) -> Result:
    """`funnel FLOW`: per step, how many entered, moved on, dropped, and are there now."""
    steps = store.get_flow_funnel(args.flow)
    return Listing(
        steps, ("step", "entered", "moved_on", "dropped", "current"), f"Funnel of {args.flow}"
    )


def projections_status(store: FlowStore, args: argparse.Namespace, out: Output) -> Result:
    """`projections status`: how far the tables are behind the log."""
    position, head = store.projection_position(), store.log_position()
    data = {"position": position, "logPosition": head, "lag": max(0, head - position)}
    return Note(f"tables at event {position} of {head} (lag {data['lag']})", data)


def projections_rebuild(store: FlowStore, args: argparse.Namespace, out: Output) -> Result:
    """`projections rebuild`: replay the whole log into fresh tables, then swap them in."""
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
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    out.console.print(f"following the log (every {args.interval}s); stop with Ctrl-C or SIGTERM")
    position = store.projection_position()
    while not stop.is_set():
        position = store.catch_up_projections(args.batch)
        stop.wait(args.interval)  # polling: SQLite cannot notify, and one code path is simpler
    return Note(f"stopped at event {position}", {"position": position})


COMMANDS: dict[str, Handler] = {
    "flows list": flows_list,
    "flows show": flows_show,
    "flows create": flows_create,
    "flows update": flows_update,
    "flows delete": flows_delete,
    "state get": state_get,
    "state set": state_set,
    "state clear": state_clear,
    "state list": state_list,
    "transition": transition,
    "reset": reset,
    "history": history,
    "stats": stats,
    "purge": purge,
    "demo": demo,
    "funnel": funnel,
    "projections status": projections_status,
    "projections rebuild": projections_rebuild,
    "projections verify": projections_verify,
    "projections repair": projections_repair,
    "projections run": projections_run,
}
"""The dispatch table: command name (as typed) -> handler."""


# Arguments

_JSON_KINDS = {
    list: "an array",
    str: "a string",
    int: "a number",
    float: "a number",
    bool: "a boolean",
}


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        kind = _JSON_KINDS.get(type(value), "null")
        raise argparse.ArgumentTypeError(f"must be a JSON object, not {kind}")
    return value


def _json_file(path: str) -> dict[str, Any]:
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"cannot read {path}: {exc.strerror}") from None
    return _json_object(text)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, not {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser; each command's parser sets `command` to its key in `COMMANDS`."""
    url_help = "database URL (default: $FLOWSTORE_URL, else sqlite:///flowstore.db)"
    json_help = "print JSON (camelCase) instead of tables"
    parser = argparse.ArgumentParser(prog="flowstore", description=__doc__.split("\n")[0])
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

    def payload(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--payload", type=_json_object, help="a JSON object")

    command("flows list", "list flows (latest versions)")
    sub = command("flows show", "show a flow's definition")
    sub.add_argument("flow")
    sub.add_argument("--version", type=_positive, help="a past version (default: latest)")
    sub = command("flows create", "define a flow from a JSON file in the seed's shape")
    sub.add_argument("file", type=_json_file, help="JSON file, or - for stdin")
    sub = command("flows update", "make a new version: the file's top-level keys replace the old")
    sub.add_argument("flow")
    sub.add_argument("file", type=_json_file, help="JSON object file, or - for stdin")
    command("flows delete", "delete a flow").add_argument("flow")

    for name, help_text in (
        ("state get", "where a user stands in a flow"),
        ("state clear", "forget where a user stands in a flow (history stays)"),
        ("history", "every command on a user's flow"),
    ):
        sub = command(name, help_text)
        sub.add_argument("user")
        sub.add_argument("flow")
    sub = command("state set", "put a user at a step (administrative override)")
    sub.add_argument("user")
    sub.add_argument("flow")
    sub.add_argument("step")
    payload(sub)
    sub.add_argument("--service", help="service to record (default: the step's)")
    sub.add_argument("--not-ok", action="store_true", help="record the state as not ok")
    command("state list", "every flow a user has state in").add_argument("user")

    sub = command("transition", "take a transition from the user's current step")
    sub.add_argument("user")
    sub.add_argument("flow")
    sub.add_argument("transition")
    payload(sub)
    sub = command("reset", "start a user's run again")
    sub.add_argument("user")
    sub.add_argument("flow")
    sub.add_argument("--step", help="where to start (default: the initial step)")
    command("stats", "usage and performance statistics").add_argument(
        "--flow", help="one flow (default: all)"
    )
    command("purge", "expire instances idle past their flow's ttl")
    sub = command("demo", "drive simulated users through the README's onboarding flow")
    sub.add_argument("--users", type=_positive, default=300, help="how many (default: 300)")
    sub.add_argument("--seed", type=int, default=7, help="random seed (default: 7)")
    command("funnel", "per-step funnel of a flow").add_argument("flow")
    command("projections status", "how far the tables are behind the log")
    command("projections rebuild", "replay the log into fresh tables and swap them in")
    command(
        "projections verify",
        f"compare the tables with the log; exit {DIFFERENCES_EXIT_CODE} on any difference",
    )
    sub = command("projections repair", "rewrite the rows that differ from the log")
    sub.add_argument("--user", help="only this user's rows")
    sub.add_argument("--flow", help="only this flow's rows")
    sub = command("projections run", "follow the log and keep the tables current")
    sub.add_argument("--interval", type=float, default=0.5, help="poll interval in seconds")
    sub.add_argument("--batch", type=_positive, default=1000, help="events per transaction")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the exit code (the console script exits with it)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error argparse has already reported
        return exc.code if isinstance(exc.code, int) else 2
    out = Output(args.json)
    try:
        # The worker is the one that moves the tables; it must not do a whole catch-up on opening.
        live = args.command != "projections run"
        with FlowStore(args.url, live_projections=live) as store:
            result = COMMANDS[args.command](store, args, out)
            out.show(result)
            if isinstance(result, Note):
                return result.exit_code
    except FlowError as err:
        print(f"error[{err.code}]: {' '.join(err.message.split())}", file=sys.stderr)
        return mapping_for(err).exit_code
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
