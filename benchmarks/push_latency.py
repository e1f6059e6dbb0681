"""Write-to-WebSocket latency across processes: a `flowstore serve` process pushes the changes a
separate writer process appends to one PostgreSQL database (or SQLite file).

    PYTHONPATH=$PWD python -m benchmarks.push_latency [--backend postgres|sqlite] [--writes 200]

The writer (this process) appends a transition, then times how long until the server's WebSocket
push for it arrives. Run it against another checkout (`PYTHONPATH=/other/checkout`) to compare
versions: the server is started with the same PYTHONPATH.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import jwt
from websockets.sync.client import connect

from flowstore import FlowStore
from flowstore.testing import ring_flow

SECRET = "benchmark-secret-" + "0123456789abcdef" * 3


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backend", choices=["postgres", "sqlite"], default="postgres")
    parser.add_argument("--writes", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.backend == "postgres":
            from tests.pgserver import PostgresServer

            with PostgresServer.start() as pg:
                run(pg.create_database(), args.writes)
        else:
            run(f"sqlite:///{Path(tmp) / 'bench.db'}", args.writes)


def run(url: str, writes: int) -> None:
    with FlowStore(url, live_projections=False) as store:
        store.create_flow(ring_flow("r"))
    port = free_port()
    env = {**os.environ, "FLOWSTORE_JWT_SECRET": SECRET, "FLOWSTORE_KAFKA_BOOTSTRAP": ""}
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "flowstore.adapters.cli",
            "--url",
            url,
            "serve",
            "--port",
            str(port),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(500):
            try:
                if httpx.get(f"{base}/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.02)
        token = jwt.encode({"sub": "ann", "exp": int(time.time()) + 3600}, SECRET)
        latencies = []
        with (
            FlowStore(url, live_projections=False) as writer,
            connect(f"ws://127.0.0.1:{port}/api/flow/ws?token={token}", proxy=None) as ws,
        ):
            json.loads(ws.recv(timeout=10))  # authenticated
            writer.execute_transition("ann", "r", "tick")  # the pusher has reached the log
            json.loads(ws.recv(timeout=10))
            for _ in range(writes):
                began = time.perf_counter()
                position = writer.execute_transition("ann", "r", "tick") and writer.log_position()
                while json.loads(ws.recv(timeout=10)).get("position", 0) < position:
                    pass
                latencies.append((time.perf_counter() - began) * 1000)
                time.sleep(0.01)  # writes apart, as users make them
        latencies.sort()
        p50 = statistics.median(latencies)
        p99 = latencies[int(len(latencies) * 0.99) - 1]
        print(
            json.dumps(
                {
                    "backend": url.split(":", 1)[0],
                    "writes": writes,
                    "p50_ms": round(p50, 2),
                    "p99_ms": round(p99, 2),
                    "max_ms": round(latencies[-1], 2),
                }
            )
        )
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
