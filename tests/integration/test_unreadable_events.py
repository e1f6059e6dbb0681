"""One undecodable event: its instance answers FlowStateCorruptionError, everyone else keeps working,
`projections status` names it, and `flowstore quarantine` moves it aside with an audit record."""

from __future__ import annotations

import json

import pytest
from sqlalchemy import create_engine, select

from flowstore import FlowStateCorruptionError, FlowStore, InvalidArgumentError
from flowstore.adapters.cli import main
from flowstore.projections.tables import QUARANTINE
from flowstore.storage import parse_url
from tests.reliability.test_bad_input import corrupt, seed


@pytest.mark.parametrize("kind", ["bytes", "fields", "topic"])
def test_an_unreadable_event_is_contained_to_its_instance(
    store_url: str, kind: str, capsys: pytest.CaptureFixture[str]
) -> None:
    seed(store_url)
    with FlowStore(store_url) as store:
        ann_before = store.get_flow_state("ann", "f")
    corrupt(store_url, kind)
    with FlowStore(store_url) as store:  # opens, and projects past the bad event
        with pytest.raises(FlowStateCorruptionError):
            store.get_flow_state("ann", "f")
        assert store.get_flow_state("bob", "f") is not None
        store.execute_transition("bob", "f", "next")
        store.execute_transition("carol", "f", "next")
        assert [s.flow for s in store.get_user_flows("bob")] == ["f"]
        assert len(store.get_flow_history("carol", "f")) == 2
        assert store.verify_projections() == []
        store.rebuild_projections()
        assert store.verify_projections() == []
        (unreadable,) = store.unreadable_events()
        position = unreadable["position"]
        assert unreadable["originator_version"] == ann_before.version + 1  # type: ignore[union-attr]

    assert main(["--url", store_url, "--json", "projections", "status"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert [u["position"] for u in status["unreadable"]] == [position]

    # Only an event the projections found unreadable can be moved, and only with a reason.
    with FlowStore(store_url) as store:
        with pytest.raises(InvalidArgumentError):
            store.quarantine_event(1, "not unreadable")
        with pytest.raises(InvalidArgumentError):
            store.quarantine_event(position, " ")
    assert main(["--url", store_url, "quarantine", str(position), "--reason", "INC-42"]) == 0
    with FlowStore(store_url) as store:
        assert store.get_flow_state("ann", "f") == ann_before  # readable again, as it was
        store.execute_transition("ann", "f", "next")  # and writable
        assert store.unreadable_events() == []
        assert store.verify_projections() == []
    config = parse_url(store_url)
    engine = create_engine(config.sqlalchemy_url or "")
    try:
        with engine.connect() as conn:
            (audit,) = conn.execute(select(QUARANTINE)).all()
    finally:
        engine.dispose()
    assert (audit.position, audit.reason) == (position, "INC-42")
    assert audit.state  # the event's bytes, kept
