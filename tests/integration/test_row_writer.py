"""The projections' row writer (`executemany`, `COPY`) stores exactly what SQLAlchemy would."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone, tzinfo
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic_core import TzInfo
from sqlalchemy import Engine, delete, select, text

from flowstore.projections.batch import INSERT, PUT, SUM
from flowstore.projections.tables import define_tables
from flowstore.projections.writes import RowWriter, _faster, _sqlite_datetime
from flowstore.storage import make_engine, parse_url
from tests.strategies import payloads

_MOMENTS = st.datetimes(
    min_value=datetime(1, 1, 1, 12), max_value=datetime(9999, 12, 30), timezones=st.just(UTC)
)


class _NoOffset(tzinfo):
    """A zone that knows no offset (such a moment is naive to `utcoffset`)."""

    def utcoffset(self, dt: datetime | None) -> None:
        return None

    def dst(self, dt: datetime | None) -> None:
        return None


@given(
    st.datetimes(
        timezones=st.sampled_from(
            [
                UTC,
                timezone(timedelta(hours=-3)),
                timezone(timedelta(hours=23, minutes=59, seconds=59, microseconds=1)),
                TzInfo(5400),
                ZoneInfo("Europe/Paris"),
                _NoOffset(),
            ]
        )
        | st.none()
    )
)
def test_sqlite_datetimes_are_written_as_sqlalchemy_writes_them(moment: datetime) -> None:
    engine = make_engine(parse_url("memory://"))
    column = define_tables().history.c.timestamp
    process = column.type.dialect_impl(engine.dialect).bind_processor(engine.dialect)
    assert process is not None
    assert _sqlite_datetime(moment) == process(moment)


@given(st.none() | st.booleans() | st.integers(-2, 2) | st.floats() | st.text(max_size=2))
def test_sqlite_booleans_are_written_and_refused_as_sqlalchemy_does(value: Any) -> None:
    engine = make_engine(parse_url("memory://"))
    column_type = define_tables().history.c.success.type
    theirs = column_type.dialect_impl(engine.dialect).bind_processor(engine.dialect)
    ours = _faster(column_type, engine.dialect)
    assert theirs is not None
    assert ours is not None
    assert ours is not theirs  # the faster one is in use
    try:
        expected = repr(theirs(value))
    except (TypeError, ValueError):
        expected = "refused"
    try:
        got = repr(ours(value))
    except (KeyError, TypeError):
        got = "refused"
    assert got == expected


@pytest.fixture
def engine(store_url: str) -> Iterator[Engine]:
    engine = make_engine(parse_url(store_url))
    yield engine
    engine.dispose()


_ROWS = st.lists(
    st.fixed_dictionaries(
        {
            "version": st.integers(1, 5),
            "timestamp": _MOMENTS,
            "payload": payloads,
            "success": st.booleans(),
            "ok": st.none() | st.booleans(),
            "stay_ms": st.none() | st.integers(0, 10**12).map(float),
            "error": st.none() | st.text(st.characters(codec="utf-8", exclude_characters="\x00")),
        }
    ),
    min_size=1,
    max_size=8,
)


def _history(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "user_id": "u",
        "flow_id": "f",
        "instance_id": "i",
        "id": f"i:{row['version']}",
        "kind": "transition",
        "from_step": "",
        "to_step": "a",
        "transition": "go",
        "meta": {"elapsed_ms": 1.5, "at": row["timestamp"].isoformat()},
        "message": None,
        **row,
    }


def test_rows_read_back_as_rows_written_through_sqlalchemy(engine: Engine) -> None:
    """History inserted (COPY on PostgreSQL) and counters summed by the writer and by SQLAlchemy
    statements, into twin tables: both read back the same."""
    ours, theirs = define_tables("__w1"), define_tables("__w2")
    with engine.begin() as conn:
        ours.metadata.create_all(conn)
        theirs.metadata.create_all(conn)
    writer = RowWriter(engine.dialect)

    @settings(
        max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
    )
    @given(_ROWS, st.lists(st.integers(0, 3), min_size=1, max_size=4))
    def check(rows: list[dict[str, Any]], starts: list[int]) -> None:
        history = list({r["version"]: _history(r) for r in rows}.values())
        counters = [{"flow_id": "f", "started": n, "response_ms_total": n / 3} for n in starts]
        full = [{c.name: 0 for c in ours.counters.columns} | row for row in counters]
        with engine.begin() as conn:
            for tables in (ours, theirs):
                conn.execute(delete(tables.history))
                conn.execute(delete(tables.counters))
            writer.write(conn, ours.history, INSERT, history)
            conn.execute(theirs.history.insert(), history)
            for row in full:
                writer.write(conn, ours.counters, SUM, [row])
            conn.execute(theirs.counters.insert(), [full[0]])
            for row in full[1:]:
                conn.execute(
                    theirs.counters.update().values(
                        started=theirs.counters.c.started + row["started"],
                        response_ms_total=theirs.counters.c.response_ms_total
                        + row["response_ms_total"],
                    )
                )
            writer.write(
                conn,
                ours.steps,
                PUT,
                [{"flow_id": "f", "step": "a", "entered": 1, "moved_on": 0, "dropped": 0}],
            )
            writer.write(
                conn,
                ours.steps,
                PUT,
                [{"flow_id": "f", "step": "a", "entered": 2, "moved_on": 1, "dropped": 0}],
            )
            for name in ("history", "counters"):
                mine, other = getattr(ours, name), getattr(theirs, name)
                keys = list(mine.primary_key.columns)
                assert conn.execute(select(mine).order_by(*keys)).all() == (
                    conn.execute(select(other).order_by(*other.primary_key.columns)).all()
                )
            assert conn.execute(select(ours.steps.c.entered, ours.steps.c.moved_on)).all() == [
                (2, 1)
            ]
            if engine.dialect.name == "sqlite":  # the very text SQLAlchemy stores, row by row
                stored = select(text("timestamp || payload || meta"))
                mine, other = ours.history, theirs.history
                assert conn.execute(
                    stored.select_from(mine).order_by(*mine.primary_key.columns)
                ).all() == (
                    conn.execute(
                        stored.select_from(other).order_by(*other.primary_key.columns)
                    ).all()
                )

    check()
