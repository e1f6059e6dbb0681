"""The figures behind the console's pictures (`console.insights`, `console.charts`), on both backends.

Each figure is checked against what the test computes from the users' histories, with a clock
the test moves, so bucket edges, stays and idle times are exact.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import Iterator
from datetime import datetime, timedelta

import pytest

from flowstore import FlowStore, InvalidArgumentError, InvalidTransitionError
from flowstore.adapters.http.console.charts import Series, bar_chart, line_chart, nice_ceiling
from flowstore.adapters.http.console.insights import (
    ACTIVITY_WINDOWS,
    activity,
    dwell,
    idle_by_step,
    list_instances,
)
from flowstore.projections.ops import bin_value, response_bin
from flowstore.projections.queries import histogram_percentile, percentile
from tests.flows import Clock, onboarding

ONBOARDING = "user-onboarding"

HOUR = ACTIVITY_WINDOWS[0]
assert HOUR.key == "1h"


@pytest.fixture
def fresh(store_url: str, clock: Clock) -> Iterator[FlowStore]:
    """A store of its own on a fresh database (both backends), the onboarding flow defined."""
    with FlowStore(store_url, clock=clock) as store:
        store.create_flow(onboarding())
        yield store


def test_activity_counts_each_minute_with_events_on_its_first_second(
    fresh: FlowStore, clock: Clock
) -> None:
    clock.now = clock.now.replace(hour=10, minute=0, second=0, microsecond=0)
    start = clock.now
    fresh.execute_transition("a", ONBOARDING, "start")  # 10:00:00 exactly: that minute
    clock.advance(59.999)
    fresh.execute_transition("a", ONBOARDING, "skip")  # still 10:00
    clock.advance(0.001)
    with pytest.raises(InvalidTransitionError):
        fresh.execute_transition("a", ONBOARDING, "teleport")  # 10:01:00
    fresh.execute_transition("a", ONBOARDING, "complete", ok=False)  # completes at 10:01, failing
    clock.advance(120)
    fresh.execute_transition("b", ONBOARDING, "start")  # 10:03

    figures = activity(fresh, ONBOARDING, HOUR, now=clock.now)
    buckets = figures.buckets
    assert len(buckets) == 60
    assert [b.start for b in buckets] == [
        clock.now.replace(second=0) - timedelta(minutes=59 - i) for i in range(60)
    ]
    by_minute = {b.start: b for b in buckets}
    first, second, fourth = (by_minute[start + timedelta(minutes=m)] for m in (0, 1, 3))
    assert (first.transitions, first.rejections, first.completions) == (2, 0, 0)
    assert (second.transitions, second.rejections, second.completions) == (1, 1, 1)
    assert second.errors == 1  # the accepted transition said its step failed
    assert second.error_rate == 1.0  # (1 rejection + 1 error) / 2 attempts
    assert first.errors == 0
    assert (fourth.transitions, fourth.rejections) == (1, 0)
    assert sum(b.attempts for b in buckets) == 5

    history = fresh.get_flow_history("a", ONBOARDING)
    times = sorted(r.metadata["elapsed_ms"] for r in history[1:3])  # start, skip at 10:00
    # From the histogram: the middle of the bin of the nearest-rank value (of two: the lower).
    assert first.p50_ms == bin_value(response_bin(times[0]))
    assert first.p95_ms == bin_value(response_bin(times[1]))
    assert first.p50_ms == pytest.approx(times[0], rel=0.0443)


def test_activity_per_day_sums_the_minutes(fresh: FlowStore, clock: Clock) -> None:
    for user in range(6):
        fresh.execute_transition(f"u{user}", ONBOARDING, "start")
        clock.advance(5 * 3600)  # spread over more than one day
    month = next(w for w in ACTIVITY_WINDOWS if w.key == "30d")
    days = activity(fresh, ONBOARDING, month, now=clock.now).buckets
    assert len(days) == 30
    assert sum(b.transitions for b in days) == 6
    assert [b.transitions for b in days if b.transitions] == [5, 1]  # at 0-20 h, then 25 h


def test_dwell_is_the_time_on_a_step_before_moving_on(fresh: FlowStore, clock: Clock) -> None:
    since = clock.now
    for user, stay in (("a", 30), ("b", 90), ("c", 600)):
        fresh.execute_transition(user, ONBOARDING, "start")
        clock.advance(stay)
        with pytest.raises(InvalidTransitionError):
            fresh.execute_transition(user, ONBOARDING, "nope")  # a refusal does not move the run
        clock.advance(stay)
        fresh.execute_transition(user, ONBOARDING, "continue")
    fresh.execute_transition("d", ONBOARDING, "start")  # still on profile-setup: no stay yet

    stays = dwell(fresh, ONBOARDING, since=since)
    profile = stays["profile-setup"]
    assert profile.moves == 3
    assert profile.p50_ms == 180_000  # stays of 60 s, 180 s and 1200 s
    assert profile.p95_ms == 1_200_000
    assert profile.histogram == [0, 0, 0, 2, 1, 0, 0]  # bins hold values below their top
    assert stays["welcome"].p95_ms == 0  # the first move of a run comes with its start
    assert dwell(fresh, ONBOARDING, since=clock.now + timedelta(seconds=1)) == {}

    # A stay that began before the window and ended in it counts whole.
    fresh.execute_transition("e", ONBOARDING, "start")
    clock.advance(100)
    window = clock.now
    clock.advance(50)
    fresh.execute_transition("e", ONBOARDING, "skip")
    late = dwell(fresh, ONBOARDING, since=window)
    assert late["profile-setup"].moves == 1
    assert late["profile-setup"].p50_ms == 150_000


def test_idle_runs_per_step_and_their_pages_longest_idle_first(
    fresh: FlowStore, clock: Clock
) -> None:
    users = [f"user-{i}" for i in range(7)]
    for user in users:
        fresh.execute_transition(user, ONBOARDING, "start")  # onto profile-setup
        clock.advance(600)
    fresh.execute_transition(users[-1], ONBOARDING, "continue")  # onto preferences
    now = clock.now

    idle = idle_by_step(fresh, ONBOARDING, idle_for=timedelta(minutes=45), now=now)
    # On profile-setup: six runs last moved 70, 60, ..., 20 minutes ago; three of them over 45.
    assert idle["profile-setup"].active == 6
    assert idle["profile-setup"].idle == 3
    assert idle["profile-setup"].oldest == now - timedelta(minutes=70)
    assert idle["profile-setup"].histogram == [0, 0, 0, 0, 4, 2, 0]
    assert idle["preferences"].idle == 0

    seen: list[str] = []
    cursor = None
    for _ in range(5):
        page = list_instances(
            fresh,
            ONBOARDING,
            step="profile-setup",
            idle_for=timedelta(minutes=45),
            limit=2,
            cursor=cursor,
            now=now,
        )
        seen += [row.user_id for row in page.rows]
        assert all(row.step == "profile-setup" for row in page.rows)
        cursor = page.next_cursor
        if cursor is None:
            break
    assert seen == users[:3]  # longest idle first, each once
    moments = [
        r.updated_at for r in list_instances(fresh, ONBOARDING, step="profile-setup", now=now).rows
    ]
    assert moments == sorted(moments)
    assert all(a < b for a, b in itertools.pairwise(moments))


@pytest.mark.parametrize("cursor", ["!!", "e30", "WyJ4IiwxXQ", ""])
def test_a_cursor_not_made_by_the_page_is_refused(fresh: FlowStore, cursor: str) -> None:
    with pytest.raises(InvalidArgumentError):
        list_instances(fresh, ONBOARDING, cursor=cursor or "=")


def test_the_queries_know_unknown_flows() -> None:
    from flowstore import FlowNotFoundError

    with FlowStore("memory://", clock=Clock()) as store:
        with pytest.raises(FlowNotFoundError):
            activity(store, "nope", HOUR)
        with pytest.raises(FlowNotFoundError):
            list_instances(store, "nope")


# Charts


def test_nice_ceilings() -> None:
    assert [nice_ceiling(v) for v in (0, 0.3, 1, 3, 7, 11, 26, 240, 1001)] == [
        1,
        0.5,
        1,
        5,
        10,
        20,
        50,
        250,
        2000,
    ]


def test_a_line_chart_has_a_point_per_value_and_escapes_its_text(clock: Clock) -> None:
    starts = [clock.now + timedelta(minutes=i) for i in range(3)]
    chart = line_chart(
        'a <"chart"> & more',
        starts,
        [Series("n", "n <x>", [1, 4, 2], "#000"), Series("m", "m", [0, 0, 3], "#111", "2,2")],
        time_format="%H:%M",
        chart_id="c1",
    )
    assert chart.count('class="point"') == 6
    assert 'data-series="n" data-index="1" data-at="' in chart
    assert 'data-value="4"' in chart
    assert 'data-max="5"' in chart
    assert "<x>" not in chart
    assert "a &lt;&quot;chart&quot;&gt; &amp; more" in chart
    histogram = bar_chart("h", ["<1s", "b"], [3, 0], colour="#000", chart_id="h1")
    assert histogram.count('class="bin"') == 2
    assert "&lt;1s" in histogram


def test_a_missing_value_is_a_gap_in_the_line(clock: Clock) -> None:
    starts = [clock.now + timedelta(minutes=i) for i in range(5)]
    chart = line_chart(
        "gaps",
        starts,
        [Series("p50", "p50", [1, 2, None, 3, None], "#000")],
        time_format="%H:%M",
        chart_id="g",
    )
    assert chart.count('class="point"') == 3
    assert chart.count("<polyline") == 1  # 1-2 joined; 3 stands alone
    assert 'data-index="2"' not in chart


def test_stays_are_a_sample_of_the_latest_moves(fresh: FlowStore, clock: Clock) -> None:
    since = clock.now
    for user, stay in (("a", 10), ("b", 20), ("c", 30)):
        fresh.execute_transition(user, ONBOARDING, "start")
        clock.advance(stay)
        fresh.execute_transition(user, ONBOARDING, "continue")
        clock.advance(1)
    # The three latest moves (b's continue, c's start and continue): a's stay is left out.
    latest = dwell(fresh, ONBOARDING, since=since, sample=3)
    assert latest["profile-setup"].moves == 2
    assert latest["profile-setup"].p95_ms == 30_000
    assert latest["profile-setup"].since > since
    assert dwell(fresh, ONBOARDING, since=since)["profile-setup"].moves == 3


def test_long_windows_read_hours_and_merge_their_histograms(fresh: FlowStore, clock: Clock) -> None:
    per_day: defaultdict[datetime, list[float]] = defaultdict(list)
    for user in range(6):
        for name in ("start", "skip", "complete"):
            fresh.execute_transition(f"u{user}", ONBOARDING, name)
            clock.advance(600)
        clock.advance(5 * 3600)  # six runs over 30 hours and more: two or three days
    for user in range(6):
        for row in fresh.get_flow_history(f"u{user}", ONBOARDING):
            if row.kind == "transition":
                day = row.timestamp.replace(hour=0, minute=0, second=0, microsecond=0)
                per_day[day].append(row.metadata["elapsed_ms"])
    month = next(w for w in ACTIVITY_WINDOWS if w.key == "30d")
    days = {b.start: b for b in activity(fresh, ONBOARDING, month, now=clock.now).buckets}
    assert {d for d, b in days.items() if b.attempts} == set(per_day)
    for day, times in per_day.items():
        assert days[day].transitions == len(times)
        # A day's percentiles are over all its attempts: its hours' histograms merged.
        for q, got in ((50, days[day].p50_ms), (95, days[day].p95_ms)):
            assert got == bin_value(response_bin(percentile(times, q)))
    assert sum(b.completions for b in days.values()) == 6
    week = next(w for w in ACTIVITY_WINDOWS if w.key == "7d")
    hours = [b for b in activity(fresh, ONBOARDING, week, now=clock.now).buckets if b.attempts]
    assert sum(b.transitions for b in hours) == 18


def test_histogram_percentiles_are_the_bins_of_the_exact_ones() -> None:
    from hypothesis import given
    from hypothesis import strategies as st

    @given(
        st.lists(st.floats(min_value=0, max_value=1e7, allow_nan=False), min_size=1),
        st.sampled_from([50, 95, 99, 1, 100]),
    )
    def check(values: list[float], q: float) -> None:
        counts: dict[int, int] = {}
        for value in values:
            counts[response_bin(value)] = counts.get(response_bin(value), 0) + 1
        exact = percentile(values, q)
        assert histogram_percentile(counts, q) == bin_value(response_bin(exact))
        if 1e-3 <= exact <= 4e6:  # inside the histogram's range: within 4.4%
            assert histogram_percentile(counts, q) == pytest.approx(exact, rel=0.0443)

    check()
