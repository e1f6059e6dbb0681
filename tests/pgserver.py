"""A throwaway PostgreSQL cluster for tests and benchmarks.

``PostgresServer.start()`` runs ``initdb`` into a fresh temporary directory, starts the server on a
free TCP port bound to 127.0.0.1 only (no Unix socket), and waits until it accepts connections
(``pg_ctl start -w``). ``stop()`` (or leaving the ``with`` block) shuts it down and deletes the
directory::

    with PostgresServer.start() as pg:
        url = pg.create_database()  # postgresql://flowstore:flowstore@127.0.0.1:PORT/flowstore_1_ab12cd34

Authentication is ``scram-sha-256`` with a known password (``user``/``password`` attributes), for
TCP and local connections alike. Durability settings are PostgreSQL's defaults (``fsync``,
``synchronous_commit``, ``full_page_writes`` all on), so timings measured against this server are
honest; only ``max_connections`` is raised (to 200).

PostgreSQL refuses to run as root. When this process is root, every server command runs through
``runuser -u postgres --`` and the cluster directory is owned by that OS user (created with
``useradd`` if missing).

If the owning process dies without calling ``stop()`` (SIGKILL, SIGTERM, a crashed interpreter), a
small watchdog process, started in its own session, notices that the pipe from its owner closed and
stops the server with ``pg_ctl stop -m immediate`` and deletes the directory. Ctrl-C is handled by
the normal ``with``/fixture teardown.

Binaries are looked up in ``$FLOWSTORE_PG_BINDIR``, ``/usr/lib/postgresql/15/bin``,
``pg_config --bindir`` and ``PATH``, in that order (``make postgres-binaries`` installs them).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Self
from urllib.parse import quote

import psycopg
from psycopg import sql

__all__ = ["PostgresServer", "PostgresServerError", "find_bindir"]

DEFAULT_USER = "flowstore"
DEFAULT_PASSWORD = "flowstore"
HOST = "127.0.0.1"
OS_USER = "postgres"
PREFERRED_BINDIR = Path("/usr/lib/postgresql/15/bin")
REQUIRED_BINARIES = ("initdb", "pg_ctl", "postgres")

# Settings written to postgresql.conf. Everything else, durability included, stays at its default.
SERVER_SETTINGS: dict[str, str] = {
    "listen_addresses": f"'{HOST}'",
    "unix_socket_directories": "''",
    "max_connections": "200",
}

START_TIMEOUT_S = 60
STOP_TIMEOUT_S = 60
PORT_ATTEMPTS = 5

_DB_NAME_RE = re.compile(r"[a-z_][a-z0-9_]{0,62}")  # PostgreSQL truncates names at 63
_db_counter = itertools.count(1)

# Runs in its own session. Blocks until the owner writes a byte (clean stop: nothing to do) or the
# pipe reaches EOF (the owner died): then stop the server at once and remove its directory.
_WATCHDOG_CODE = """
import json, shutil, subprocess, sys
if not sys.stdin.buffer.read(1):
    subprocess.run(json.loads(sys.argv[1]), cwd=sys.argv[2], timeout=60,
                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    shutil.rmtree(sys.argv[2], ignore_errors=True)
"""


class PostgresServerError(RuntimeError):
    """The throwaway cluster could not be created, started or stopped."""


def _has_binaries(bindir: Path) -> bool:
    return all(os.access(bindir / name, os.X_OK) for name in REQUIRED_BINARIES)


def find_bindir() -> Path:
    """Return a directory holding ``initdb``, ``pg_ctl`` and ``postgres``."""
    candidates: list[Path] = []
    if env_bindir := os.environ.get("FLOWSTORE_PG_BINDIR"):
        candidates.append(Path(env_bindir))
    candidates.append(PREFERRED_BINDIR)
    if pg_config := shutil.which("pg_config"):
        result = subprocess.run(
            [pg_config, "--bindir"], capture_output=True, text=True, check=False, timeout=30
        )
        if result.returncode == 0 and result.stdout.strip():
            candidates.append(Path(result.stdout.strip()))
    if initdb := shutil.which("initdb"):
        candidates.append(Path(initdb).resolve().parent)
    for candidate in candidates:
        if _has_binaries(candidate):
            return candidate
    raise PostgresServerError(
        "PostgreSQL server binaries (initdb, pg_ctl, postgres) not found in "
        f"{[str(c) for c in candidates]}; run `make postgres-binaries` "
        "(apt-get install -y postgresql-15) or set FLOWSTORE_PG_BINDIR"
    )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def _ensure_os_user(name: str) -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(name)
    except KeyError:
        subprocess.run(
            [
                "useradd",
                "--system",
                "--user-group",
                "--no-create-home",
                "--home-dir",
                "/nonexistent",
                "--shell",
                "/usr/sbin/nologin",
                name,
            ],
            check=True,
            capture_output=True,
            timeout=60,
        )
        return pwd.getpwnam(name)


class PostgresServer:
    """A running throwaway PostgreSQL cluster. Create it with :meth:`start`."""

    def __init__(
        self,
        *,
        bindir: Path,
        base_dir: Path,
        user: str,
        password: str,
        os_user: pwd.struct_passwd | None,
    ) -> None:
        self.bindir = bindir
        self.base_dir = base_dir
        self.data_dir = base_dir / "data"
        self.log_file = base_dir / "server.log"
        self.host = HOST
        self.port = 0
        self.user = user
        self.password = password
        self._os_user = os_user
        self._watchdog: subprocess.Popen[bytes] | None = None
        self._running = False

    # -- lifecycle -----------------------------------------------------------------------------

    @classmethod
    def start(
        cls,
        *,
        user: str = DEFAULT_USER,
        password: str = DEFAULT_PASSWORD,
        bindir: Path | None = None,
        base_dir: Path | None = None,
    ) -> Self:
        """Create and start a fresh cluster; return it, ready for connections.

        The result is also a context manager that stops the server on exit. ``base_dir`` is the
        parent for the cluster's temporary directory (default: the system temp dir); when running
        as root it must be traversable by the ``postgres`` OS user.
        """
        resolved_bindir = bindir or find_bindir()
        os_user = _ensure_os_user(OS_USER) if os.geteuid() == 0 else None
        server = cls(
            bindir=resolved_bindir,
            base_dir=Path(tempfile.mkdtemp(prefix="flowstore-pg-", dir=base_dir)),
            user=user,
            password=password,
            os_user=os_user,
        )
        try:
            server._start_watchdog()
            server._initdb()
            server._start_on_free_port()
        except BaseException:
            server._abort()
            raise
        return server

    def stop(self) -> None:
        """Stop the server (immediate shutdown) and delete its directory. Safe to call twice.

        Immediate, not fast: the directory is deleted next, so the shutdown checkpoint a fast stop
        writes is wasted work, and on a busy machine it took over a minute for a suite's worth of
        databases (the stop then timed out and failed the last test of the session). If the stop
        fails, the watchdog kills the server before this raises.
        """
        try:
            if self._running and not self.alive():
                # It exited by itself: a WAL write that found no space is a PANIC, and the crash
                # recovery that follows fails too while the disk is full (the disk-full tests).
                # pg_ctl would fail for want of its PID file; there is nothing to stop.
                self._running = False
            if self._running:
                self._run(
                    [
                        *(self._bin("pg_ctl"), "stop", "-D", str(self.data_dir)),
                        *("-m", "immediate", "-w", "-t", str(STOP_TIMEOUT_S), "-s"),
                    ],
                    timeout=STOP_TIMEOUT_S + 30,
                )
                self._running = False
        except BaseException:
            self._abort()
            raise
        shutil.rmtree(self.base_dir, ignore_errors=True)
        self._release_watchdog(clean=True)

    def alive(self) -> bool:
        """Whether the server's postmaster is running (its PID file names a live process)."""
        try:
            pid = int((self.data_dir / "postmaster.pid").read_text().split()[0])
            os.kill(pid, 0)
        except (OSError, ValueError, IndexError):
            return False
        return True

    @property
    def watchdog_pid(self) -> int | None:
        """PID of the process that cleans up if this one dies without calling ``stop()``."""
        return None if self._watchdog is None else self._watchdog.pid

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- databases -----------------------------------------------------------------------------

    def url(self, dbname: str = "postgres") -> str:
        """``postgresql://user:password@127.0.0.1:PORT/dbname``."""
        return (
            f"postgresql://{quote(self.user, safe='')}:{quote(self.password, safe='')}"
            f"@{self.host}:{self.port}/{dbname}"
        )

    def create_database(self, prefix: str = "flowstore") -> str:
        """Create a new, empty, uniquely named database and return its URL."""
        name = f"{prefix}_{next(_db_counter)}_{uuid.uuid4().hex[:8]}"
        if not _DB_NAME_RE.fullmatch(name):
            raise ValueError(f"prefix {prefix!r} gives an invalid database name {name!r}")
        with psycopg.connect(self.url("postgres"), autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.url(name)

    # -- internals -----------------------------------------------------------------------------

    def _bin(self, name: str) -> str:
        return str(self.bindir / name)

    def _run(self, argv: Sequence[str], *, timeout: float) -> subprocess.CompletedProcess[str]:
        """Run a server command as the cluster's OS user; raise with its output on failure."""
        result = subprocess.run(
            self._as_owner(argv),
            cwd=self.base_dir,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if result.returncode != 0:
            raise PostgresServerError(
                f"{' '.join(argv)} exited with {result.returncode}\n"
                f"{result.stdout}{result.stderr}{self._log_tail()}"
            )
        return result

    def _as_owner(self, argv: Sequence[str]) -> list[str]:
        if self._os_user is None:
            return list(argv)
        return ["runuser", "-u", self._os_user.pw_name, "--", *argv]

    def _chown(self, path: Path) -> None:
        if self._os_user is not None:
            os.chown(path, self._os_user.pw_uid, self._os_user.pw_gid)

    def _log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_file.read_text(errors="replace")
        except OSError:
            return ""
        return "\n--- server log (tail) ---\n" + "\n".join(text.splitlines()[-lines:])

    def _initdb(self) -> None:
        self.base_dir.chmod(0o700)
        self._chown(self.base_dir)
        pwfile = self.base_dir / "pwfile"
        pwfile.write_text(self.password + "\n")
        pwfile.chmod(0o600)
        self._chown(pwfile)
        try:
            self._run(
                [
                    self._bin("initdb"),
                    "--pgdata",
                    str(self.data_dir),
                    "--username",
                    self.user,
                    "--pwfile",
                    str(pwfile),
                    "--auth",
                    "scram-sha-256",
                    "--encoding",
                    "UTF8",
                    "--no-locale",
                    # Skips only initdb's final fsync of the new files; the server runs with
                    # fsync=on.
                    "--no-sync",
                    "--no-instructions",
                ],
                timeout=120,
            )
        finally:
            pwfile.unlink(missing_ok=True)
        with (self.data_dir / "postgresql.conf").open("a") as conf:
            conf.write("\n# flowstore test cluster\n")
            for key, value in SERVER_SETTINGS.items():
                conf.write(f"{key} = {value}\n")

    def _start_on_free_port(self) -> None:
        # Another process can take the port between _free_port() and the server's bind(); retry.
        for attempt in range(1, PORT_ATTEMPTS + 1):
            self.port = _free_port()
            try:
                self._run(
                    [
                        *(self._bin("pg_ctl"), "start", "-D", str(self.data_dir)),
                        *("-l", str(self.log_file), "-o", f"-p {self.port}"),
                        *("-w", "-t", str(START_TIMEOUT_S), "-s"),
                    ],
                    timeout=START_TIMEOUT_S + 30,
                )
            except PostgresServerError as error:
                if attempt < PORT_ATTEMPTS and "could not bind" in str(error):
                    continue
                raise
            self._running = True
            return

    def _start_watchdog(self) -> None:
        stop_cmd = self._as_owner(
            [self._bin("pg_ctl"), "stop", "-D", str(self.data_dir), "-m", "immediate", "-w"]
        )
        self._watchdog = subprocess.Popen(
            [sys.executable, "-c", _WATCHDOG_CODE, json.dumps(stop_cmd), str(self.base_dir)],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # not hit by the Ctrl-C that interrupts us
        )

    def _abort(self) -> None:
        """Immediate shutdown (if running) and removal of the directory, by the watchdog."""
        self._running = False
        if self._watchdog is None:
            shutil.rmtree(self.base_dir, ignore_errors=True)
        else:
            self._release_watchdog(clean=False)

    def _release_watchdog(self, *, clean: bool) -> None:
        """End the watchdog: a byte means "all done"; bare EOF makes it stop and clean up."""
        watchdog, self._watchdog = self._watchdog, None
        if watchdog is None or watchdog.stdin is None:
            return
        try:
            if clean:
                watchdog.stdin.write(b".")
            watchdog.stdin.close()
        except BrokenPipeError:
            pass
        try:
            watchdog.wait(timeout=STOP_TIMEOUT_S + 30)
        except subprocess.TimeoutExpired:
            watchdog.kill()
            watchdog.wait()


def _main() -> None:
    """Start a server by hand: ``python -m tests.pgserver``; Ctrl-C stops it."""
    t0 = time.perf_counter()
    with PostgresServer.start() as server:
        print(f"started in {time.perf_counter() - t0:.2f}s: {server.url()}", flush=True)
        print(f"log: {server.log_file}; Ctrl-C to stop", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            signal.pause()


if __name__ == "__main__":
    _main()
