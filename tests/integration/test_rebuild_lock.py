"""One rebuild at a time across processes; a failed rebuild leaves no shadow tables; a full disk
under a rebuild is STORAGE_UNAVAILABLE (exit 9), not a traceback."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from typing import Any

import pytest
from sqlalchemy import create_engine, inspect
from sqlalchemy.exc import OperationalError

from flowstore import FlowStore, RebuildRunningError, StorageUnavailableError
from flowstore.adapters.cli import main
from flowstore.adapters.errors import mapping_for
from flowstore.projections.sql import SqlProjections
from flowstore.projections.tables import REBUILD_SUFFIX
from flowstore.storage import parse_url
from tests.flows import linear

# A rebuild in another process that stops after its first page until told to go on.
_HOLDING_REBUILD = textwrap.dedent(
    """
    import sys
    from flowstore import FlowStore

    def progress(done, position):
        if done and not getattr(progress, "held", False):
            progress.held = True
            print("rebuilding", flush=True)
            sys.stdin.readline()

    with FlowStore(sys.argv[1]) as store:
        print(store.rebuild_projections(progress), flush=True)
    """
)


def populate(store: FlowStore, users: int = 30) -> None:
    store.create_flow(linear("line", 4))
    for number in range(users):
        store.execute_transition(f"u{number}", "line", "next", {"n": number})


def tables(url: str) -> set[str]:
    config = parse_url(url)
    engine = create_engine(config.sqlalchemy_url or "")
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def test_a_second_rebuild_while_one_runs_in_another_process_is_refused(store_url: str) -> None:
    with FlowStore(store_url) as store:
        populate(store)
        holder = subprocess.Popen(
            [sys.executable, "-c", _HOLDING_REBUILD, store_url],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert holder.stdout is not None
            assert holder.stdin is not None
            assert holder.stdout.readline().strip() == "rebuilding"
            with pytest.raises(RebuildRunningError):
                store.rebuild_projections()
            # The command line says so with its exit code, and changes nothing either.
            assert (
                main(["--url", store_url, "projections", "rebuild"])
                == mapping_for(RebuildRunningError("x")).exit_code
            )
            holder.stdin.write("go on\n")
            holder.stdin.flush()
            assert holder.stdout.readline().strip() == str(store.log_position())
            assert holder.wait(timeout=60) == 0
        finally:
            if holder.poll() is None:
                holder.kill()
                holder.wait()
        assert store.verify_projections() == []
        assert store.rebuild_projections() == store.log_position()  # free again
        assert store.verify_projections() == []


def test_a_failed_rebuild_drops_its_shadow_tables(
    store_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with FlowStore(store_url) as store:
        populate(store)
        before = tables(store_url)
        original = SqlProjections._write

        # Every batch of rows, live or rebuilt, is written by `_write`: the rebuild's fail.
        def write(self: SqlProjections, conn: Any, target: Any, *args: Any, **kwargs: Any) -> Any:
            if target is not self.tables:
                raise RuntimeError("the rebuild fails half-way")
            return original(self, conn, target, *args, **kwargs)

        monkeypatch.setattr(SqlProjections, "_write", write)
        with pytest.raises(RuntimeError):
            store.rebuild_projections()
        assert tables(store_url) == before
        assert not any(name.endswith(REBUILD_SUFFIX) for name in tables(store_url))
        monkeypatch.undo()
        store.execute_transition("late", "line", "next")  # the store still works
        assert store.verify_projections() == []


def test_a_full_disk_under_a_rebuild_is_storage_unavailable(
    store_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with FlowStore(store_url) as store:
        populate(store, users=3)

    def full(self: SqlProjections, conn: Any, target: Any, *args: Any, **kwargs: Any) -> Any:
        raise OperationalError("INSERT ...", {}, Exception("database or disk is full"))

    monkeypatch.setattr(SqlProjections, "_write", full)  # where every batch of rows is written
    with (
        FlowStore(store_url) as store,
        pytest.raises(StorageUnavailableError, match="disk is full"),
    ):
        store.rebuild_projections()
    code = main(["--url", store_url, "projections", "rebuild"])
    assert code == mapping_for(StorageUnavailableError("x", "y", "z")).exit_code == 9
    assert not any(name.endswith(REBUILD_SUFFIX) for name in tables(store_url))
