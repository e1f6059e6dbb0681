"""What writers say happened, checked against the log.

Every transition a writer sends carries a unique nonce in its payload (`{"nonce": "w1-t0-17"}`:
writer 1, thread 0, its 17th command). A writer reports the outcome of each command once the call
returns: accepted, rejected (recorded and raised), failed (an error such as a lost database: the
outcome is unknown to the caller) or gave up (ConcurrencyConflictError). `Ledger.check` then reads
the whole log and lists every broken promise:

- an accepted nonce is in the log exactly once, as a `TransitionExecuted`;
- a rejected nonce is in the log exactly once, as a `TransitionRejected`;
- a failed or given-up nonce is in the log at most once (the caller cannot know which);
- a nonce nobody reported is in the log only if it was its thread's next command when the writer
  died (one in flight per thread), and at most once;
- each thread's accepted transitions on one instance appear in the log in the order it got them;
- every aggregate's versions are 1..n without gaps, in notification-id order.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from uuid import UUID

from flowstore import FlowStore
from flowstore.domain import DomainEvent, TransitionExecuted, TransitionRejected

__all__ = ["OUTCOMES", "Ledger", "LedgerCheck", "all_events", "nonce"]

OUTCOMES = {
    "A": "accepted",
    "R": "rejected",
    "E": "failed",
    "C": "gave up",
}
_LINE = re.compile(r"^([AREC]) (w\d+-t\d+-\d+)(?: (.*))?$")


def nonce(writer: int, thread: int, n: int) -> str:
    """The nonce of a writer thread's n-th command."""
    return f"w{writer}-t{thread}-{n}"


def _thread_of(value: str) -> tuple[str, int]:
    head, n = value.rsplit("-", 1)
    return head, int(n)


def all_events(store: FlowStore, page: int = 2000) -> list[tuple[int, DomainEvent]]:
    """The whole log, in notification-id order."""
    events: list[tuple[int, DomainEvent]] = []
    start = 1
    while batch := store.read_events(start, page):
        events.extend(batch)
        start = batch[-1][0] + 1
    return events


@dataclass
class LedgerCheck:
    """The result of comparing a ledger with the log."""

    counts: Counter[str]
    """Reported outcomes: accepted, rejected, failed, gave up."""
    in_flight_found: int
    """Unreported commands (in flight when their writer died) that did reach the log."""
    retries: int
    """Conflicting appends the store retried, summed over accepted and rejected commands."""
    problems: list[str] = field(default_factory=list)

    @property
    def lost(self) -> int:
        """Accepted or rejected commands missing from the log."""
        return sum(1 for p in self.problems if p.startswith("lost"))

    @property
    def duplicated(self) -> int:
        """Commands in the log more than once."""
        return sum(1 for p in self.problems if p.startswith("duplicated"))


@dataclass
class Ledger:
    """Outcomes reported by writers, in the order each thread reported them."""

    outcomes: dict[str, str] = field(default_factory=dict)
    details: dict[str, str] = field(default_factory=dict)
    order: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))

    def add(self, kind: str, value: str, detail: str = "") -> None:
        """Record one outcome: "A", "R", "E" or "C" (see `OUTCOMES`)."""
        assert value not in self.outcomes, f"{value} reported twice"
        self.outcomes[value] = kind
        self.details[value] = detail
        self.order[_thread_of(value)[0]].append(value)

    def add_line(self, line: str) -> bool:
        """Parse a writer's output line (`A w1-t0-17 [detail]`); False if it is not an outcome."""
        match = _LINE.match(line.strip())
        if not match:
            return False
        self.add(match[1], match[2], match[3] or "")
        return True

    def add_lines(self, lines: Iterable[str]) -> None:
        """Parse many lines, ignoring the ones that are not outcomes."""
        for line in lines:
            self.add_line(line)

    def accepted(self) -> list[str]:
        """Accepted nonces."""
        return [v for v, k in self.outcomes.items() if k == "A"]

    def check(self, events: Iterable[tuple[int, DomainEvent]]) -> LedgerCheck:
        """Compare with the log (see the module docstring)."""
        found: dict[str, list[tuple[str, UUID, int]]] = defaultdict(list)
        versions: dict[UUID, list[tuple[int, int]]] = defaultdict(list)
        for notification_id, event in events:
            versions[event.originator_id].append((notification_id, event.originator_version))
            if isinstance(event, TransitionExecuted | TransitionRejected) and event.payload:
                value = event.payload.get("nonce")
                if isinstance(value, str):
                    kind = "A" if isinstance(event, TransitionExecuted) else "R"
                    found[value].append((kind, event.originator_id, event.originator_version))
        problems: list[str] = []
        for value, kind in self.outcomes.items():
            copies = found.get(value, [])
            if kind in ("A", "R"):
                if not copies:
                    problems.append(f"lost: {OUTCOMES[kind]} {value} is not in the log")
                elif len(copies) > 1:
                    problems.append(f"duplicated: {value} is in the log {len(copies)} times")
                elif copies[0][0] != kind:
                    problems.append(
                        f"changed: {value} was {OUTCOMES[kind]} but the log has "
                        f"{OUTCOMES[copies[0][0]]}"
                    )
            elif len(copies) > 1:
                problems.append(f"duplicated: {OUTCOMES[kind]} {value} is in the log twice")
        last: dict[str, int] = {}
        for thread, values in self.order.items():
            last[thread] = max(_thread_of(v)[1] for v in values)
        in_flight = 0
        for value, copies in found.items():
            if value in self.outcomes:
                continue
            thread, n = _thread_of(value)
            if len(copies) > 1:
                problems.append(f"duplicated: unreported {value} is in the log twice")
            if n != last.get(thread, -1) + 1:
                problems.append(f"phantom: {value} is in the log but was never in flight")
            in_flight += 1
        for thread, values in self.order.items():
            seen: dict[UUID, int] = {}
            for value in values:
                if self.outcomes[value] != "A" or len(found.get(value, [])) != 1:
                    continue
                _, iid, version = found[value][0]
                if version <= seen.get(iid, 0):
                    problems.append(f"reordered: {value} of {thread} is before an earlier one")
                seen[iid] = version
        for aggregate, pairs in versions.items():
            numbers = [v for _, v in pairs]
            if numbers != list(range(1, len(numbers) + 1)):
                problems.append(f"gap: aggregate {aggregate} has versions {numbers[:20]}...")
        retries = sum(
            int(detail.split("retries=")[1].split()[0])
            for detail in self.details.values()
            if "retries=" in detail
        )
        counts = Counter(OUTCOMES[k] for k in self.outcomes.values())
        return LedgerCheck(counts, in_flight, retries, problems)
