"""`flowstore serve`: the command starts the API, takes its token settings from the environment,
and stops cleanly on SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from websockets.sync.client import connect

from flowstore.adapters.errors import mapping_for
from flowstore.adapters.http import AuthConfigError
from flowstore.adapters.http.server import _redact
from tests.e2e.http.conftest import SECRET, bearer, mint, wait_until_healthy


def free_port() -> int:
    """A port nothing listens on right now (the server binds it a moment later)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def environment(**settings: str) -> dict[str, str]:
    """This process's environment without token settings, plus `settings`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLOWSTORE_JWT_")}
    return {**env, **settings}


def test_serve_runs_the_api_until_sigterm(tmp_path: Path, rsa_keys: tuple[bytes, str]) -> None:
    private, public = rsa_keys
    port, log = free_port(), tmp_path / "server.log"
    command = [
        sys.executable,
        "-m",
        "flowstore.adapters.cli",
        "--url",
        f"sqlite:///{tmp_path / 'f.db'}",
    ]
    with log.open("w") as out:
        server = subprocess.Popen(
            [*command, "serve", "--port", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=environment(FLOWSTORE_JWT_PUBLIC_KEY=public),
        )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_healthy(url, alive=lambda: server.poll() is None)
        token = mint("carol", key=private, algorithm="RS256")
        with httpx.Client(base_url=url) as client:
            assert client.get("/readyz").json()["status"] == "ready"
            assert client.get("/api/flows/mine", headers=bearer(token)).json() == []
            hs256 = bearer(mint("carol", key=SECRET))  # this server takes RS256 only
            assert client.get("/api/flows/mine", headers=hs256).status_code == 401
        # The server decodes the parameter's name, so `%74oken` is `token`: the log filter must too.
        for query in (
            f"token={token}",
            f"%74oken={token}",
            f"tok%65n={token}",
            f"x=1&%74ok%65n={token}",
        ):
            with connect(f"ws://127.0.0.1:{port}/api/flow/ws?{query}", proxy=None) as ws:
                assert '"userId":"carol"' in str(ws.recv(timeout=10))
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=20) == 0
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    logged = log.read_text()
    assert "GET /api/flows/mine" in logged
    assert "token=[redacted]" in logged
    assert token not in logged


def test_serve_without_token_settings_exits_with_a_config_error(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'f.db'}"
    run = subprocess.run(
        [sys.executable, "-m", "flowstore.adapters.cli", "--url", url, "serve", "--port", "1"],
        capture_output=True,
        text=True,
        env=environment(),
        timeout=60,
        check=False,
    )
    assert run.returncode == mapping_for(AuthConfigError("x")).exit_code
    assert "error[AUTH_CONFIG_INVALID]" in run.stderr
    assert "FLOWSTORE_JWT_SECRET" in run.stderr


@pytest.mark.parametrize(
    ("line", "redacted"),
    [
        ("GET /ws?token=abc HTTP/1.1", "GET /ws?token=[redacted] HTTP/1.1"),
        ("GET /ws?%74oken=abc", "GET /ws?%74oken=[redacted]"),
        ("GET /ws?tok%65n=abc&x=1", "GET /ws?tok%65n=[redacted]&x=1"),
        ("GET /ws?x=1&TOKEN=abc", "GET /ws?x=1&TOKEN=[redacted]"),
        ("GET /ws?tokens=abc&x=token", "GET /ws?tokens=abc&x=token"),
    ],
)
def test_tokens_in_queries_are_redacted_after_decoding_the_name(line: str, redacted: str) -> None:
    assert _redact(line) == redacted
