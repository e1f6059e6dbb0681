"""The store's queries: a user's state from the log; lists, history, statistics and funnels from
the tables (`FlowStore.get_flow_state`, `get_user_flows`, `list_instances`, ...).

Arguments are checked here (`flowstore.paging`), rows come from `flowstore.projections`; a query on
an unknown flow raises `FlowNotFoundError` rather than answering with nothing.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

from flowstore.domain import FlowInstance, FlowVersions, definition_id, instance_id
from flowstore.errors import FlowStateCorruptionError, InvalidArgumentError
from flowstore.inputs import require_id
from flowstore.models import (
    FlowState,
    FlowStateHistory,
    FlowStatistics,
    FlowStatus,
    FunnelStep,
    HistoryKind,
    InstancePage,
)
from flowstore.opening import Parts
from flowstore.paging import (
    MAX_PAGE,
    check_aware,
    check_kinds,
    check_limit,
    check_listed_status,
    decode_instance_cursor,
    encode_instance_cursor,
    history_bound,
    idle_seconds,
)
from flowstore.views import instance_state

__all__ = [
    "get_flow_funnel",
    "get_flow_history",
    "get_flow_state",
    "get_flow_statistics",
    "get_user_flows",
    "list_instances",
    "recover_flow_state",
]


def get_flow_state(parts: Parts, user_id: str, flow_id: str) -> FlowState | None:
    """`FlowStore.get_flow_state`: the user's live instance, read from the log."""
    require_id(user_id, "user_id")
    require_id(flow_id, "flow_id")
    instance = parts.log.get(instance_id(user_id, flow_id), FlowInstance)
    return instance_state(instance) if instance is not None and instance.is_live else None


def get_user_flows(parts: Parts, user_id: str, status: FlowStatus | str | None) -> list[FlowState]:
    """`FlowStore.get_user_flows`: the user's rows of the `flow_states` table."""
    require_id(user_id, "user_id")
    wanted = check_listed_status(status, default=None)
    return [_state_of(parts, row) for row in parts.tables.user_flows(user_id, wanted)]


def _state_of(parts: Parts, row: dict[str, Any]) -> FlowState:
    versions = parts.log.get(definition_id(row["flow_id"]), FlowVersions)
    definition = versions.get(row["definition_version"]) if versions else None
    if definition is None or definition.step(row["step"]) is None:
        raise FlowStateCorruptionError(
            row["user_id"],
            row["flow_id"],
            f"projected step {row['step']!r} does not exist in definition version "
            f"{row['definition_version']}",
        )
    return FlowState.model_validate({**row, "flow": row["flow_id"]})


def list_instances(
    parts: Parts,
    flow_id: str,
    *,
    step: str | None,
    status: FlowStatus | str | None,
    idle_for: timedelta | float | None,
    limit: int,
    cursor: str | None,
) -> InstancePage:
    """`FlowStore.list_instances`: a page of the flow's rows of the `flow_states` table."""
    require_id(flow_id, "flow_id")
    if step is not None:
        require_id(step, "step")
    wanted = check_listed_status(status, default=FlowStatus.ACTIVE)
    assert wanted is not None
    size = check_limit(limit, maximum=MAX_PAGE)
    if size is None:
        raise InvalidArgumentError("limit", limit, "must be a positive integer")
    idle = idle_seconds(idle_for)
    after_user = decode_instance_cursor(cursor)
    parts.versions(flow_id)  # unknown flow -> FlowNotFoundError
    idle_since = parts.clock() - timedelta(seconds=idle) if idle is not None else None
    rows = parts.tables.instance_page(
        flow_id,
        status=wanted,
        step=step,
        idle_since=idle_since,
        after_user=after_user,
        limit=size + 1,  # one more: is there a next page?
    )
    states = [_state_of(parts, row) for row in rows[:size]]
    more = len(rows) > size
    next_cursor = encode_instance_cursor(rows[size - 1]["user_id"]) if more else None
    return InstancePage(instances=states, next_cursor=next_cursor)


def get_flow_history(
    parts: Parts,
    user_id: str,
    flow_id: str,
    *,
    limit: int | None,
    after: str | datetime | None,
    before: str | datetime | None,
    kinds: Iterable[HistoryKind | str] | None,
    max_bytes: int | None,
) -> list[FlowStateHistory]:
    """`FlowStore.get_flow_history`: the instance's history rows, a page of them, or those kinds."""
    require_id(user_id, "user_id")
    require_id(flow_id, "flow_id")
    size = check_limit(limit)
    iid = instance_id(user_id, flow_id)
    after_version, since = history_bound(after, "after", iid)
    before_version, until = history_bound(before, "before", iid)
    wanted = check_kinds(kinds)
    rows = parts.tables.history(
        user_id,
        flow_id,
        limit=size,
        after_version=after_version,
        before_version=before_version,
        since=since,
        until=until,
        kinds=wanted,
        max_bytes=max_bytes,
    )
    if not rows:
        parts.versions(flow_id)  # unknown flow -> FlowNotFoundError
    return rows


def get_flow_statistics(
    parts: Parts,
    flow_id: str | None,
    *,
    since: datetime | None,
    until: datetime | None,
    window: float,
) -> FlowStatistics:
    """`FlowStore.get_flow_statistics`: all time (rates over the last `window` seconds), or a window."""
    if flow_id is not None:
        parts.versions(flow_id)
    bounds = _window(parts, since, until)
    if bounds is None:
        return parts.tables.statistics(flow_id, now=parts.clock(), window=window)
    return parts.tables.window_statistics(flow_id, since=bounds[0], until=bounds[1])


def _window(
    parts: Parts, since: datetime | None, until: datetime | None
) -> tuple[datetime, datetime] | None:
    start, end = check_aware(since, "since"), check_aware(until, "until")
    if start is None and end is None:
        return None
    # Without `until`: everything so far, this very instant included (events are stamped by
    # the same clock, and a window ends before `until`).
    end = end or parts.clock() + timedelta(microseconds=1)
    start = start or datetime.fromtimestamp(0, UTC)
    if start >= end:
        raise InvalidArgumentError("since", since, f"must be before until ({end.isoformat()})")
    return start, end


def get_flow_funnel(
    parts: Parts, flow_id: str, *, since: datetime | None, until: datetime | None
) -> list[FunnelStep]:
    """`FlowStore.get_flow_funnel`: the steps of the latest version in order, then old ones."""
    definition = parts.versions(flow_id).latest
    window = _window(parts, since, until)
    funnel = (
        parts.tables.funnel(flow_id)
        if window is None
        else parts.tables.window_funnel(flow_id, since=window[0], until=window[1])
    )
    found = {step.step: step for step in funnel}
    order = sorted(definition.steps.values(), key=lambda step: step.index)
    known = [
        found.pop(
            step.step, FunnelStep(step=step.step, entered=0, moved_on=0, dropped=0, current=0)
        )
        for step in order
    ]
    return known + sorted(found.values(), key=lambda step: step.step)  # steps of old versions


def recover_flow_state(parts: Parts, user_id: str, flow_id: str) -> FlowState | None:
    """`FlowStore.recover_flow_state`: rebuild the instance's rows from its events, then read it."""
    require_id(user_id, "user_id")
    parts.versions(flow_id)
    iid = instance_id(user_id, flow_id)
    parts.tables.recover((user_id, flow_id), lambda: parts.log.events_of(iid), parts.read_contained)
    return get_flow_state(parts, user_id, flow_id)
