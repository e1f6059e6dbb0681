"""`flowstore demo`: the README's onboarding flow, driven by simulated users.

Each simulated user follows a plan drawn from `random.Random(seed)`: most finish (through
`continue` + `save`, or through `skip`), some stall part-way, and some send a transition their
step does not offer (`complete` from `welcome`, a typo), which the store records and rejects.
Users' commands are interleaved as if they were online at the same time. Every run uses fresh user
ids, prefixed with the number of runs the flow had already seen (`r0-u001`, then `r300-u001`...),
so the demo can be run again on the same database.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from importlib.resources import files
from typing import Any

import orjson
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from flowstore import (
    FlowDefinition,
    FlowExistsError,
    FlowStatus,
    FlowStore,
    InvalidTransitionError,
    PayloadValidationError,
)
from flowstore.adapters.render import HISTORY_FIELDS, model_view, table

__all__ = ["DEMO_FLOW", "load_onboarding", "run_demo"]

DEMO_FLOW = "user-onboarding"
"""The id of the seed's onboarding flow."""

_PATHS = (("start", "continue", "save", "complete"), ("start", "skip", "complete"))
_SKIP_SHARE = 0.3  # of users take `skip` rather than `continue` + `save`
_STALL_SHARE = 0.15  # of users stop part-way
_MISTAKE_SHARE = 0.15  # of users send one transition their step does not offer
_SAMPLE = 10


@dataclass
class _User:
    user_id: str
    plan: list[tuple[str, dict[str, Any] | None]]
    sent: int = 0
    rejected: int = 0
    completed: bool = False


def load_onboarding(store: FlowStore) -> tuple[FlowDefinition, bool]:
    """Define the seed's onboarding flow, or reuse it if an earlier run did; True if created."""
    seed = orjson.loads(files("flowstore").joinpath("data/user-onboarding.json").read_bytes())
    try:
        flow_id = store.create_flow(seed)
    except FlowExistsError:
        return store.get_flow(seed["flow"]), False
    return store.get_flow(flow_id), True


def _typo(word: str, rng: random.Random) -> str:
    i = rng.randrange(len(word) - 1)
    return word[:i] + word[i + 1] + word[i] + word[i + 2 :]


def _plan(
    number: int, definition: FlowDefinition, rng: random.Random
) -> list[tuple[str, dict[str, Any] | None]]:
    """The transitions one user will send, with payloads, in order."""
    path = list(_PATHS[rng.random() < _SKIP_SHARE])
    if rng.random() < _STALL_SHARE:
        path = path[: rng.randrange(1, len(path))]
    if rng.random() < _MISTAKE_SHARE:
        at = rng.randrange(len(path) + 1)
        step = definition.initial_step
        for name in path[:at]:  # walk to the step the mistake is made from
            edge = definition.steps[step].transitions.get(name)
            step = edge.step if edge else step
        offered = definition.steps[step].transitions
        wrong = ["complete", "finish"] + ([_typo(path[at], rng)] if at < len(path) else [])
        path.insert(at, rng.choice([name for name in wrong if name not in offered]))
    payloads: dict[str, dict[str, Any]] = {
        "continue": {"displayName": f"User {number}"},
        "save": {"theme": rng.choice(["light", "dark"]), "newsletter": rng.random() < 0.5},
    }
    return [(name, payloads.get(name)) for name in path]


def _drive(store: FlowStore, people: list[_User], rng: random.Random, console: Console) -> int:
    """Send every user's plan, interleaving users at random; return how many commands were sent."""
    total = sum(len(user.plan) for user in people)
    waiting = [user for user in people if user.plan]
    columns = (
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console) as progress:
        task = progress.add_task(f"{len(people)} users", total=total)
        while waiting:
            i = rng.randrange(len(waiting))
            user = waiting[i]
            name, payload = user.plan[user.sent]
            user.sent += 1
            try:
                state = store.execute_transition(user.user_id, DEMO_FLOW, name, payload)
                user.completed = state.status is FlowStatus.COMPLETED
            except (InvalidTransitionError, PayloadValidationError):
                user.rejected += 1
            if user.sent == len(user.plan):
                waiting[i] = waiting[-1]
                waiting.pop()
            progress.advance(task)
    return total


def run_demo(store: FlowStore, *, users: int, seed: int, console: Console) -> None:
    """Load the onboarding flow, drive `users` simulated users through it and report."""
    began = time.perf_counter()
    rng = random.Random(seed)
    definition, created = load_onboarding(store)
    run_id = f"r{store.get_flow_statistics(DEMO_FLOW).total_flows}"
    how = "created" if created else "reused from an earlier run"
    console.print(
        f"Flow [bold]{DEMO_FLOW}[/] v{definition.version} {how}. "
        f"Run [bold]{run_id}[/]: {users} users, seed {seed}."
    )
    width = len(str(users))
    people = [
        _User(f"{run_id}-u{n:0{width}d}", _plan(n, definition, rng)) for n in range(1, users + 1)
    ]

    driving = time.perf_counter()
    commands = _drive(store, people, rng, console)
    driven = time.perf_counter() - driving

    rejected = sum(user.rejected for user in people)
    completed = sum(user.completed for user in people)
    console.print(
        f"{commands} commands: {commands - rejected} accepted, {rejected} rejected "
        f"(invalid transitions); {completed} of {users} users completed, "
        f"{users - completed} stalled."
    )
    sample = sorted(rng.sample(people, min(_SAMPLE, users)), key=lambda user: user.user_id)
    states = [store.get_flow_state(user.user_id, DEMO_FLOW) for user in sample]
    console.print(
        table(
            [state for state in states if state is not None],
            ("user_id", "step", "status", "ok", "version"),
            title=f"State of {len(sample)} of the {users} users",
        )
    )
    shown = next(
        (user for user in people if user.rejected and user.completed),
        next((user for user in people if user.rejected), people[0]),
    )
    console.print(
        table(
            store.get_flow_history(shown.user_id, DEMO_FLOW),
            HISTORY_FIELDS,
            title=f"History of {shown.user_id}",
        )
    )
    statistics = store.get_flow_statistics(DEMO_FLOW)
    console.print(model_view(statistics, title=f"Statistics of {DEMO_FLOW} (all runs)"))
    elapsed = time.perf_counter() - began
    console.print(
        f"Done in {elapsed:.2f} s: {commands} commands in {driven:.2f} s "
        f"({commands / driven:,.0f} commands/s)."
    )
