"""flowstore.telemetry: outcomes, the observers' fan-out, and nothing done when nobody observes."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pytest

from flowstore.errors import (
    ConcurrencyConflictError,
    FlowNotFoundError,
    InvalidTransitionError,
    StorageUnavailableError,
)
from flowstore.telemetry import Observers, StoreObserver, outcome_of


def test_outcomes_tell_a_callers_mistake_from_a_failure() -> None:
    assert outcome_of(None) == "accepted"
    assert outcome_of(FlowNotFoundError("f")) == "rejected"
    assert outcome_of(InvalidTransitionError("s", "t", flow_id="f", user_id="u")) == "rejected"
    assert outcome_of(ConcurrencyConflictError("u", "f", 3)) == "error"
    assert outcome_of(StorageUnavailableError("postgres", "saving", "down")) == "error"
    assert outcome_of(RuntimeError("bug")) == "error"


class Recorder(StoreObserver):
    def __init__(self) -> None:
        self.commands: list[tuple[str, str]] = []
        self.spans: list[tuple[str, dict[str, Any]]] = []

    def command(self, kind: str, outcome: str, seconds: float) -> None:
        assert seconds >= 0
        self.commands.append((kind, outcome))

    @contextlib.contextmanager
    def span(self, name: str, attributes: dict[str, Any]) -> Iterator[Any]:
        recorded = dict(attributes)
        self.spans.append((name, recorded))
        yield recorded.__setitem__


def test_a_command_is_told_once_with_its_outcome_and_its_span_gets_it_too() -> None:
    observers, recorder = Observers(), Recorder()
    remove = observers.add(recorder)
    with observers.observe_command("transition", "f"):
        pass
    with pytest.raises(RuntimeError), observers.observe_command("reset", "g"):
        raise RuntimeError("bug")
    assert recorder.commands == [("transition", "accepted"), ("reset", "error")]
    assert [attributes["flowstore.command.outcome"] for _, attributes in recorder.spans] == [
        "accepted",
        "error",
    ]
    remove()
    assert not observers.active
    with observers.observe_command("transition", "f"):
        pass
    assert len(recorder.commands) == 2


def test_without_observers_a_span_is_one_shared_null_context() -> None:
    observers = Observers()
    assert observers.span("a") is observers.span("b", x=1)


def test_a_failing_observer_is_logged_and_the_others_are_still_told(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Broken(StoreObserver):
        def command(self, kind: str, outcome: str, seconds: float) -> None:
            raise RuntimeError("observer bug")

    observers, recorder = Observers(), Recorder()
    observers.add(Broken())
    observers.add(recorder)
    with observers.observe_command("transition", "f"):
        pass  # the command itself succeeds
    assert recorder.commands == [("transition", "accepted")]
    assert "observer bug" in caplog.text
