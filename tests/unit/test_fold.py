"""The fold's written-out hot path: a transition taken makes the rows the `_Fold` helpers make."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

from hypothesis import example, given
from hypothesis import strategies as st

from flowstore.domain import merge_payload
from flowstore.models import HistoryKind
from flowstore.projections.ops import _MS, _NEW_ROW, SAMPLE_SLOTS, _Fold, _taken, fold, response_bin


class _Recorded:
    """A `RowChanges` that records every call, dicts as their items in order."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def _record(self, name: str, *args: Any) -> None:
        self.calls.append((name, *(list(a.items()) if isinstance(a, dict) else a for a in args)))

    def put_state(self, row: dict[str, Any]) -> None:
        self._record("put_state", row)

    def erase(self, instance_id: str) -> None:
        self._record("erase", instance_id)

    def insert(self, table: str, row: dict[str, Any]) -> None:
        self._record("insert", table, {**row, "meta": list(row["meta"].items())})

    def add(self, table: str, key: tuple[Any, ...], deltas: Any) -> None:
        self._record("add", table, key, dict(deltas))

    def add_spans(self, table: str, flow_id: str, second: int, last: Any, deltas: Any) -> None:
        self._record("add_spans", table, flow_id, second, last, dict(deltas))

    def put(self, table: str, key: tuple[Any, ...], row: dict[str, Any]) -> None:
        self._record("put", table, key, row)

    def forget(self, table: str, flow_id: str, before: int) -> None:
        self._record("forget", table, flow_id, before)

    def repeat(self, changes: Any, *key: Any) -> None:
        self._record("repeat", changes, *key)


def _through_helpers(e: dict[str, Any], previous: dict[str, Any] | None, attempts: int) -> Any:
    """A transition taken folded through the `_Fold` helpers, as every other event is (the
    fold's code before its hot path was written out)."""
    rows = _Recorded()
    f = _Fold(e, previous, rows)
    entered = previous.get("entered_at") if previous else None
    stay = (
        None
        if entered is None or previous is None or previous.get("step") != e["from_step"]
        else float(max(0, round((e["timestamp"] - entered) / _MS)))
    )
    meta = {"elapsed_ms": e["elapsed_ms"], "service": e["service"]}
    if e["previous"] is not None:
        meta["previous"] = e["previous"]
    f.history(
        HistoryKind.TRANSITION,
        e["from_step"],
        e["to_step"],
        meta=meta,
        transition=e["transition"],
        payload=e["payload"],
        ok=e["ok"],
        message=e["message"],
        stay_ms=stay,
    )
    f.timed(e["elapsed_ms"])
    rows.repeat(
        _taken,
        f.flow,
        f.second,
        response_bin(e["elapsed_ms"]),
        e["from_step"],
        e["to_step"],
        e["transition"],
        None if e["ok"] else "failures",
    )
    f.attempt(attempts)
    before = previous.get("payload") if previous else None
    f.state(
        step=e["to_step"],
        service=e["service"],
        ok=e["ok"],
        message=e["message"],
        previous=e["previous"],
        payload=merge_payload(before, e["payload"]) if e["rules"] == 2 else e["payload"],
        expires_at=e["expires_at"],
        entered_at=e["timestamp"],
    )
    return rows.calls


_T0 = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
_MOMENTS = st.integers(0, 10**10).map(lambda us: _T0 + timedelta(microseconds=us))
_STEPS = st.sampled_from(["a", "b", ""])
_PAYLOADS = st.none() | st.dictionaries(st.sampled_from(["n", "m"]), st.integers(), max_size=2)
_EVENTS = st.fixed_dictionaries(
    {
        "originator_id": st.uuids(),
        "originator_version": st.integers(1, 10**6),
        "timestamp": _MOMENTS,
        "user_id": st.sampled_from(["ann", "bob"]),
        "flow_id": st.sampled_from(["f", "g"]),
        "definition_version": st.integers(1, 3),
        "transition": st.sampled_from(["go", ""]),
        "from_step": _STEPS,
        "to_step": _STEPS,
        "service": st.sampled_from(["svc", "other"]),
        "payload": _PAYLOADS,
        "expires_at": st.none() | _MOMENTS,
        "elapsed_ms": st.floats(0, 10**7, allow_nan=False),
        "ok": st.booleans(),
        "message": st.none() | st.just("careful"),
        "previous": st.none() | _STEPS,
        "rules": st.sampled_from([1, 2]),
    }
)
_PREVIOUS = st.none() | st.fixed_dictionaries(
    {
        "step": st.none() | _STEPS,
        "entered_at": st.none() | _MOMENTS,
        "payload": _PAYLOADS,
        "status": st.sampled_from(["active", "completed"]),
        "started_at": st.none() | _MOMENTS,
    }
).map(lambda row: {**_NEW_ROW, "instance_id": "i", "user_id": "ann", "flow_id": "f", **row})


_EXAMPLE: dict[str, Any] = {
    "originator_id": UUID(int=7),
    "originator_version": 2,
    "timestamp": _T0,
    "user_id": "ann",
    "flow_id": "f",
    "definition_version": 1,
    "transition": "go",
    "from_step": "a",
    "to_step": "b",
    "service": "svc",
    "payload": None,
    "expires_at": None,
    "elapsed_ms": 1.0,
    "ok": True,
    "message": None,
    "previous": None,
    "rules": 2,
}
_LATE = {**_NEW_ROW, "instance_id": "i", "step": "a", "entered_at": _T0 + timedelta(seconds=9)}


@given(_EVENTS, _PREVIOUS, st.integers(0, 3 * SAMPLE_SLOTS))
@example(_EXAMPLE, _LATE, 0)  # the step entered after the transition's time (a clock set back)
def test_a_transition_taken_makes_the_rows_the_helpers_make(
    event: dict[str, Any], previous: dict[str, Any] | None, attempts: int
) -> None:
    """Whatever the event and the run's row before it: the same calls, in the same order, with
    the same rows (their keys in the same order)."""
    rows = _Recorded()
    fold("TransitionExecuted", event, previous, attempts, rows)
    assert rows.calls == _through_helpers(event, previous, attempts)


def test_every_history_row_has_the_same_columns_in_the_same_order() -> None:
    """The written-out row and the helpers' (a rejection's, here) name the same columns."""
    event = {**_EXAMPLE, "error": "no", "error_code": "NO"}
    taken, refused = _Recorded(), _Recorded()
    fold("TransitionExecuted", event, None, 0, taken)
    fold("TransitionRejected", event, None, 0, refused)
    (taken_row,) = [c[2] for c in taken.calls if c[0] == "insert"]
    (refused_row,) = [c[2] for c in refused.calls if c[0] == "insert"]
    assert [k for k, _ in taken_row] == [k for k, _ in refused_row]
    (taken_state,) = [c[1] for c in taken.calls if c[0] == "put_state"]
    (refused_state,) = [c[1] for c in refused.calls if c[0] == "put_state"]
    assert [k for k, _ in taken_state] == [k for k, _ in refused_state]
