"""The ledger check can fail: it names lost, duplicated, phantom, reordered and missing events."""

from __future__ import annotations

from datetime import UTC, datetime
from uuid import UUID, uuid4

import pytest

from flowstore.domain import DomainEvent, TransitionExecuted, TransitionRejected
from tests.reliability.ledger import Ledger

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def executed(iid: UUID, version: int, value: str) -> DomainEvent:
    return TransitionExecuted(
        originator_id=iid,
        originator_version=version,
        timestamp=NOW,
        user_id="u",
        flow_id="f",
        definition_version=1,
        transition="tick",
        from_step="a",
        to_step="a",
        service="s",
        payload={"nonce": value},
        expires_at=None,
        elapsed_ms=0.1,
    )


def rejected(iid: UUID, version: int, value: str) -> DomainEvent:
    return TransitionRejected(
        originator_id=iid,
        originator_version=version,
        timestamp=NOW,
        user_id="u",
        flow_id="f",
        definition_version=1,
        transition="bogus",
        from_step="a",
        payload={"nonce": value},
        error="no",
        error_code="INVALID_TRANSITION",
        elapsed_ms=0.1,
    )


def ledger(*lines: str) -> Ledger:
    result = Ledger()
    result.add_lines(lines)
    return result


IID = uuid4()


def test_an_exact_log_has_no_problems() -> None:
    log = [(1, executed(IID, 1, "w1-t0-0")), (2, rejected(IID, 2, "w1-t0-1"))]
    check = ledger("A w1-t0-0 retries=2", "R w1-t0-1 retries=0").check(log)
    assert check.problems == []
    assert (check.counts["accepted"], check.counts["rejected"], check.retries) == (1, 1, 2)


@pytest.mark.parametrize(
    ("lines", "log", "problem"),
    [
        (["A w1-t0-0"], [], "lost"),
        (["A w1-t0-0"], [(1, executed(IID, 1, "w1-t0-0")), (2, executed(IID, 2, "w1-t0-0"))], "duplicated"),
        (["A w1-t0-0"], [(1, rejected(IID, 1, "w1-t0-0"))], "changed"),
        (["E w1-t0-0 x"], [(1, executed(IID, 1, "w1-t0-0")), (2, executed(IID, 2, "w1-t0-0"))], "duplicated"),
        (["A w1-t0-0"], [(1, executed(IID, 1, "w1-t0-0")), (2, executed(IID, 2, "w1-t0-5"))], "phantom"),
        (["A w1-t0-0", "A w1-t0-1"], [(1, executed(IID, 1, "w1-t0-1")), (2, executed(IID, 2, "w1-t0-0"))], "reordered"),
        (["A w1-t0-0"], [(1, executed(IID, 1, "w1-t0-0")), (3, executed(IID, 3, "w9-t0-9"))], "gap"),
    ],
    ids=["lost", "duplicated", "changed", "failed-twice", "phantom", "reordered", "gap"],
)  # fmt: skip
def test_each_broken_promise_is_named(
    lines: list[str], log: list[tuple[int, DomainEvent]], problem: str
) -> None:
    problems = ledger(*lines).check(log).problems
    assert any(p.startswith(problem) for p in problems), problems


def test_the_command_in_flight_when_a_writer_died_may_be_in_the_log_once() -> None:
    log = [(1, executed(IID, 1, "w1-t0-0")), (2, executed(IID, 2, "w1-t0-1"))]
    check = ledger("A w1-t0-0").check(log)
    assert check.problems == []
    assert check.in_flight_found == 1
