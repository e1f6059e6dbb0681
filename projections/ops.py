"""What each event does to the read-model tables, as plain data: a pure function of events.

`fold(kind, event, previous, attempts, rows)` reads one event as plain data (its class name and its
fields, e.g. a decoded event's `__dict__`), given the instance's current `flow_states` row and the
flow's attempt count so far (both read from the tables being built), and tells `rows` what changes.
The live path, a rebuild and verify all fold through this one function, so they cannot disagree;
how the changes reach the tables (`RowBatch`, then upserts, `executemany` or `COPY`) is theirs.

The changes name their table by its `ProjectionTables` attribute ("counters", "activity"...) and a
row by its primary key in column order, so that a new table needs a rule here and a `Table` in
`flowstore.projections.tables`, and nothing in the code that writes, rebuilds or verifies.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from datetime import UTC, date, datetime, timedelta, timezone, tzinfo
from typing import Any, Protocol

from pydantic_core import TzInfo

from flowstore.domain import id_text, merge_payload
from flowstore.models import FlowStatus, HistoryKind

__all__ = [
    "ACTIVITY_COLUMNS",
    "ACTIVITY_SPANS",
    "ATTEMPT_KINDS",
    "INSTANCE_KINDS",
    "RESPONSE_BINS_PER_OCTAVE",
    "SAMPLE_SLOTS",
    "THROUGHPUT_RETENTION_SECONDS",
    "RowChanges",
    "bin_value",
    "fold",
    "response_bin",
]

ACTIVITY_COLUMNS = (
    "started",
    "completed",
    "attempts",
    "rejections",
    "failures",
    "completed_duration_ms",
    "response_ms_total",
    "entered",
    "moved_on",
    "dropped",
    "completions",
)
"""What `flow_activity` counts per flow, time bucket and step (`flowstore.projections.tables`).

`completed` (and its duration) counts runs in the bucket they *started* in, so that a window's
completion rate is over its own runs; `completions` counts them in the bucket they completed in
(the console's activity charts)."""

ACTIVITY_SPANS = (60, 3600)
"""The bucket sizes `flow_activity` and `flow_response_times` keep, in seconds: every count is
added to its minute and to its hour, so a long window reads hours (a day is 24 of them) and only
its ragged ends read minutes."""

RESPONSE_BINS_PER_OCTAVE = 8
"""Response-time histogram resolution: bin `b` holds [2^(b/8), 2^((b+1)/8)) ms, so the value a
percentile reports (the bin's geometric middle) is within 2^(1/16) - 1 = 4.4% of the exact one."""
_LOWEST_BIN = -10 * RESPONSE_BINS_PER_OCTAVE  # 2^-10 ms, about a microsecond (and 0 ms)
_HIGHEST_BIN = 22 * RESPONSE_BINS_PER_OCTAVE  # 2^22 ms, about 70 minutes (and anything longer)


def response_bin(elapsed_ms: float) -> int:
    """The histogram bin of a response time (clamped to about 1 microsecond .. 70 minutes)."""
    if not elapsed_ms > 0:  # 0, negative or NaN: the lowest bin
        return _LOWEST_BIN
    found = math.floor(math.log2(elapsed_ms) * RESPONSE_BINS_PER_OCTAVE)
    return max(_LOWEST_BIN, min(_HIGHEST_BIN, found))


def bin_value(index: int) -> float:
    """What a histogram bin reports: its geometric middle, in ms."""
    return float(2 ** ((index + 0.5) / RESPONSE_BINS_PER_OCTAVE))


SAMPLE_SLOTS = 1000
"""Response-time samples kept per flow (the p95 is over the most recent ones)."""
THROUGHPUT_RETENTION_SECONDS = 3600
"""Per-second attempt counts are kept for the current and the previous hour (of event time)."""


class RowChanges(Protocol):
    """Where `fold` puts what one event changes (`flowstore.projections.batch.RowBatch`)."""

    def put_state(self, row: dict[str, Any]) -> None:
        """Replace the `flow_states` row of (row's user_id, row's flow_id)."""

    def erase(self, instance_id: str) -> None:
        """Delete every row carrying `instance_id` (by id, not by user id: an instance's events
        read with the user's id while their key exists and with a stand-in once it is shredded,
        and the rows to delete may carry either)."""

    def insert(self, table: str, row: dict[str, Any]) -> None:
        """Insert one row (a table of facts, e.g. history)."""

    def add(self, table: str, key: tuple[Any, ...], deltas: Mapping[str, float]) -> None:
        """Add `deltas` to the row at `key` (a new row starts at zero)."""

    def add_spans(
        self, table: str, flow_id: str, second: int, last: Any, deltas: Mapping[str, float]
    ) -> None:
        """Add `deltas` to the rows `(flow_id, span, start, last)` of the buckets holding `second`,
        one per span of `ACTIVITY_SPANS` (`start` = `second - second % span`)."""

    def put(self, table: str, key: tuple[Any, ...], row: dict[str, Any]) -> None:
        """Replace the row at `key` with `row`'s non-key columns."""

    def forget(self, table: str, flow_id: str, before: int) -> None:
        """Rows of `flow_id` whose second column is below `before` are no longer wanted."""

    def repeat(self, changes: Callable[..., None], *key: Any) -> None:
        """Make the changes `changes(rows, times, *key)` makes, `times` being how many times
        `repeat` is given these `changes` and `key`, at any moment before the rows are read.
        For changes that come to the same made at once or one by one, in any order and
        whatever else changes meanwhile: adding whole numbers (`times` each) to columns no
        float is added to, and `forget`. Many events count alike (a batch's transitions of one
        flow, second and step): `RowBatch` makes each distinct call's changes once, when it
        settles, rather than an add per row and column per event."""


Event = Mapping[str, Any]
"""An event's fields by name (a decoded event's `__dict__`): timestamps are datetimes."""

_RUN_COUNTS = frozenset({"completed", "completed_duration_ms"})
"""Counted in the bucket the run started, so a window's completion rate is over its own runs."""

_NEW_ROW: dict[str, Any] = {
    "step": None,
    "service": None,
    "ok": True,
    "payload": None,
    "status": FlowStatus.ACTIVE.value,
    "started_at": None,
    "completed_at": None,
    "expires_at": None,
    "previous": None,
    "entity_id": None,
    "message": None,
    "entered_at": None,
}
_ACTIVE = FlowStatus.ACTIVE.value
_KINDS = {kind: kind.value for kind in HistoryKind}  # an enum's `.value` is a slow property
_TRANSITION = HistoryKind.TRANSITION.value
# Deltas many events add, made once (`RowChanges` only reads them).
_ONE: dict[str, Mapping[str, float]] = {
    name: {name: 1} for name in ("dropped", "entered", "started")
}
_ACTIVITY = frozenset(ACTIVITY_COLUMNS)
_MS = timedelta(milliseconds=1)


_FIXED_ZONES = (timezone, TzInfo)
"""Time zone types whose offset is the same at any moment (the standard library's and
pydantic's, which decoded events carry)."""
_OFFSETS: dict[int, tuple[tzinfo, int]] = {}
_EPOCH_DAY = date(1970, 1, 1).toordinal()
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


def _second(moment: datetime) -> int:
    """The moment's Unix time in whole seconds, rounded towards zero as `int(moment.timestamp())`
    rounds, but exact: that float is coarser than a microsecond before 1834 and after 2106 (2**32
    seconds from 1970), where a moment a microsecond from a whole second may round to it (a naive
    moment is local time, as for `timestamp()`). From the fields, for a fixed-offset zone: its
    `timestamp()` asks pydantic's zone for the offset on every call (twice the time)."""
    zone = moment.tzinfo
    found = _OFFSETS.get(id(zone))
    if found is None or found[0] is not zone:
        if zone is None:
            return int(moment.timestamp())
        offset = zone.utcoffset(None) if type(zone) in _FIXED_ZONES else None
        if offset is None or offset.microseconds:
            return _whole_seconds((moment - _EPOCH) // _MICROSECOND)
        if len(_OFFSETS) >= 64:  # zones are shared objects, but nothing says they must be
            _OFFSETS.clear()
        found = _OFFSETS[id(zone)] = (zone, int(offset.total_seconds()))
    second = (
        (moment.toordinal() - _EPOCH_DAY) * 86400
        + moment.hour * 3600
        + moment.minute * 60
        + moment.second
        - found[1]
    )
    # `int` of a timestamp rounds towards zero: before 1970, a fraction of a second rounds up.
    return second + 1 if second < 0 and moment.microsecond else second


def _whole_seconds(microseconds: int) -> int:
    """Microseconds as whole seconds, rounded towards zero (as `int` rounds a float)."""
    if microseconds >= 0:
        return microseconds // 1_000_000
    return -(-microseconds // 1_000_000)


class _Fold:
    """One event's folding: the event, the rows it reads, and where its changes go."""

    __slots__ = ("e", "flow", "instance", "previous", "rows", "second")

    def __init__(self, e: Event, previous: dict[str, Any] | None, rows: RowChanges) -> None:
        self.e, self.previous, self.rows = e, previous, rows
        self.flow: str = e["flow_id"]
        self.instance = id_text(e["originator_id"])
        self.second = _second(e["timestamp"])

    def state(self, **fields: Any) -> None:
        # Without a current row (only when one run's events were sealed under two keys, a write
        # racing an erasure), the row starts from neutral values rather than failing the projection.
        e = self.e
        # One dict display (a new dict, in the same key order as copying and then setting).
        self.rows.put_state(
            {
                **(self.previous or _NEW_ROW),
                "instance_id": self.instance,
                "user_id": e["user_id"],
                "flow_id": self.flow,
                "definition_version": e["definition_version"],
                "version": e["originator_version"],
                "updated_at": e["timestamp"],
                **fields,
            }
        )

    def history(
        self,
        kind: HistoryKind,
        from_step: str | None,
        to_step: str | None,
        *,
        meta: Mapping[str, Any] = {},
        transition: str | None = None,
        payload: dict[str, Any] | None = None,
        success: bool = True,
        error: str | None = None,
        ok: bool | None = None,
        message: str | None = None,
        stay_ms: float | None = None,
    ) -> None:
        """One `flow_history` row; the steps and transition as "" when there are none (the seed's
        strings, `flowstore.models.FlowStateHistory`)."""
        e = self.e
        oid = self.instance
        self.rows.insert(
            "history",
            {
                "user_id": e["user_id"],
                "flow_id": self.flow,
                "version": e["originator_version"],
                "instance_id": oid,
                "id": f"{oid}:{e['originator_version']}",
                "kind": _KINDS[kind],
                "from_step": from_step or "",
                "to_step": to_step or "",
                "transition": transition or "",
                "payload": payload,
                "timestamp": e["timestamp"],
                "success": success,
                "error": error,
                "meta": {"definition_version": e["definition_version"], **meta},
                "ok": ok,
                "message": message,
                "stay_ms": stay_ms,
            },
        )

    def activity(self, second: int, step: str, deltas: Mapping[str, float]) -> None:
        """Add to the flow's activity in the minute and in the hour of `second`."""
        self.rows.add_spans("activity", self.flow, second, step, deltas)

    def timed(self, elapsed_ms: float) -> None:
        """Add an attempt's response time to the flow's counters and its activity (floats: one
        by one, in the events' order; what else an attempt counts is `_attempted`)."""
        _counted(self.rows, self.flow, self.second, {"response_ms_total": elapsed_ms})

    def count(self, deltas: Mapping[str, float]) -> None:
        """Add to the flow's counters, and to its activity: runs by the bucket they started in
        (`completions` by the one they completed in), the rest by the bucket they happened in."""
        if _RUN_COUNTS.isdisjoint(deltas) and _ACTIVITY.issuperset(deltas):  # the usual case
            _counted(self.rows, self.flow, self.second, deltas)
            return
        self.rows.add("counters", (self.flow,), deltas)
        by_run = {k: v for k, v in deltas.items() if k in _RUN_COUNTS}
        by_now = {k: v for k, v in deltas.items() if k in ACTIVITY_COLUMNS and k not in by_run}
        if "completed" in by_run:
            by_now["completions"] = by_run["completed"]
        if by_run:
            started = self.previous.get("started_at") if self.previous else None
            run = _second(started) if started is not None else self.second
            self.activity(run, "", by_run)
        if by_now:
            self.activity(self.second, "", by_now)

    def step(self, step: str, counter: str) -> None:
        """Count one run entering, moving on from or dropping out at `step` (and its buckets)."""
        _step_counted(self.rows, self.flow, self.second, step, _ONE[counter])

    def moved(self, from_step: str, to_step: str) -> None:
        """A run moving on from `from_step` and entering `to_step` (`_moved`)."""
        self.rows.repeat(_moved, self.flow, self.second, from_step, to_step)

    def dropped(self) -> None:
        """An active run that ends or is moved away from its step without moving on drops out."""
        previous = self.previous
        if previous is not None and previous["status"] == _ACTIVE:
            self.step(previous["step"], "dropped")

    def attempt(self, attempts: int) -> None:
        """An attempt (taken or refused): its response-time sample (what it counts is in
        `_attempted`, which the caller repeats with what else its kind counts alike)."""
        self.rows.put(
            "samples",
            (self.flow, attempts % SAMPLE_SLOTS),
            {"elapsed_ms": self.e["elapsed_ms"], "second": self.second},
        )


def _counted(rows: RowChanges, flow: str, second: int, deltas: Mapping[str, float]) -> None:
    """Add `deltas` to the flow's counters and to its activity (the buckets of `second`)."""
    rows.add("counters", (flow,), deltas)
    rows.add_spans("activity", flow, second, "", deltas)


def _step_counted(
    rows: RowChanges, flow: str, second: int, step: str, deltas: Mapping[str, float]
) -> None:
    """Add `deltas` to `step`'s funnel counts and to its activity (the buckets of `second`)."""
    rows.add("steps", (flow, step), deltas)
    rows.add_spans("activity", flow, second, step, deltas)


def _moved(rows: RowChanges, times: int, flow: str, second: int, left: str, entered: str) -> None:
    """`times` runs moving on from step `left` and entering `entered` in `second` (a change
    of each row when the steps are the same, a loop: whose sums are those of the two)."""
    steps: list[tuple[str, dict[str, float]]] = (
        [(left, {"moved_on": times, "entered": times})]
        if left == entered
        else [(left, {"moved_on": times}), (entered, {"entered": times})]
    )
    for step, deltas in steps:
        _step_counted(rows, flow, second, step, deltas)


def _attempted(
    rows: RowChanges, times: int, flow: str, second: int, bin_: int, outcome: str | None
) -> None:
    """`times` attempts in `second` answered in the response-time bin `bin_`, each also counted
    as `outcome` ("failures", "rejections"; None: neither), and the throughput rows they leave
    behind (the bound depends on the second alone: the same for every one of them)."""
    attempts = {"attempts": times}
    counts = attempts if outcome is None else {"attempts": times, outcome: times}
    _counted(rows, flow, second, counts)
    rows.add("throughput", (flow, second), attempts)
    # Whole hours are forgotten at once, so the bound (and the delete behind it) moves rarely.
    hour = THROUGHPUT_RETENTION_SECONDS
    rows.forget("throughput", flow, (second // hour - 1) * hour)
    rows.add_spans("response_times", flow, second, bin_, attempts)


def _taken(
    rows: RowChanges,
    times: int,
    flow: str,
    second: int,
    bin_: int,
    left: str,
    entered: str,
    transition: str,
    outcome: str | None,
) -> None:
    """`times` transitions `transition` taken from `left` to `entered` in `second`, answered in
    the response-time bin `bin_` (`outcome`: "failures" when they failed): all that such a
    transition counts in whole numbers."""
    _attempted(rows, times, flow, second, bin_, outcome)
    _moved(rows, times, flow, second, left, entered)
    rows.add("transitions", (flow, left, transition), {"taken": times})


def _started(f: _Fold, e: Event, attempts: int) -> None:
    f.history(
        HistoryKind.START if e["reason"] == "start" else HistoryKind.RESET,
        e["from_step"],
        e["step"],
    )
    f.dropped()
    f.count(_ONE["started"])
    f.step(e["step"], "entered")
    f.state(
        step=e["step"],
        service=e["service"],
        ok=True,
        payload=None,
        status=_ACTIVE,
        started_at=e["timestamp"],
        completed_at=None,
        expires_at=e["expires_at"],
        previous=None,
        entity_id=e["entity_id"],
        message=None,
        entered_at=e["timestamp"],
    )


def _executed(f: _Fold, e: Event, attempts: int) -> None:
    # Nine events in ten are transitions taken: their rows are written out here rather than
    # through `_Fold.history`, `state`, `timed` and `attempt` (the same rows, keys in the same
    # order: `tests/unit/test_fold.py`), whose calls, keyword arguments and the dicts they pass
    # cost 11% of the fold (issue 17: 76.9k -> 68.3k instructions per event under valgrind;
    # 11.9 -> 10.9 µs per event in a rebuild's fold).
    rows, flow, second, previous = f.rows, f.flow, f.second, f.previous
    user, version, now = e["user_id"], e["originator_version"], e["timestamp"]
    from_step, to_step, transition = e["from_step"], e["to_step"], e["transition"]
    definition, elapsed, service = e["definition_version"], e["elapsed_ms"], e["service"]
    payload, ok, message, came_from = e["payload"], e["ok"], e["message"], e["previous"]
    oid = f.instance
    # How long the run stayed on the step it leaves, in whole ms (since the accepted command
    # that brought it there; None when the row does not say).
    stay: float | None = None
    entered = previous.get("entered_at") if previous else None
    if entered is not None and previous is not None and previous.get("step") == from_step:
        stay = float(max(0, round((now - entered) / _MS)))
    meta = {"definition_version": definition, "elapsed_ms": elapsed, "service": service}
    if came_from is not None:
        meta["previous"] = came_from
    rows.insert(
        "history",
        {
            "user_id": user,
            "flow_id": flow,
            "version": version,
            "instance_id": oid,
            "id": f"{oid}:{version}",
            "kind": _TRANSITION,
            "from_step": from_step or "",
            "to_step": to_step or "",
            "transition": transition or "",
            "payload": payload,
            "timestamp": now,
            "success": True,
            "error": None,
            "meta": meta,
            "ok": ok,
            "message": message,
            "stay_ms": stay,
        },
    )
    _counted(rows, flow, second, {"response_ms_total": elapsed})
    rows.repeat(
        _taken,
        flow,
        second,
        response_bin(elapsed),
        from_step,
        to_step,
        transition,
        None if ok else "failures",
    )
    rows.put("samples", (flow, attempts % SAMPLE_SLOTS), {"elapsed_ms": elapsed, "second": second})
    before = previous.get("payload") if previous else None
    rows.put_state(
        {
            **(previous or _NEW_ROW),
            "instance_id": oid,
            "user_id": user,
            "flow_id": flow,
            "definition_version": definition,
            "version": version,
            "updated_at": now,
            "step": to_step,
            "service": service,
            "ok": ok,
            "message": message,
            "previous": came_from,
            "payload": merge_payload(before, payload) if e["rules"] == 2 else payload,
            "expires_at": e["expires_at"],
            "entered_at": now,
        }
    )


def _rejected(f: _Fold, e: Event, attempts: int) -> None:
    f.history(
        HistoryKind.TRANSITION,
        e["from_step"],
        e["from_step"],  # rejected: the user stays where they were
        meta={"elapsed_ms": e["elapsed_ms"], "error_code": e["error_code"]},
        transition=e["transition"],
        payload=e["payload"],
        success=False,
        error=e["error"],
    )
    f.timed(e["elapsed_ms"])
    f.rows.repeat(_attempted, f.flow, f.second, response_bin(e["elapsed_ms"]), "rejections")
    f.attempt(attempts)
    # Rules 2 (the model): a refusal leaves the state as it was; rules 1 set ok to false.
    f.state(**({} if e["rules"] == 2 else {"ok": False}))


def _completed(f: _Fold, e: Event, attempts: int) -> None:
    started = f.previous["started_at"] if f.previous else None
    duration = (e["timestamp"] - started) / _MS if started else 0.0
    # Logs written before events were stamped in order may run backwards: never negative.
    f.count({"completed": 1, "completed_duration_ms": max(duration, 0.0)})
    f.state(status=FlowStatus.COMPLETED.value, completed_at=e["timestamp"], expires_at=None)


def _entered(handoff: bool) -> Callable[[_Fold, Event, int], None]:
    """An override or a hand-over puts the run at a step (a new run after a clear or expiry)."""

    def enter(f: _Fold, e: Event, attempts: int) -> None:
        meta: dict[str, Any] = {"service": e["service"]}
        if handoff:
            meta["sender"] = e["sender"]
            if e["previous"] is not None:
                meta["previous"] = e["previous"]
        else:
            meta["ok"] = e["ok"]
        f.history(
            HistoryKind.HANDOFF if handoff else HistoryKind.OVERRIDE,
            e["from_step"],
            e["step"],
            meta=meta,
            payload=e["payload"],
            ok=e["ok"],
            message=e["message"],
        )
        previous = f.previous
        restarted = previous is None or previous["status"] in (
            FlowStatus.CLEARED.value,
            FlowStatus.EXPIRED.value,
        )
        f.dropped()
        if restarted:
            f.count(_ONE["started"])
        f.step(e["step"], "entered")
        f.state(
            step=e["step"],
            service=e["service"],
            ok=e["ok"],
            payload=e["payload"],
            status=_ACTIVE,
            started_at=e["timestamp"] if restarted else previous and previous["started_at"],
            completed_at=None,
            expires_at=e["expires_at"],
            previous=e["previous"],
            entity_id=e["entity_id"],
            message=e["message"],
            entered_at=e["timestamp"],
        )

    return enter


def _went_back(f: _Fold, e: Event, attempts: int) -> None:
    f.history(HistoryKind.BACK, e["from_step"], e["step"], meta={"service": e["service"]}, ok=True)
    # Going back is moving on from the step left and entering the previous one again.
    f.moved(e["from_step"], e["step"])
    f.state(
        step=e["step"],
        service=e["service"],
        ok=True,
        message=None,
        previous=None,
        expires_at=e["expires_at"],
        entered_at=e["timestamp"],
    )


def _migrated(f: _Fold, e: Event, attempts: int) -> None:
    f.history(
        HistoryKind.MIGRATION,
        e["from_step"],
        e["to_step"],
        meta={"from_version": e["from_version"], "service": e["service"]},
    )
    # A migration is not a drop-out: the run goes on. When it lands on another step, the
    # funnel counts that as moving on from the old step and entering the new one, which
    # keeps entered == moved_on + dropped + current for every non-terminal step.
    if e["to_step"] != e["from_step"]:
        f.moved(e["from_step"], e["to_step"])
    f.state(
        step=e["to_step"], service=e["service"], previous=e["previous"], entered_at=e["timestamp"]
    )


def _ended(expired: bool) -> Callable[[_Fold, Event, int], None]:
    def end(f: _Fold, e: Event, attempts: int) -> None:
        f.history(HistoryKind.EXPIRY if expired else HistoryKind.CLEAR, e["from_step"], None)
        f.dropped()
        if expired:
            f.count({"expired": 1})
        f.state(
            step=None,
            service=None,
            payload=None,
            status=(FlowStatus.EXPIRED if expired else FlowStatus.CLEARED).value,
            expires_at=None,
            previous=None,
            entity_id=None,
            message=None,
            entered_at=None,
        )

    return end


def _erased(f: _Fold, e: Event, attempts: int) -> None:
    # The counters keep counting the erased user's steps (they say nothing about who).
    f.dropped()
    f.rows.erase(str(e["originator_id"]))


_FOLDS: dict[str, Callable[[_Fold, Event, int], None]] = {
    "FlowStarted": _started,
    "TransitionExecuted": _executed,
    "TransitionRejected": _rejected,
    "FlowCompleted": _completed,
    "StateOverridden": _entered(handoff=False),
    "FlowHandedOver": _entered(handoff=True),
    "FlowWentBack": _went_back,
    "FlowMigrated": _migrated,
    "FlowCleared": _ended(expired=False),
    "FlowExpired": _ended(expired=True),
    "FlowErased": _erased,
}

INSTANCE_KINDS = frozenset(_FOLDS)
"""The events (by class name) that change rows; definition and catalog events change none."""
ATTEMPT_KINDS = frozenset({"TransitionExecuted", "TransitionRejected"})
"""The events that count as an attempt: each takes the next response-time sample slot."""


def fold(
    kind: str, event: Event, previous: dict[str, Any] | None, attempts: int, rows: RowChanges
) -> None:
    """Tell `rows` what one event (`kind`: its class name) changes; nothing for other events."""
    rule = _FOLDS.get(kind)
    if rule is not None:
        rule(_Fold(event, previous, rows), event, attempts)
