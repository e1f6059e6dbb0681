"""Fixtures of the process-level tests: a PostgreSQL database and a Kafka broker of their own."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.e2e.kafka.broker import TansuBroker
from tests.pgserver import PostgresServer


@pytest.fixture
def pg_url(pg_server: PostgresServer) -> str:
    """A fresh database on the session's PostgreSQL (these tests need PostgreSQL alone)."""
    return pg_server.create_database()


@pytest.fixture
def broker() -> Iterator[TansuBroker]:
    """A broker for this test alone."""
    with TansuBroker.start() as started:
        yield started
