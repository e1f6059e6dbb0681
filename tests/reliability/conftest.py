"""Fixtures of the reliability tests (the rest of their harness is `tests.reliability.harness`)."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.pgserver import PostgresServer
from tests.reliability.harness import Figures, RestartablePostgres


@pytest.fixture
def figures(request: pytest.FixtureRequest) -> Figures:
    """Where a test records its figures."""
    return Figures(request.node.nodeid)


_counter = itertools.count(1)


@pytest.fixture(params=["sqlite", "postgres"], ids=["sqlite", "postgres"])
def new_database(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[], str]:
    """A factory of URLs of fresh, empty databases on one backend (one per hypothesis example)."""
    if request.param == "sqlite":
        return lambda: f"sqlite:///{tmp_path / f'store-{next(_counter)}.db'}"
    server: PostgresServer = request.getfixturevalue("pg_server")
    return server.create_database


@pytest.fixture(scope="module")
def restartable_pg() -> Iterator[RestartablePostgres]:
    """A PostgreSQL server for one test module; the session's server is never stopped."""
    with PostgresServer.start() as server:
        handle = RestartablePostgres(server)
        yield handle
        if not server._running:
            handle.start()  # so that its own stop() shuts it down and cleans up
