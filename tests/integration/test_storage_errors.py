"""The database failing under the store: an outage is a `StorageUnavailableError` that wrote nothing,
and an append whose acknowledgement was lost counts once.

Faults are injected at the recorder, where eventsourcing raises them after its own retries, on both
backends; real ones where they are cheap: a read-only SQLite file (`chattr +i`, where allowed) and a
PostgreSQL port nobody listens on. The slow real outages (a server stopped under load) are in
`tests/reliability/test_faults.py`.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path

import pytest
import sqlalchemy.exc
from eventsourcing.persistence import IntegrityError, InterfaceError, OperationalError

from flowstore import FlowError, FlowStore, HistoryKind, StorageUnavailableError
from flowstore.adapters.cli import main
from flowstore.adapters.errors import ErrorMapping, mapping_for
from flowstore.eventlog import storage_errors
from flowstore.storage import parse_url
from flowstore.testing import Internals
from tests.flows import linear

FLOW = "user-onboarding"


# The error and its mapping


def test_storage_unavailable_is_a_flow_error_and_an_os_error() -> None:
    error = StorageUnavailableError("PostgreSQL", "appending events", "connection refused")
    assert isinstance(error, FlowError)
    assert isinstance(error, OSError)
    assert error.code == "STORAGE_UNAVAILABLE"
    assert error.message == "PostgreSQL is unavailable: appending events failed: connection refused"
    assert error.details == {
        "backend": "PostgreSQL",
        "action": "appending events",
        "reason": "connection refused",
    }


def test_storage_unavailable_is_503_and_exit_code_9() -> None:
    error = StorageUnavailableError("SQLite", "appending events", "disk I/O error")
    assert mapping_for(error) == ErrorMapping(http_status=503, exit_code=9)


def test_postgres_waits_2_seconds_per_attempt_for_a_connection_unless_the_url_says() -> None:
    assert parse_url("postgresql://u@h/db").env["POSTGRES_CONNECT_TIMEOUT"] == "2"
    assert parse_url("postgresql://u@h/db?connect_timeout=7").env["POSTGRES_CONNECT_TIMEOUT"] == "7"


def test_sqlalchemy_outages_are_storage_unavailable_too() -> None:
    cause = sqlalchemy.exc.OperationalError("SELECT 1", {}, Exception("server closed"))
    env = {"PERSISTENCE_MODULE": "eventsourcing.postgres"}
    with (
        pytest.raises(
            StorageUnavailableError, match=r"PostgreSQL .* reading failed: server closed$"
        ),
        storage_errors(env, "reading"),
    ):
        raise cause


def test_other_errors_pass_through_the_storage_check() -> None:
    with pytest.raises(IntegrityError), storage_errors({}, "appending events"):
        raise IntegrityError("a conflict is not an outage")


# Outages injected at the recorder (both backends)


def test_a_command_the_database_fails_raises_and_writes_nothing(store: FlowStore) -> None:
    before = store.execute_transition("ann", FLOW, "start")
    position = store.log_position()
    cause = OperationalError("server closed the connection unexpectedly")
    internals = Internals(store)
    with (
        internals.failing_appends(cause),
        pytest.raises(StorageUnavailableError, match="appending events failed") as caught,
    ):
        store.execute_transition("ann", FLOW, "continue")
    assert caught.value.__cause__ is cause
    assert caught.value.backend == ("SQLite" if store.config.backend == "sqlite" else "PostgreSQL")
    # No unsaved state is cached: the instance is read afresh, at the version the log holds.
    cached = internals.cached_instance("ann", FLOW)
    assert cached is None or cached.version == before.version
    assert store.log_position() == position
    assert store.get_flow_state("ann", FLOW) == before
    after = store.execute_transition("ann", FLOW, "continue")
    assert (after.step, after.version) == ("preferences", before.version + 1)


def test_a_command_whose_read_fails_raises(store: FlowStore) -> None:
    with (
        Internals(store).failing_reads(InterfaceError("connection is closed")),
        pytest.raises(StorageUnavailableError, match="reading FlowInstance"),
    ):
        store.execute_transition("bob", FLOW, "start")
    assert store.get_flow_state("bob", FLOW) is None


def test_a_definition_change_the_database_fails_raises_and_writes_nothing(
    store: FlowStore,
) -> None:
    with (
        Internals(store).failing_appends(OperationalError("disk I/O error")),
        pytest.raises(StorageUnavailableError, match="disk I/O error"),
    ):
        store.create_flow(linear("other"))
    assert [flow.flow for flow in store.list_flows()] == [FLOW]


# An append committed, its acknowledgement lost (both backends)


def test_a_transition_whose_acknowledgement_was_lost_is_applied_once(store: FlowStore) -> None:
    before = store.execute_transition("ann", FLOW, "start")
    position = store.log_position()
    with Internals(store).lost_acknowledgement() as appends:
        state = store.execute_transition("ann", FLOW, "continue", {"nonce": "once"})
    assert appends == [1]  # no second decision, no second append
    assert (state.step, state.version) == ("preferences", before.version + 1)
    appended = [event for _, event in store.read_events(position + 1)]
    assert [type(event).__name__ for event in appended] == ["TransitionExecuted"]
    assert getattr(appended[0], "payload", None) == {"nonce": "once"}
    assert store.get_flow_state("ann", FLOW) == state
    # The tables have it at once (the live projector was told), and once.
    transitions = [
        h.transition
        for h in store.get_flow_history("ann", FLOW)
        if h.kind is HistoryKind.TRANSITION
    ]
    assert transitions == ["start", "continue"]


def test_a_flow_definition_whose_acknowledgement_was_lost_is_created_once(
    store: FlowStore,
) -> None:
    with Internals(store).lost_acknowledgement():
        assert store.create_flow(linear("other")) == "other"  # not FlowExistsError from a retry
    assert [flow.flow for flow in store.list_flows()] == [FLOW, "other"]
    assert store.get_flow("other").version == 1


# Real faults, where they are cheap


@pytest.fixture
def read_only(tmp_path: Path) -> Callable[[list[Path]], AbstractContextManager[None]]:
    """`with read_only(paths):` the files are immutable (`chattr +i`: even root cannot write).

    Not a SQLite -shm file: SQLite maps it, and a write fault on an immutable mapping is SIGBUS.
    """
    probe = tmp_path / "probe"
    probe.write_text("x")
    if shutil.which("chattr") is None:
        pytest.skip("needs chattr")
    if subprocess.run(["chattr", "+i", str(probe)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not allowed here (needs CAP_LINUX_IMMUTABLE and ext4/xfs)")
    subprocess.run(["chattr", "-i", str(probe)], check=True)

    @contextlib.contextmanager
    def frozen(paths: list[Path]) -> Iterator[None]:
        existing = [str(p) for p in paths if p.exists()]
        subprocess.run(["chattr", "+i", *existing], check=True, capture_output=True)
        try:
            yield
        finally:
            subprocess.run(["chattr", "-i", *existing], check=True, capture_output=True)

    return frozen


def test_a_read_only_sqlite_database_refuses_commands_and_opening(
    tmp_path: Path,
    read_only: Callable[[list[Path]], AbstractContextManager[None]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    db = tmp_path / "store.db"
    url = f"sqlite:///{db}"
    with FlowStore(url) as store:
        store.create_flow(linear("line", steps=4))
        before = store.execute_transition("ann", "line", "next")
        with read_only([db, Path(f"{db}-wal")]):
            with pytest.raises(StorageUnavailableError, match="SQLite is unavailable") as caught:
                store.execute_transition("ann", "line", "next")
            assert isinstance(caught.value.__cause__, OperationalError)
            assert store.get_flow_state("ann", "line") == before
            with pytest.raises(StorageUnavailableError, match=r"store\.db is read-only"):
                FlowStore(url)
            assert main(["--url", url, "flows", "list"]) == 9
            assert "error[STORAGE_UNAVAILABLE]" in capsys.readouterr().err
        after = store.execute_transition("ann", "line", "next")  # writable again: on it goes
        assert after.version == before.version + 1


def test_opening_a_store_on_a_postgres_nobody_serves_raises_storage_unavailable() -> None:
    with socket.socket() as sock:  # a port that was free a moment ago: nothing listens there
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    began = time.monotonic()
    with pytest.raises(StorageUnavailableError, match=r"PostgreSQL .* opening the event store"):
        FlowStore(f"postgresql://flowstore@127.0.0.1:{port}/flowstore?connect_timeout=1")
    assert time.monotonic() - began < 10
