"""Shared fixtures: a session-wide throwaway PostgreSQL server and a per-test store URL.

Hypothesis profiles: ``ci`` (no deadline, not derandomized, 50 examples) and ``dev`` (Hypothesis
defaults). The profile is taken from ``$HYPOTHESIS_PROFILE``; without it, ``ci`` when ``$CI`` is
set (non-empty), else ``dev``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import settings

from flowstore import FlowStore
from flowstore.projections.sql import SqlProjections
from flowstore.storage import parse_url
from tests.flows import Clock, onboarding
from tests.pgserver import PostgresServer

# Explicit parents: a profile registered without one inherits whatever is active at the time, and
# Hypothesis itself activates its built-in "ci" profile on import when it detects a CI run.
# Ours keeps the built-in's print_blob, database=None and too_slow suppression.
settings.register_profile(
    "ci", settings.get_profile("ci"), deadline=None, derandomize=False, max_examples=50
)
settings.register_profile("dev", settings.get_profile("default"))
settings.load_profile(
    os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if os.environ.get("CI") else "dev")
)


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PostgresServer]:
    """One throwaway PostgreSQL cluster for the whole session, started on first use."""
    with PostgresServer.start() as server:
        yield server


@pytest.fixture(params=["sqlite", "postgres"], ids=["sqlite", "postgres"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A URL for a fresh, empty database: a new SQLite file or a new PostgreSQL database.

    SQLite: ``sqlite:///`` + the absolute file path (so four slashes in all, SQLAlchemy style).
    PostgreSQL: ``postgresql://user:password@127.0.0.1:PORT/dbname``; the server only starts when
    a postgres case runs.
    """
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'flowstore.db'}"
    server: PostgresServer = request.getfixturevalue("pg_server")
    return server.create_database()


@pytest.fixture
def tables(store_url: str) -> Iterator[SqlProjections]:
    """A second handle on the store's tables, to read, damage or rebuild them from outside."""
    handle = SqlProjections(parse_url(store_url))
    yield handle
    handle.close()


@pytest.fixture
def clock() -> Clock:
    """A UTC clock the test moves by hand."""
    return Clock()


@pytest.fixture
def store(store_url: str, clock: Clock) -> Iterator[FlowStore]:
    """A store on a fresh database (both backends) with the seed's onboarding flow defined.

    The payload limit is lowered to 1 KiB so that size checks need no megabyte payloads.
    """
    with FlowStore(store_url, clock=clock, max_payload_bytes=1024) as s:
        s.create_flow(onboarding())
        yield s
