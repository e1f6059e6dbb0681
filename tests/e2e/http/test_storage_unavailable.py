"""A database outage reaches HTTP clients as 503 STORAGE_UNAVAILABLE problem details."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx

from flowstore import StorageUnavailableError
from flowstore.adapters.http import JwtVerifier, create_app
from flowstore.storage import parse_url
from tests.e2e.http.conftest import SECRET, LiveServer, User
from tests.e2e.http.test_api import assert_problem


class _DownStore:
    """Stands in for a store whose database went down: every command fails as the store says."""

    max_payload_bytes = 1024
    config = parse_url("postgresql://flows@db.invalid/flows")  # sizes the async store's threads

    def add_observer(self, observer: object) -> Callable[[], None]:
        return lambda: None  # the app's metrics observe the store's commands

    def execute_transition(self, *args: Any, **kwargs: Any) -> Any:
        raise StorageUnavailableError(
            "PostgreSQL", "appending events", "couldn't get a connection after 2.00 sec"
        )


def test_a_command_during_an_outage_is_503_storage_unavailable() -> None:
    app = create_app(_DownStore(), JwtVerifier(SECRET))  # type: ignore[arg-type]
    alice = User.new("alice")
    with LiveServer(app) as live, httpx.Client(base_url=live.url) as client:
        response = client.post("/api/flow/any/transition/start", headers=alice.headers)
        body = assert_problem(response, 503, "STORAGE_UNAVAILABLE")
    assert body["details"] == {
        "backend": "PostgreSQL",
        "action": "appending events",
        "reason": "couldn't get a connection after 2.00 sec",
    }
