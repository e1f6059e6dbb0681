"""Administration and reports: `stats`, `funnel`, `purge`, `erase-user`, `quarantine`, `demo`."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from flowstore.adapters.cli.output import Listing, Note, Output, Result

if TYPE_CHECKING:
    from flowstore import FlowStore

__all__ = ["demo", "erase_user", "funnel", "purge", "quarantine", "stats"]


def erase_user(store: FlowStore, args: argparse.Namespace, out: Output) -> Result:
    """`erase-user USER`: crypto-shred everything the store knows about the user."""
    erased = store.erase_user(args.user)
    text = f"Erased {args.user}: {erased} flow instance(s); their key is deleted"
    return Note(text, {"userId": args.user, "erasedInstances": erased})


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
