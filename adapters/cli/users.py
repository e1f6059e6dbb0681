"""Users' state in flows: `state ...`, `transition(s)`, `back`, `next`, `reset`, `history`, `instances`."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from flowstore.adapters.cli.output import Listing, Note, Output, Result

if TYPE_CHECKING:
    from flowstore import FlowStore

__all__ = [
    "STATE_FIELDS",
    "back",
    "history",
    "instances",
    "next_step",
    "reset",
    "state_adopt",
    "state_clear",
    "state_get",
    "state_list",
    "state_set",
    "state_token",
    "transition",
    "transitions",
]


STATE_FIELDS = ("flow", "step", "status", "ok", "version", "definition_version", "updated_at")
"""The columns a listing of states shows."""


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


def state_list(store: FlowStore, args: argparse.Namespace, out: Output) -> Result:
    """`state list USER`: every flow the user has state in."""
    return Listing(store.get_user_flows(args.user), STATE_FIELDS, f"Flows of {args.user}")


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
    out.show(Listing(page.instances, ("user_id", *STATE_FIELDS), f"Instances of {args.flow}"))
    more = f"next page: --cursor {page.next_cursor}" if page.next_cursor else "last page"
    return Note(f"{len(page.instances)} instance(s); {more}", {})
