"""Defining and inspecting flows: `flows list|show|create|update|delete|load|export|migrate`,
`diagram`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from flowstore.adapters.cli.output import Listing, Note, Output, Result

if TYPE_CHECKING:
    from flowstore import FlowStore

__all__ = [
    "diagram",
    "flows_create",
    "flows_delete",
    "flows_export",
    "flows_list",
    "flows_load",
    "flows_migrate",
    "flows_show",
    "flows_update",
]


_FLOW_FIELDS = ("flow", "version", "initial_step", "steps", "ttl")


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
