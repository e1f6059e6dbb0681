"""Throughput of a fleet: 1 and then 3 `flowstore serve --projector off` processes and one
`flowstore worker` on one throwaway PostgreSQL, HTTP clients spread over the servers.

    PYTHONPATH=$PWD python -m benchmarks.fleet_throughput [--servers 1 3] [--clients 12]
        [--seconds 20] [--warmup 3]

Each configuration gets a fresh database. Every client is one user doing
`POST /api/flow/r/transition/tick` back to back on its own keep-alive connection to server
`i % servers` (as a load balancer with sticky connections would). After a warm-up, the window
counts accepted transitions (HTTP 200) and times each request; it reports transitions/s, p50/p99
latency, CPU µs per transition of the servers, the worker, PostgreSQL (the postmaster and
its backends) and the clients (this process), read from the kernel's per-process counters, the
database's committed transactions per transition (`pg_stat_database`), and `uptime` before and after (the machine is shared: the load says how much of it we had). One JSON
line per configuration, then a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import jwt
import psutil

from benchmarks.push_latency import SECRET, free_port
from flowstore import FlowStore
from flowstore.testing import ring_flow


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()


def cpu_seconds(processes: list[psutil.Process]) -> float:
    """User + system seconds of `processes` and of their children that have exited."""
    total = 0.0
    for process in processes:
        try:
            times = process.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system + times.children_user + times.children_system
    return total


def commits(url: str) -> int:
    """Transactions committed in the database so far (pg_stat_database, all sessions)."""
    import psycopg

    with psycopg.connect(url.replace("postgresql+psycopg", "postgresql")) as conn:
        conn.execute("SELECT pg_stat_clear_snapshot()")
        row = conn.execute(
            "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()"
        ).fetchone()
    return int(row[0]) if row else 0


def postgres_processes(port: int) -> list[psutil.Process]:
    """The postmaster listening on `port` and its current children (backends, writers)."""
    for process in psutil.process_iter(["name", "cmdline"]):
        cmdline = process.info["cmdline"] or []
        if process.info["name"] == "postgres" and str(port) in " ".join(cmdline):
            return [process, *process.children()]
    raise RuntimeError(f"no postmaster on port {port}")


@dataclass
class Client:
    """One user driving transitions on one server until the window closes."""

    user: str
    base: str
    latencies: list[float] = field(default_factory=list)
    accepted: int = 0
    failed: int = 0

    def run(self, measuring: threading.Event, done: threading.Event) -> None:
        token = jwt.encode({"sub": self.user, "exp": int(time.time()) + 3600}, SECRET)
        headers = {"Authorization": f"Bearer {token}"}
        url = f"{self.base}/api/flow/r/transition/tick"
        with httpx.Client(timeout=60, headers=headers) as http:
            while not done.is_set():
                began = time.perf_counter()
                response = http.post(url, json={})
                elapsed = time.perf_counter() - began
                if not measuring.is_set():
                    continue
                if response.status_code == 200:
                    self.accepted += 1
                    self.latencies.append(elapsed * 1000)
                else:
                    self.failed += 1


def start(url: str, *arguments: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "flowstore.adapters.cli", "--url", url, *arguments],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def wait_healthy(base: str, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{base} exited with {process.returncode}")
        try:
            if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)  # the pace of the polling loop
    raise TimeoutError(f"{base} not healthy within 120 s")


def measure(
    url: str, pg_port: int, servers: int, clients: int, seconds: float, warmup: float
) -> dict[str, Any]:
    """One configuration on a fresh database: `servers` servers, one worker, `clients` users."""
    with FlowStore(url, live_projections=False) as store:
        store.create_flow(ring_flow("r"))
    env = {
        **os.environ,
        "FLOWSTORE_JWT_SECRET": SECRET,
        "FLOWSTORE_KAFKA_BOOTSTRAP": "",
        "FLOWSTORE_PROJECTOR": "off",
    }
    worker = start(url, "worker", "--expire-every", "0", "--log-level", "warning", env=env)
    processes = []
    bases = []
    for _ in range(servers):
        port = free_port()
        processes.append(
            start(url, "serve", "--port", str(port), "--log-level", "warning", env=env)
        )
        bases.append(f"http://127.0.0.1:{port}")
    try:
        for base, process in zip(bases, processes, strict=True):
            wait_healthy(base, process)
        users = [Client(f"user{i}", bases[i % servers]) for i in range(clients)]
        measuring, done = threading.Event(), threading.Event()
        threads = [threading.Thread(target=c.run, args=(measuring, done)) for c in users]
        for thread in threads:
            thread.start()
        time.sleep(warmup)  # the benchmark's warm-up period, not synchronisation
        load_before = uptime()
        server_ps = [psutil.Process(p.pid) for p in processes]
        worker_ps = [psutil.Process(worker.pid)]
        pg_ps = postgres_processes(pg_port)
        me = [psutil.Process()]
        cpu_before = [cpu_seconds(group) for group in (server_ps, worker_ps, pg_ps, me)]
        commits_before = commits(url)
        began = time.perf_counter()
        measuring.set()
        time.sleep(seconds)  # the measurement window
        measuring.clear()
        elapsed = time.perf_counter() - began
        pg_ps = postgres_processes(pg_port)  # backends opened during the window count too
        cpu_after = [cpu_seconds(group) for group in (server_ps, worker_ps, pg_ps, me)]
        committed = commits(url) - commits_before
        done.set()
        for thread in threads:
            thread.join()
        load_after = uptime()
        latencies = sorted(x for c in users for x in c.latencies)
        accepted = sum(c.accepted for c in users)
        cpu = [(a - b) * 1e6 / max(accepted, 1) for a, b in zip(cpu_after, cpu_before, strict=True)]
        with FlowStore(url, live_projections=False) as store:
            lag = store.log_position() - store.projection_position()
        return {
            "servers": servers,
            "workers": 1,
            "clients": clients,
            "seconds": round(elapsed, 2),
            "transitions": accepted,
            "failed": sum(c.failed for c in users),
            "per_second": round(accepted / elapsed, 1),
            "p50_ms": round(statistics.median(latencies), 2) if latencies else None,
            "p99_ms": round(latencies[int(len(latencies) * 0.99) - 1], 2) if latencies else None,
            "cpu_us_servers": round(cpu[0]),
            "cpu_us_worker": round(cpu[1]),
            "cpu_us_postgres": round(cpu[2]),
            "cpu_us_clients": round(cpu[3]),
            # Every transaction, the worker's and the counters' own included: group commit in a
            # server shares one transaction among concurrent commands of that process.
            "commits_per_transition": round(committed / max(accepted, 1), 3),
            "projection_lag_at_end": lag,
            "uptime_before": load_before,
            "uptime_after": load_after,
        }
    finally:
        for process in [*processes, worker]:
            process.terminate()
        for process in [*processes, worker]:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| servers | clients | transitions/s | p50 ms | p99 ms | failed | CPU µs/transition: servers / worker / PostgreSQL / clients | commits/transition | load (1 min) before → after |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        load = " → ".join(
            r[k].split("load average:")[-1].split(",")[0].strip()
            for k in ("uptime_before", "uptime_after")
        )
        lines.append(
            f"| {r['servers']} | {r['clients']} | {r['per_second']:,} | {r['p50_ms']} | "
            f"{r['p99_ms']} | {r['failed']} | {r['cpu_us_servers']:,} / {r['cpu_us_worker']:,} / "
            f"{r['cpu_us_postgres']:,} / {r['cpu_us_clients']:,} | "
            f"{r['commits_per_transition']} | {load} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--servers", type=int, nargs="+", default=[1, 3])
    parser.add_argument("--clients", type=int, default=12)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--warmup", type=float, default=3.0)
    args = parser.parse_args()
    from tests.pgserver import PostgresServer

    rows = []
    with PostgresServer.start() as pg:
        for servers in args.servers:
            row = measure(
                pg.create_database(), pg.port, servers, args.clients, args.seconds, args.warmup
            )
            print(json.dumps(row), flush=True)
            rows.append(row)
    print(table(rows))


if __name__ == "__main__":
    main()
