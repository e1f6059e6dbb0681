"""Migrating running instances to another definition version, on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest

from flowstore import (
    FlowNotFoundError,
    FlowStatus,
    FlowStore,
    HistoryKind,
    InstanceMigration,
    InvalidArgumentError,
    InvalidStepError,
)
from flowstore.adapters.cli import main
from tests.flows import Clock, onboarding

FLOW = "user-onboarding"


def renamed() -> dict[str, Any]:
    """Version 2's steps: `preferences` renamed to `prefs`, everything else as in version 1."""
    steps = onboarding()["steps"]
    steps["prefs"] = {**steps.pop("preferences"), "step": "prefs"}
    steps["profile-setup"]["transitions"]["continue"]["step"] = "prefs"
    return steps


def place(store: FlowStore, user: str, *transitions: str) -> None:
    for transition in transitions:
        store.execute_transition(user, FLOW, transition)


def where(store: FlowStore, user: str) -> tuple[str, int | None, FlowStatus]:
    state = store.get_flow_state(user, FLOW)
    assert state is not None
    return state.step, state.definition_version, state.status


def test_kept_steps_map_to_themselves_and_each_move_is_an_event(store: FlowStore) -> None:
    place(store, "ann", "start")
    place(store, "bob", "start", "skip")
    store.update_flow(FLOW, {"ttl": 600})
    before = store.get_flow_state("ann", FLOW)
    report = store.migrate_flows(FLOW, 2)
    assert [(m.user_id, m.from_step, m.to_step) for m in report.migrated] == [
        ("ann", "profile-setup", "profile-setup"),
        ("bob", "verification", "verification"),
    ]
    assert (report.unmappable, report.skipped, report.dry_run) == ([], 0, False)
    assert where(store, "ann") == ("profile-setup", 2, FlowStatus.ACTIVE)
    after = store.get_flow_state("ann", FLOW)
    assert after is not None
    assert before is not None
    assert after.version == before.version + 1  # one event
    assert (after.started_at, after.payload, after.ok) == (
        before.started_at,
        before.payload,
        before.ok,
    )
    last = store.get_flow_history("ann", FLOW)[-1]
    assert (last.kind, last.from_step, last.to_step, last.transition, last.success) == (
        HistoryKind.MIGRATION,
        "profile-setup",
        "profile-setup",
        "",
        True,
    )
    assert last.metadata["from_version"] == 1
    assert last.metadata["definition_version"] == 2
    # A migration to the same step is no entry in the funnel.
    funnel = {step.step: step for step in store.get_flow_funnel(FLOW)}
    assert (funnel["profile-setup"].entered, funnel["profile-setup"].moved_on) == (2, 1)  # bob
    assert funnel["profile-setup"].current == 1  # ann
    assert store.verify_projections() == []


def test_step_map_moves_renamed_steps_and_the_funnel_counts_the_entry(store: FlowStore) -> None:
    place(store, "ann", "start", "continue")  # at preferences, which version 2 calls prefs
    store.update_flow(FLOW, {"steps": renamed()})
    report = store.migrate_flows(FLOW, 2, {"preferences": "prefs"})
    assert report.migrated == [
        InstanceMigration(
            user_id="ann", from_version=1, from_step="preferences", to_version=2, to_step="prefs"
        )
    ]
    assert where(store, "ann") == ("prefs", 2, FlowStatus.ACTIVE)
    funnel = {step.step: step for step in store.get_flow_funnel(FLOW)}
    assert (funnel["preferences"].entered, funnel["preferences"].moved_on) == (1, 1)
    assert (funnel["prefs"].entered, funnel["prefs"].current) == (1, 1)
    assert funnel["preferences"].dropped == 0  # the run goes on: no drop-out
    popular = {s.step: s.count for s in store.get_flow_statistics(FLOW).popular_steps}
    assert popular["prefs"] == 1
    # The instance now runs on version 2's edges.
    assert store.execute_transition("ann", FLOW, "save").step == "verification"
    assert store.verify_projections() == []
    live = store.get_flow_history("ann", FLOW)
    store.rebuild_projections()
    assert store.get_flow_history("ann", FLOW) == live


def test_unmappable_instances_are_reported_and_left_alone(store: FlowStore) -> None:
    place(store, "ann", "start", "continue")  # at preferences
    place(store, "bob", "start")  # at profile-setup
    store.update_flow(FLOW, {"steps": renamed()})
    ann_before = store.get_flow_state("ann", FLOW)
    ann_history = store.get_flow_history("ann", FLOW)
    report = store.migrate_flows(FLOW, 2)
    assert [m.user_id for m in report.migrated] == ["bob"]
    assert len(report.unmappable) == 1
    stuck = report.unmappable[0]
    assert (stuck.user_id, stuck.from_step, stuck.to_step) == ("ann", "preferences", None)
    assert stuck.reason is not None
    assert "'preferences' does not exist in version 2" in stuck.reason
    assert store.get_flow_state("ann", FLOW) == ann_before
    assert store.get_flow_history("ann", FLOW) == ann_history
    # Still running on version 1, where its step exists.
    assert store.execute_transition("ann", FLOW, "save").definition_version == 1


def test_a_dry_run_reports_the_same_and_writes_nothing(store: FlowStore) -> None:
    place(store, "ann", "start", "continue")
    place(store, "bob", "start")
    place(store, "cat", "start", "skip")
    store.update_flow(FLOW, {"steps": renamed()})
    steps = onboarding()["steps"]
    del steps["preferences"]
    steps["profile-setup"]["transitions"].pop("continue")
    store.update_flow(FLOW, {"steps": steps})  # version 3: no preferences at all
    position = store.log_position()
    dry = store.migrate_flows(FLOW, 3, dry_run=True)
    assert store.log_position() == position
    assert where(store, "bob") == ("profile-setup", 1, FlowStatus.ACTIVE)
    real = store.migrate_flows(FLOW, 3)
    assert dry.dry_run
    assert dry.model_copy(update={"dry_run": False}) == real
    assert [m.user_id for m in real.unmappable] == ["ann"]
    assert store.log_position() > position


def test_completed_and_already_migrated_instances_are_not_touched(store: FlowStore) -> None:
    place(store, "ann", "start", "skip", "complete")  # completed on version 1
    place(store, "bob", "start")
    store.update_flow(FLOW, {"ttl": 60})
    assert [m.user_id for m in store.migrate_flows(FLOW, 2).migrated] == ["bob"]
    again = store.migrate_flows(FLOW, 2)
    assert (again.migrated, again.unmappable, again.skipped) == ([], [], 1)
    assert where(store, "ann") == ("completed", 1, FlowStatus.COMPLETED)
    # Back to version 1 is a migration too.
    assert [m.to_version for m in store.migrate_flows(FLOW, 1).migrated] == [1]
    assert where(store, "bob") == ("profile-setup", 1, FlowStatus.ACTIVE)


def test_landing_on_a_terminal_step_completes_the_run(store: FlowStore, clock: Clock) -> None:
    place(store, "ann", "start", "skip")  # at verification
    steps = onboarding()["steps"]
    steps["verification"]["transitions"] = {}  # version 2 ends at verification
    del steps["completed"]
    store.update_flow(FLOW, {"steps": steps})
    clock.advance(30)
    store.migrate_flows(FLOW, 2)
    state = store.get_flow_state("ann", FLOW)
    assert state is not None
    assert (state.step, state.status, state.completed_at) == (
        "verification",
        FlowStatus.COMPLETED,
        clock.now,
    )
    stats = store.get_flow_statistics(FLOW)
    assert stats.completion_rate == 1.0
    assert stats.average_flow_duration == 30_000
    assert store.verify_projections() == []


def test_bad_arguments_write_nothing(store: FlowStore) -> None:
    place(store, "ann", "start")
    store.update_flow(FLOW, {"steps": renamed()})
    position = store.log_position()
    with pytest.raises(InvalidStepError, match="'nowhere'"):
        store.migrate_flows(FLOW, 2, {"preferences": "nowhere"})
    with pytest.raises(FlowNotFoundError, match="no version 9"):
        store.migrate_flows(FLOW, 9)
    with pytest.raises(InvalidArgumentError):
        store.migrate_flows(FLOW, "2")  # type: ignore[arg-type]
    with pytest.raises(FlowNotFoundError):
        store.migrate_flows("nope", 1)
    assert store.log_position() == position


def test_a_user_moving_during_a_migration_is_migrated_from_where_they_are(
    store_url: str,
) -> None:
    """The move is decided again after a conflicting write, like any command on an instance."""
    with FlowStore(store_url) as setup:
        setup.create_flow(onboarding())
        place(setup, "ann", "start")  # at profile-setup
        setup.update_flow(FLOW, {"steps": renamed()})
    other = FlowStore(store_url)
    armed = False

    def clock() -> datetime:
        # Read after the instance is loaded and before the append: ann moves on in between.
        nonlocal armed
        if armed:
            armed = False
            other.execute_transition("ann", FLOW, "continue")  # to preferences (version 1)
        return datetime.now(UTC)

    with FlowStore(store_url, clock=clock) as store:
        armed = True
        report = store.migrate_flows(FLOW, 2, {"preferences": "prefs"})
        assert [(m.from_step, m.to_step) for m in report.migrated] == [("preferences", "prefs")]
        assert where(store, "ann") == ("prefs", 2, FlowStatus.ACTIVE)
        kinds = [(h.kind, h.to_step) for h in store.get_flow_history("ann", FLOW)]
        assert kinds[-2:] == [
            (HistoryKind.TRANSITION, "preferences"),
            (HistoryKind.MIGRATION, "prefs"),
        ]
    other.close()


def test_a_reopened_store_sees_the_migrated_instance(store_url: str) -> None:
    with FlowStore(store_url) as first:
        first.create_flow(onboarding())
        place(first, "ann", "start", "continue")
        first.update_flow(FLOW, {"steps": renamed()})
        first.migrate_flows(FLOW, 2, {"preferences": "prefs"})
        state = first.get_flow_state("ann", FLOW)
    with FlowStore(store_url) as second:
        assert second.get_flow_state("ann", FLOW) == state
        assert second.get_user_flows("ann")[0].step == "prefs"  # the table row names a v2 step


def test_cli_migrate_with_a_map_and_a_dry_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"sqlite:///{tmp_path}/cli.db"
    with FlowStore(url) as store:
        store.create_flow(onboarding())
        place(store, "ann", "start", "continue")
        place(store, "bob", "start")
        store.update_flow(FLOW, {"steps": renamed()})
    assert main(["--url", url, "flows", "migrate", FLOW, "--to", "2", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "would migrate bob" in out
    assert "left ann at preferences" in out
    assert "dry run" in out
    code = main(
        [
            "--url",
            url,
            "--json",
            "flows",
            "migrate",
            FLOW,
            "--to",
            "2",
            "--map",
            "preferences=prefs",
        ]
    )
    report = orjson.loads(capsys.readouterr().out)
    assert code == 0
    assert sorted(m["toStep"] for m in report["migrated"]) == ["prefs", "profile-setup"]
    assert report["unmappable"] == []
    assert main(["--url", url, "flows", "migrate", FLOW, "--to", "2", "--map", "nonsense"]) == 2
