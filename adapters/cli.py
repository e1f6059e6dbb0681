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
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

from flowstore import __version__
from flowstore.adapters.errors import DIFFERENCES_EXIT_CODE, mapping_for
from flowstore.adapters.logs import LOG_FORMATS, LOG_LEVELS, configure_logging
from flowstore.errors import FlowError, InvalidArgumentError
from flowstore.storage import StorageConfigError, parse_url, resolve_url

# Only the standard library at import time: `flowstore --help` and a usage error must not pay for
# eventsourcing, SQLAlchemy, pydantic or rich (about 0.5 s cold). Each handler imports what it uses.
if TYPE_CHECKING:
    from rich.console import Console, RenderableType

    from flowstore import FlowStore
    from flowstore.adapters.render import Model
    from flowstore.projections.sql import Difference

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


Result: TypeAlias = "Model | Listing | Note | None"

_PIPE_WIDTH = 120

DIAGRAM_FORMATS = ("mermaid", "dot", "svg", "png")
"""`diagram --format` choices (`flowstore.adapters.diagrams.OUTPUT_FORMATS`, not imported: it is slow)."""

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


class Output:
    """The one place results are printed: as rich tables, or as JSON with `--json`."""

    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json
        # With --json, stdout is for JSON only: anything for people (the demo) goes to stderr.
        # Piped output (logs, CI) gets 120 columns rather than rich's 80 unless $COLUMNS says.
        self._console: Console | None = None

    @property
    def console(self) -> Console:
        """The rich console for people (stderr under `--json`), made on first use."""
        if self._console is None:
            try:
                from rich.console import Console
            except ImportError as missing:  # the library installs without the command's extras
                raise SystemExit(
                    f"flowstore: the command line needs the cli extra ({missing.name} is "
                    "missing): pip install 'flowstore-es[cli]'"
                ) from None

            stream = sys.stderr if self.as_json else sys.stdout
            width = None if stream.isatty() or "COLUMNS" in os.environ else _PIPE_WIDTH
            self._console = Console(stderr=self.as_json, width=width)
        return self._console

    def show(self, result: Result) -> None:
        """Print a command's result (nothing for None)."""
        if result is None:
            return
        if self.as_json:
            import orjson

            sys.stdout.write(orjson.dumps(self._data(result)).decode() + "\n")
        else:
            console = self.console  # first: it says which extra is missing, if one is
            console.print(self._view(result))

    def error(self, err: FlowError) -> None:
        """Report a flowstore error: a JSON object on stdout with `--json`, else a line on stderr."""
        if self.as_json:
            import orjson

            # default=str: details may hold values without a JSON form (a path, a datetime).
            data = orjson.dumps(err.to_dict(), default=str)
            sys.stdout.write(data.decode() + "\n")
        else:
            print(f"error[{err.code}]: {' '.join(err.message.split())}", file=sys.stderr)

    @staticmethod
    def _data(result: Model | Listing | Note) -> Any:
        from flowstore.adapters.render import record

        if isinstance(result, Listing):
            return [record(item) for item in result.items]
        if isinstance(result, Note):
            return result.data
        return record(result)

    @staticmethod
    def _view(result: Model | Listing | Note) -> RenderableType:
        from rich.markup import escape

        from flowstore.adapters.render import model_view, table

        if isinstance(result, Listing):
            return table(result.items, result.fields, title=result.title)
        if isinstance(result, Note):
            return escape(result.text)  # row keys in brackets are data, not rich markup
        return model_view(result)


# Commands: one function each, (store, args, output) -> what to show.

Handler: TypeAlias = "Callable[[FlowStore, argparse.Namespace, Output], Result]"

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


def flows_load(store: FlowStore, args: argparse.Namespace, out: Output) -> Result:
    """`flows load FILE_OR_DIR`: create each flow that is new, version each that changed."""
    from flowstore.adapters.providers import load_flows, read_definitions
    from flowstore.errors import InvalidArgumentError

    try:
        definitions = read_definitions(args.path)
    except OSError as exc:
        raise InvalidArgumentError("path", args.path, exc.strerror or str(exc)) from None
    from flowstore.definitions import flow_warnings

    loaded = load_flows(store, definitions)
    lines = [f"{item.action} {item.flow} (version {item.version})" for item in loaded]
    # Legal but likely mistakes (unreachable steps, no reachable terminal step): loaded, and said.
    warnings = [(d.flow, w) for d in definitions for w in flow_warnings(d)]
    lines += [f"warning: flow {flow}: {text}" for flow, text in warnings]
    data = {
        "flows": [{"flow": i.flow, "action": i.action, "version": i.version} for i in loaded],
        "warnings": [{"flow": flow, "warning": text} for flow, text in warnings],
    }
    return Note("\n".join(lines) or f"No flow definitions in {args.path}", data)


def flows_export(store: FlowStore, args: argparse.Namespace, out: Output) -> Result:
    """`flows export FLOW [--version N]`: the definition as seed JSON, ready for `flows load`."""
    import orjson

    seed = store.get_flow(args.flow, args.version).to_seed()
    seed.pop("version", None)
    # JSON with or without --json: the output is meant for files and other tools.
    sys.stdout.write(orjson.dumps(seed, option=orjson.OPT_INDENT_2).decode() + "\n")
    return None


def flows_migrate(store: FlowStore, args: argparse.Namespace, out: Output) -> Result:
    """`flows migrate FLOW --to N [--map OLD=NEW ...] [--dry-run]`: move active instances."""
    report = store.migrate_flows(args.flow, args.to_version, dict(args.map), args.dry_run)
    verb = "would migrate" if report.dry_run else "migrated"
    lines = [
        f"{verb} {m.user_id}: {m.from_step} (v{m.from_version}) -> {m.to_step} (v{m.to_version})"
        for m in report.migrated
    ]
    lines += [f"left {m.user_id} at {m.from_step}: {m.reason}" for m in report.unmappable]
    lines.append(
        f"{len(report.migrated)} {verb}, {len(report.unmappable)} unmappable, "
        f"{report.skipped} skipped" + (" (dry run: nothing written)" if report.dry_run else "")
    )
    return Note("\n".join(lines), report.to_dict())


def diagram(store: FlowStore, args: argparse.Namespace, out: Output) -> Result:
    """`diagram FLOW [--format F] [--stats] [--output FILE]`: the flow as a state diagram."""
    from flowstore.adapters.diagrams import diagram_bytes
    from flowstore.errors import InvalidArgumentError

    if args.format == "png" and args.output is None:
        raise InvalidArgumentError("output", None, "a png diagram needs --output FILE")
    data = diagram_bytes(store, args.flow, args.format, stats=args.stats, version=args.version)
    info = {"flow": args.flow, "format": args.format}
    if args.output is not None:
        Path(args.output).write_bytes(data)
        return Note(f"Wrote the {args.format} diagram of {args.flow} to {args.output}", info)
    if out.as_json:
        return Note("", {**info, "diagram": data.decode()})
    sys.stdout.write(data.decode())  # as it is: rich would wrap and restyle the diagram text
    return None


def state_get(store: FlowStore, args: argparse.Namespace, out: Output) -> Result:
    """`state get USER FLOW`: where the user stands (FLOW_STATE_NOT_FOUND if nowhere)."""
    from flowstore.errors import FlowStateNotFoundError

    state = store.get_flow_state(args.user, args.flow)
    if state is None:
        store.get_flow(args.flow)  # an unknown flow is FLOW_NOT_FOUND rather than no state
        raise FlowStateNotFoundError(args.user, args.flow)
    return state


def state_set(store: FlowStore, args: argparse.Namespace, out: Output) -> Result:
    """`state set USER FLOW STEP ...`: administrative override of the user's step."""
    from flowstore.models import FlowState

    state = FlowState(
        flow=args.flow,
        step=args.step,
        service=args.service,
        ok=not args.not_ok,
        payload=args.payload,
        previous=args.previous,
        entity_id=args.entity,
        message=args.message,
    )
    return store.set_flow_state(args.user, state)


def state_token(store: FlowStore, args: argparse.Namespace, out: Output) -> Result:
    """`state token USER FLOW`: the user's state as an OwlMeans state token (to hand over)."""
    token = store.state_token(args.user, args.flow)
    return Note(token, {"userId": args.user, "flow": args.flow, "token": token})


def state_adopt(store: FlowStore, args: argparse.Namespace, out: Output) -> Result:
    """`state adopt USER TOKEN [--sender SERVICE]`: take over a flow handed over as a token."""
    return store.adopt_state_token(args.user, args.token, sender=args.sender)


def transitions(store: FlowStore, args: argparse.Namespace, out: Output) -> Result:
    """`transitions USER FLOW [--explicit | --implicit]`: what the user's current step offers."""
    offered = store.get_available_transitions(args.user, args.flow, explicit=args.explicit)
    fields = ("transition", "step", "explicit", "reversible")
    return Listing(offered, fields, f"Transitions offered to {args.user} in {args.flow}")


def back(store: FlowStore, args: argparse.Namespace, out: Output) -> Result:
    """`back USER FLOW`: return the user to the previous step."""
    return store.go_back(args.user, args.flow)


def next_step(store: FlowStore, args: argparse.Namespace, out: Output) -> Result:
    """`next USER FLOW [--payload JSON]`: take the first transition that is not explicit."""
    return store.advance(args.user, args.flow, args.payload)


def state_clear(store: FlowStore, args: argparse.Namespace, out: Output) -> Result:
    """`state clear USER FLOW`: forget where the user stands (the history stays)."""
    store.clear_flow_state(args.user, args.flow)
    text = f"Cleared the state of {args.user} in {args.flow}"
    return Note(text, {"userId": args.user, "flow": args.flow, "cleared": True})


def erase_user(store: FlowStore, args: argparse.Namespace, out: Output) -> Result:
    """`erase-user USER`: crypto-shred everything the store knows about the user."""
    erased = store.erase_user(args.user)
    text = f"Erased {args.user}: {erased} flow instance(s); their key is deleted"
    return Note(text, {"userId": args.user, "erasedInstances": erased})


def state_list(store: FlowStore, args: argparse.Namespace, out: Output) -> Result:
    """`state list USER`: every flow the user has state in."""
    return Listing(store.get_user_flows(args.user), _STATE_FIELDS, f"Flows of {args.user}")


def transition(store: FlowStore, args: argparse.Namespace, out: Output) -> Result:
    """`transition USER FLOW TRANSITION [--payload JSON] [--not-ok] [--message TEXT]`."""
    return store.execute_transition(
        args.user,
        args.flow,
        args.transition,
        args.payload,
        ok=not args.not_ok,
        message=args.message,
    )


def reset(store: FlowStore, args: argparse.Namespace, out: Output) -> Result:
    """`reset USER FLOW [--step STEP] [--service S] [--entity ID]`: start the user's run again."""
    return store.reset_flow(
        args.user, args.flow, args.step, service=args.service, entity_id=args.entity
    )


def history(store: FlowStore, args: argparse.Namespace, out: Output) -> Result:
    """`history USER FLOW`: every command on the user's flow, oldest first."""
    from flowstore.adapters.render import HISTORY_FIELDS

    rows = store.get_flow_history(
        args.user, args.flow, limit=args.limit, after=args.after, kinds=args.kind or None
    )
    return Listing(rows, HISTORY_FIELDS, f"History of {args.user} in {args.flow}")


def instances(store: FlowStore, args: argparse.Namespace, out: Output) -> Result:
    """`instances FLOW [--step S] [--status S] [--idle-for SECONDS] [--limit N] [--cursor C]`."""
    page = store.list_instances(
        args.flow,
        step=args.step,
        status=args.status,
        idle_for=args.idle_for,
        limit=args.limit,
        cursor=args.cursor,
    )
    if out.as_json:
        return Note("", page.to_dict())
    out.show(Listing(page.instances, ("user_id", *_STATE_FIELDS), f"Instances of {args.flow}"))
    more = f"next page: --cursor {page.next_cursor}" if page.next_cursor else "last page"
    return Note(f"{len(page.instances)} instance(s); {more}", {})


def stats(store: FlowStore, args: argparse.Namespace, out: Output) -> Result:
    """`stats [--flow FLOW]`: usage and performance of one flow or all."""
    return store.get_flow_statistics(args.flow, since=args.since, until=args.until)


def purge(store: FlowStore, args: argparse.Namespace, out: Output) -> Result:
    """`purge`: expire instances idle past their flow's ttl."""
    purged = store.purge_expired_flows()
    return Note(f"Purged {purged} expired flow instance(s)", {"purged": purged})


def demo(store: FlowStore, args: argparse.Namespace, out: Output) -> Result:
    """`demo [--users N] [--seed N]`: the onboarding flow driven by simulated users."""
    from flowstore.adapters.demo import DEMO_FLOW, run_demo

    run_demo(store, users=args.users, seed=args.seed, console=out.console)
    # People have seen the report; with --json, stdout gets the flow's statistics.
    return store.get_flow_statistics(DEMO_FLOW) if out.as_json else None


def funnel(store: FlowStore, args: argparse.Namespace, out: Output) -> Result:
    """`funnel FLOW`: per step, how many entered, moved on, dropped, and are there now."""
    steps = store.get_flow_funnel(args.flow, since=args.since, until=args.until)
    return Listing(
        steps, ("step", "entered", "moved_on", "dropped", "current"), f"Funnel of {args.flow}"
    )


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


def quarantine(store: FlowStore, args: argparse.Namespace, out: Output) -> Result:
    """`quarantine POSITION --reason TEXT`: move an unreadable event out of the log, audited."""
    record = store.quarantine_event(args.position, args.reason)
    data = {
        "position": record["position"],
        "aggregateId": record["originator_id"],
        "version": record["originator_version"],
        "topic": record["topic"],
        "reason": record["reason"],
        "quarantinedAt": record["quarantined_at"].isoformat(),
    }
    return Note(
        f"event {args.position} moved to flowstore_quarantine ({record['originator_id']} "
        f"v{record['originator_version']})",
        data,
    )


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
    import signal
    import threading

    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    out.console.print(f"following the log (every {args.interval}s); stop with Ctrl-C or SIGTERM")
    # Elected like `flowstore worker`'s projections job (the same lock): one runner leads.
    from flowstore.adapters.worker import WorkerSettings, run_worker

    settings = WorkerSettings(interval=args.interval, batch=args.batch, jobs=("projections",))
    run_worker(store, stop, settings)
    position = store.projection_position()
    return Note(f"stopped at event {position}", {"position": position})


def worker(store: FlowStore, args: argparse.Namespace, out: Output) -> Result:
    """`worker`: projections, expiry and the Kafka publisher, each led by one worker of a fleet."""
    import signal
    import threading

    from flowstore.adapters.worker import WorkerSettings, run_worker

    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    bootstrap = args.bootstrap or os.environ.get("FLOWSTORE_KAFKA_BOOTSTRAP", "")
    settings = WorkerSettings(
        interval=args.interval,
        batch=args.batch,
        expire_every=args.expire_every,
        bootstrap=bootstrap,
        topic=args.topic,
    )
    on_change: Callable[[str, bool], None] | None = None
    on_expired: Callable[[int], None] | None = None
    if args.metrics_port:
        try:
            from prometheus_client import start_http_server

            from flowstore.adapters.metrics import FleetMetrics
        except ImportError as exc:
            hint = "--metrics-port needs the metrics extra: pip install 'flowstore-es[metrics]'"
            raise SystemExit(f"{hint} ({exc})") from None
        metrics = FleetMetrics(store)
        start_http_server(args.metrics_port, addr=args.metrics_host, registry=metrics.registry)

        def on_change(job: str, leading: bool) -> None:
            metrics.leader.labels(job).set(1 if leading else 0)

        on_expired = metrics.expired.inc
    run_worker(store, stop, settings, on_change=on_change, on_expired=on_expired)
    position = store.projection_position()
    return Note(f"stopped; tables at event {position}", {"position": position})


def _handler_spec(text: str) -> str:
    module_name, colon, attribute = text.partition(":")
    names = [*module_name.split("."), attribute]
    if not colon or not all(name.isidentifier() for name in names):
        raise argparse.ArgumentTypeError(f"must be module:function, not {text!r}")
    return text


def _handler(spec: str) -> Any:
    """The function `module:function` names, imported (from the working directory too)."""
    import importlib

    from flowstore.errors import InvalidArgumentError

    module_name, _, attribute = spec.partition(":")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # as uvicorn does: the app's own modules
    try:
        handler = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as exc:
        raise InvalidArgumentError("--handler", spec, f"cannot be imported ({exc})") from None
    if not callable(handler):
        raise InvalidArgumentError("--handler", spec, "is not callable")
    return handler


def follow(store: FlowStore, args: argparse.Namespace, out: Output) -> Result:
    """`follow NAME --handler module:function`: a durable follower, until SIGTERM/SIGINT."""
    import asyncio
    import inspect
    import signal

    handler = _handler(args.handler)
    loop: asyncio.AbstractEventLoop | None = None
    if inspect.iscoroutinefunction(handler):
        # An `async def` handler runs to completion inside the event's transaction, on a loop
        # of this worker's own.
        loop, coroutine_handler = asyncio.new_event_loop(), handler

        def handler(event: Any, connection: Any) -> object:
            assert loop is not None
            return loop.run_until_complete(coroutine_handler(event, connection))

    follower = store.follow(args.name, handler, interval=args.interval, start=False)
    try:
        if args.once:
            applied = follower.catch_up()
        else:
            for signum in (signal.SIGTERM, signal.SIGINT):
                signal.signal(signum, lambda *_: follower.halt())
            out.console.print(
                f"following the log as {args.name!r} (standby while another process does); "
                "stop with Ctrl-C or SIGTERM"
            )
            follower.run()
            applied = None
        position = follower.position()
    finally:
        follower.stop()
        if loop is not None:
            loop.close()
    details: dict[str, Any] = {"name": args.name, "position": position}
    if applied is not None:
        details["applied"] = applied
    return Note(f"{args.name} stopped at event {position}", details)


def serve(store: FlowStore, args: argparse.Namespace, out: Output) -> Result:
    """`serve [--host H] [--port P] [--projector live|off]`: the HTTP and WebSocket API."""
    try:
        # Imported here, not at the top: the rest of the CLI works without the `http` extra.
        from flowstore.adapters.http import serve as serve_http
    except ImportError as exc:
        hint = "flowstore serve needs the http extra: pip install 'flowstore-es[http]'"
        raise SystemExit(f"{hint} ({exc})") from None
    serve_http(store, host=args.host, port=args.port, log_level=args.log_level)
    return None


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


COMMANDS: dict[str, Handler] = {
    "flows list": flows_list,
    "flows show": flows_show,
    "flows create": flows_create,
    "flows update": flows_update,
    "flows delete": flows_delete,
    "flows load": flows_load,
    "flows export": flows_export,
    "flows migrate": flows_migrate,
    "diagram": diagram,
    "state get": state_get,
    "state set": state_set,
    "state clear": state_clear,
    "state list": state_list,
    "state token": state_token,
    "state adopt": state_adopt,
    "erase-user": erase_user,
    "transition": transition,
    "transitions": transitions,
    "back": back,
    "next": next_step,
    "reset": reset,
    "history": history,
    "instances": instances,
    "stats": stats,
    "purge": purge,
    "demo": demo,
    "funnel": funnel,
    "projections status": projections_status,
    "projections rebuild": projections_rebuild,
    "projections migrate": projections_migrate,
    "projections verify": projections_verify,
    "projections repair": projections_repair,
    "projections run": projections_run,
    "follow": follow,
    "quarantine": quarantine,
    "serve": serve,
    "worker": worker,
    "publish": publish,
    "restore": restore,
    "audit": audit,
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
    import orjson

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
    if path.endswith((".yaml", ".yml")):
        return _yaml_object(text)
    return _json_object(text)


def _yaml_object(text: str) -> dict[str, Any]:
    try:
        import yaml
    except ImportError:
        hint = "YAML needs the providers extra: pip install 'flowstore-es[providers]'"
        raise argparse.ArgumentTypeError(hint) from None
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise argparse.ArgumentTypeError(f"not valid YAML ({' '.join(str(exc).split())})") from None
    if not isinstance(value, dict):
        kind = _JSON_KINDS.get(type(value), "null")
        raise argparse.ArgumentTypeError(f"must be a YAML mapping, not {kind}")
    return value


def _step_pair(text: str) -> tuple[str, str]:
    old, equals, new = text.partition("=")
    if not equals or not old or not new:
        raise argparse.ArgumentTypeError(f"must be OLD=NEW (two step names), not {text!r}")
    return old, new


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number of seconds, not {text!r}")
    return value


def _moment(text: str) -> Any:
    from datetime import UTC, datetime

    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an ISO 8601 time, not {text!r}") from None
    # A command line has no other zone to mean: a time without one is UTC, like everything stored.
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, not {text!r}")
    return value


PROJECTOR_ENV = "FLOWSTORE_PROJECTOR"
"""`live` (the default) or `off`: whether `flowstore serve` keeps the tables current itself."""
PROJECTOR_MODES = ("live", "off")


def logging_options(sub: argparse.ArgumentParser) -> None:
    """--log-level and --log-format, for the commands that run until stopped."""
    sub.add_argument("--log-level", choices=LOG_LEVELS, default="info", help="default: info")
    sub.add_argument("--log-format", choices=LOG_FORMATS, default="text", help="default: text")


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


def build_parser() -> argparse.ArgumentParser:
    """The argument parser; each command's parser sets `command` to its key in `COMMANDS`."""
    url_help = "database URL (default: $FLOWSTORE_URL, else sqlite:///flowstore.db)"
    json_help = "print JSON (camelCase) instead of tables"
    parser = argparse.ArgumentParser(prog="flowstore", description=__doc__.split("\n")[0])
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
        sub.add_argument("--since", type=_moment, help="window start, ISO 8601 (UTC if no zone)")
        sub.add_argument("--until", type=_moment, help="window end, ISO 8601 (default: now)")

    def payload(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--payload", type=_json_object, help="a JSON object")

    command("flows list", "list flows (latest versions)")
    sub = command("flows show", "show a flow's definition")
    sub.add_argument("flow")
    sub.add_argument("--version", type=_positive, help="a past version (default: latest)")
    sub = command("flows create", "define a flow from a JSON or YAML file in the seed's shape")
    sub.add_argument("file", type=_json_file, help="JSON or .yaml/.yml file, or - for stdin (JSON)")
    sub = command("flows update", "make a new version: the file's top-level keys replace the old")
    sub.add_argument("flow")
    sub.add_argument(
        "file", type=_json_file, help="JSON or YAML object file, or - for stdin (JSON)"
    )
    command("flows delete", "delete a flow").add_argument("flow")
    sub = command("flows load", "create or version flows from a YAML/JSON file or folder")
    sub.add_argument("path", help="a .json/.yaml/.yml file, or a folder of them")
    sub = command("flows export", "print a flow's definition as seed JSON")
    sub.add_argument("flow")
    sub.add_argument("--version", type=_positive, help="a past version (default: latest)")
    sub = command("flows migrate", "move a flow's active instances to another version")
    sub.add_argument("flow")
    sub.add_argument(
        "--to", dest="to_version", metavar="N", type=_positive, required=True, help="target version"
    )
    sub.add_argument(
        "--map",
        type=_step_pair,
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
    sub.add_argument("--version", type=_positive, help="a past version (default: latest)")

    for name, help_text in (
        ("state get", "where a user stands in a flow"),
        ("state clear", "forget where a user stands in a flow (history stays)"),
        ("history", "the commands on a user's flow, oldest first"),
    ):
        sub = command(name, help_text)
        sub.add_argument("user")
        sub.add_argument("flow")
    sub.add_argument("--limit", type=_positive, help="at most N rows")
    sub.add_argument("--after", metavar="ROW_ID", help="rows after this row id (the next page)")
    sub.add_argument(
        "--kind", action="append", default=[], help="only this kind (repeatable: start, reset, ...)"
    )
    sub = command("instances", "a flow's instances: who is where, and for how long")
    sub.add_argument("flow")
    sub.add_argument("--step", help="only those at this step")
    sub.add_argument("--status", choices=("active", "completed"), default="active")
    sub.add_argument(
        "--idle-for", type=_seconds, metavar="SECONDS", help="only those untouched this long"
    )
    sub.add_argument("--limit", type=_positive, default=100, help="per page (default 100)")
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
    sub.add_argument("--users", type=_positive, default=300, help="how many (default: 300)")
    sub.add_argument("--seed", type=int, default=7, help="random seed (default: 7)")
    sub = command("funnel", "per-step funnel of a flow")
    sub.add_argument("flow")
    window(sub)
    command("projections status", "how far the tables are behind the log; unreadable events")
    sub = command(
        "quarantine", "move an unreadable event (see projections status) out of the log, audited"
    )
    sub.add_argument("position", type=_positive, help="the event's position in the log")
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
    sub.add_argument("--batch", type=_positive, default=1000, help="events per transaction")
    sub = command("follow", "a durable follower: call a handler once per event, until stopped")
    sub.add_argument("name", help="the follower's name (its position is kept under it)")
    sub.add_argument(
        "--handler",
        required=True,
        type=_handler_spec,
        metavar="MODULE:FUNCTION",
        help="called as function(event, connection); its writes commit with the position",
    )
    sub.add_argument("--once", action="store_true", help="stop when caught up")
    sub.add_argument("--interval", type=float, default=0.2, help="poll interval in seconds")
    sub = command("serve", "serve the HTTP and WebSocket API (token settings: FLOWSTORE_JWT_*)")
    sub.add_argument("--host", default="127.0.0.1", help="interface (default: 127.0.0.1)")
    sub.add_argument("--port", type=_positive, default=8000, help="TCP port (default: 8000)")
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
    sub.add_argument("--batch", type=_positive, default=1000, help="events per transaction")
    sub.add_argument(
        "--expire-every", type=float, default=60.0, help="seconds between expiry rounds (0: off)"
    )
    sub.add_argument("--bootstrap", help="Kafka brokers (default: $FLOWSTORE_KAFKA_BOOTSTRAP)")
    sub.add_argument("--topic", help="default: $FLOWSTORE_KAFKA_TOPIC, else flowstore.events")
    sub.add_argument("--metrics-port", type=_positive, help="serve Prometheus metrics on this port")
    sub.add_argument("--metrics-host", default="127.0.0.1", help="default: 127.0.0.1")
    logging_options(sub)

    def kafka(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--bootstrap", help="brokers (default: $FLOWSTORE_KAFKA_BOOTSTRAP)")
        sub.add_argument("--topic", help="default: $FLOWSTORE_KAFKA_TOPIC, else flowstore.events")

    sub = command("publish", "send every event to a Kafka topic, at least once, until stopped")
    kafka(sub)
    sub.add_argument("--once", action="store_true", help="stop when caught up")
    sub.add_argument("--batch", type=_positive, default=500, help="events per flush")
    sub.add_argument("--interval", type=float, default=0.2, help="poll interval in seconds")
    sub.add_argument("--partitions", type=_positive, default=6, help="for a new topic")
    sub.add_argument("--replication-factor", type=_positive, default=1, help="for a new topic")
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
        kafka = None if args.command == "serve" else False
        with FlowStore(args.url, live_projections=live, kafka=kafka) as store:
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


if __name__ == "__main__":
    raise SystemExit(main())
