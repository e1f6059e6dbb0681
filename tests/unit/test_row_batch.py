"""The row batch's bookkeeping: bucket spreading and which state columns an UPDATE must set."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any
from zoneinfo import ZoneInfo

from hypothesis import given
from hypothesis import strategies as st
from pydantic_core import TzInfo

from flowstore.projections.batch import PUT, UPDATE, RowBatch, _changed_columns, columns_of
from flowstore.projections.ops import ACTIVITY_SPANS, _second, _taken
from flowstore.projections.tables import define_tables
from flowstore.storage import make_engine, parse_url

_TABLES = define_tables()

_CHANGES = st.lists(
    st.tuples(
        st.sampled_from(["activity", "response_times"]),
        st.sampled_from(["f", "g"]),
        st.integers(0, 2 * 3600 + 5),  # seconds across minute and hour boundaries
        st.sampled_from(["", "a", 3]),
        st.dictionaries(st.sampled_from(["attempts", "entered", "dropped"]), st.integers(-3, 9)),
    ),
    max_size=40,
)


@given(_CHANGES)
def test_changes_summed_by_second_are_those_added_to_each_bucket(changes: list[Any]) -> None:
    spread, each = RowBatch(), RowBatch()
    for table, flow, second, last, deltas in changes:
        spread.add_spans(table, flow, second, last, deltas)
        for span in ACTIVITY_SPANS:
            each.add(table, (flow, span, second - second % span, last), deltas)
    assert not spread.empty or not changes or all(not d for *_, d in changes)
    assert sorted(map(repr, spread.rows(_TABLES))) == sorted(map(repr, each.rows(_TABLES)))


_TAKEN = st.lists(
    st.tuples(
        st.sampled_from(["f", "g"]),
        st.integers(2 * 3600 - 65, 2 * 3600 + 65),  # minutes and hours; throughput bounds move
        st.integers(-3, 3),  # response-time bins
        st.sampled_from([("a", "a", "tick"), ("a", "b", "flip"), ("b", "a", "flop")]),
        st.sampled_from([None, "failures"]),
        st.integers(1, 3),  # calls alike in a row
        st.floats(0, 5) | st.sampled_from([0.1, 0.2, 0.3, 1e-9, 1e9]),
    ),
    max_size=40,
)


@given(_TAKEN)
def test_repeated_changes_are_those_made_one_call_at_a_time(calls: list[Any]) -> None:
    """`repeat` makes each distinct call once, `times` over, when the batch settles: the rows are
    those of making every call with 1 as it comes, floats added meanwhile summed in the same
    order (whole numbers add up the same in any order; the floats are not repeated)."""
    repeated, each = RowBatch(), RowBatch()
    for flow, second, bin_, (left, entered, transition), outcome, times, elapsed in calls:
        for batch in (repeated, each):
            batch.add("counters", (flow,), {"response_ms_total": elapsed})
            batch.add_spans("activity", flow, second, "", {"response_ms_total": elapsed})
        for _ in range(times):
            repeated.repeat(_taken, flow, second, bin_, left, entered, transition, outcome)
            _taken(each, 1, flow, second, bin_, left, entered, transition, outcome)
    assert repeated.empty == each.empty == (not calls)
    assert _written(repeated) == _written(each)  # every value's repr: floats to the bit
    assert repeated.forget_before == each.forget_before


def _written(batch: RowBatch) -> list[tuple[str, str, list[str]]]:
    """A batch's rows by table, in an order of their own (a row's columns in table order)."""
    return sorted((t.name, how, sorted(map(repr, rows))) for t, how, rows in batch.rows(_TABLES))


_MOMENT = datetime(2026, 11, 30, 12, 0, 0, 5, tzinfo=UTC)
# Values that are == but stored differently, and the same value as another object.
_VALUES = st.sampled_from(
    [
        None,
        0,
        1,
        True,
        False,
        1.0,
        0.0,
        -0.0,
        "1",
        "a",
        _MOMENT,
        _MOMENT.astimezone(timezone(timedelta(hours=-3))),
        _MOMENT + timedelta(0),
        {"n": 1},
        {"n": 1.0},
        {"n": True},
    ]
)


@given(st.data())
def test_a_column_counts_as_unchanged_only_when_its_stored_value_is_the_same(
    data: st.DataObject,
) -> None:
    """What the UPDATE leaves out (`RowBatch.rows(changes=True)`) is what SQLite would store
    again byte for byte: the same type and text after SQLAlchemy's bind processing."""
    dialect = make_engine(parse_url("memory://")).dialect
    table = _TABLES.states
    _, others = columns_of(table)
    old = {c: data.draw(_VALUES) for c in others}
    new = {c: data.draw(st.just(old[c]) | _VALUES) for c in others}
    changed = _changed_columns(table)(new, old)
    for column in others:
        process = table.c[column].type.dialect_impl(dialect).bind_processor(dialect)

        def stored(value: Any, process: Any = process) -> str:
            try:
                value = process(value) if process is not None else value
            except (TypeError, AttributeError, ValueError):
                return f"unbindable {value!r}"
            return f"{type(value).__name__} {value!r}"

        if column not in changed:
            assert stored(new[column]) == stored(old[column]), column


def _event(user: str, version: int, payload: dict[str, Any]) -> dict[str, Any]:
    return {
        "flow_id": "f",
        "user_id": user,
        "originator_id": f"id-{user}",
        "originator_version": version,
        "definition_version": 1,
        "timestamp": _MOMENT + timedelta(seconds=version),
        "from_step": "a",
        "to_step": "a",
        "transition": "go",
        "payload": payload,
        "elapsed_ms": 1.5,
        "service": "svc",
        "previous": None,
        "ok": True,
        "message": None,
        "expires_at": None,
        "rules": 1,
    }


def test_state_rows_the_tables_hold_come_as_updates_of_their_changed_columns() -> None:
    first = RowBatch()
    first.apply_fields("TransitionExecuted", _event("ann", 1, {"n": 1}))
    held = first.states[("ann", "f")]
    batch = RowBatch(lambda key: held if key == ("ann", "f") else None)
    batch.apply_fields("TransitionExecuted", _event("ann", 2, {"n": 1}))
    batch.apply_fields("TransitionExecuted", _event("bob", 1, {"n": 1}))
    states = [
        (how, rows) for t, how, rows in batch.rows(_TABLES, changes=True) if t is _TABLES.states
    ]
    assert [how for how, _ in states] == [PUT, UPDATE]
    assert [r["user_id"] for r in states[0][1]] == ["bob"]  # not in the tables: written whole
    (update,) = states[1][1]
    assert set(update) == {
        "user_id",
        "flow_id",
        "payload",  # a new (equal) document: written again
        "version",
        "updated_at",
        "entered_at",
    }
    assert update["version"] == 2
    whole = [how for t, how, _ in batch.rows(_TABLES) if t is _TABLES.states]
    assert whole == [PUT]  # without `changes`: whole rows, as verify compares them


@given(
    st.datetimes(
        min_value=datetime(1, 1, 2),
        max_value=datetime(9999, 12, 30),
        timezones=st.sampled_from(
            [
                UTC,
                timezone(timedelta(hours=-3)),
                timezone(timedelta(hours=5, minutes=30)),
                timezone(timedelta(seconds=1, microseconds=5)),
                TzInfo(0),
                TzInfo(-7200),
                ZoneInfo("Europe/Berlin"),
            ]
        ),
    )
)
def test_an_events_second_is_its_timestamps_whole_second(moment: datetime) -> None:
    """Exactly: `int(moment.timestamp())` is one off for 1425-01-01 00:00:00.000001 UTC (its float
    has no microseconds left at that distance from 1970, and rounds to the whole second)."""
    micros = (moment - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1)
    towards_zero = micros // 10**6 if micros >= 0 else -(-micros // 10**6)
    assert _second(moment) == towards_zero
    if abs(micros) < 2**32 * 10**6:  # where its float keeps microseconds: as timestamp() says
        assert _second(moment) == int(moment.timestamp())


def test_a_seconds_rounding_is_exact_far_from_1970() -> None:
    moment = datetime(1425, 1, 1, 0, 0, 0, 1, tzinfo=UTC)
    assert _second(moment) == _second(moment.astimezone(ZoneInfo("Europe/Berlin")))
    assert _second(moment) == -17198524799  # 17,198,524,800 s before 1970, and a microsecond
    late = datetime(9999, 12, 30, 23, 59, 59, 999999, tzinfo=UTC)
    assert _second(late) == _second(late.astimezone(ZoneInfo("Europe/Berlin"))) == 253402214399
