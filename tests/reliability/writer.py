"""A writer that hammers one flow with transitions and reports each outcome as soon as it knows it.

    python -m tests.reliability.writer URL --writer 1 --threads 2 --users u0,u1 [--seconds 5]

Prints `READY` once its store is open, then one line per command (see `tests.reliability.ledger`):
`A w1-t0-17 retries=0`, `R ...`, `E w1-t0-18 <exception type>`, `C ...`, and `DONE` when its time
is up. Tests kill it with SIGKILL at random moments and check the log against what it printed.
The same loop runs in threads of the test process (`hammer`) when the test itself injects faults.
"""

from __future__ import annotations

import argparse
import contextlib
import random
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from flowstore import (
    ConcurrencyConflictError,
    FlowError,
    FlowExistsError,
    FlowStore,
    InvalidTransitionError,
)
from flowstore.testing import Internals
from tests.flows import ring
from tests.reliability.ledger import nonce

__all__ = ["FLOW", "RING", "CountingStore", "hammer", "main"]

FLOW = "ring"
RING: dict[str, Any] = ring(FLOW)
"""Two steps that loop forever (tick, flip, flop); `done` is never sent, so no run ends."""

# "bogus" is never offered, "flip" only from a and "flop" only from b: about a third are rejected.
CHOICES = ["tick", "tick", "tick", "flip", "flop", "bogus"]


class CountingStore(FlowStore):
    """A FlowStore that counts, per thread, the conflicting appends it retried."""

    _counts = threading.local()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        Internals(self).on_retry(self._retried)

    def _retried(self, attempt: int) -> None:
        self._counts.retries = getattr(self._counts, "retries", 0) + 1

    def take_retries(self) -> int:
        """Retries since the last call, in this thread."""
        retries: int = getattr(self._counts, "retries", 0)
        self._counts.retries = 0
        return retries


def hammer(
    store: CountingStore,
    *,
    writer: int,
    thread: int,
    users: Sequence[str],
    stop: threading.Event,
    emit: Callable[[str], None],
    seed: int = 0,
    on_error: Callable[[BaseException, float], None] | None = None,
) -> None:
    """Send random transitions on overlapping users until `stop` is set; emit each outcome."""
    rng = random.Random(seed * 1009 + writer * 101 + thread)
    n = 0
    while not stop.is_set():
        value = nonce(writer, thread, n)
        n += 1
        user = rng.choice(users)
        began = time.monotonic()
        store.take_retries()
        try:
            store.execute_transition(user, FLOW, rng.choice(CHOICES), {"nonce": value})
        except InvalidTransitionError:
            emit(f"R {value} retries={store.take_retries()}")
        except ConcurrencyConflictError:
            emit(f"C {value}")
        except Exception as exc:  # reported, then the writer carries on (the database may return)
            kind = f"{type(exc).__module__}.{type(exc).__qualname__}"
            emit(f"E {value} {kind} flow_error={isinstance(exc, FlowError)}")
            if on_error is not None:
                on_error(exc, time.monotonic() - began)
        else:
            emit(f"A {value} retries={store.take_retries()}")


def main(argv: list[str] | None = None) -> int:
    """Run `--threads` hammering threads for `--seconds` (0: until killed)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("--writer", type=int, required=True)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--users", default="u0,u1,u2")
    parser.add_argument("--seconds", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-retries", type=int, default=50)
    parser.add_argument("--wait-go", action="store_true", help="start on a GO line on stdin")
    args = parser.parse_args(argv)
    lock = threading.Lock()

    def emit(line: str) -> None:
        with lock:
            sys.stdout.write(line + "\n")
            sys.stdout.flush()

    store = CountingStore(args.url, max_retries=args.max_retries)
    try:
        with contextlib.suppress(FlowExistsError):  # another writer made it first
            store.create_flow(RING)
        emit("READY")
        if args.wait_go:  # the writers of a load test start together, when all are ready
            sys.stdin.readline()
        stop = threading.Event()
        threads = [
            threading.Thread(
                target=hammer,
                kwargs={
                    "store": store,
                    "writer": args.writer,
                    "thread": t,
                    "users": args.users.split(","),
                    "stop": stop,
                    "emit": emit,
                    "seed": args.seed,
                },
                daemon=True,
            )
            for t in range(args.threads)
        ]
        for thread in threads:
            thread.start()
        if args.seconds:
            stop.wait(args.seconds)
            stop.set()
        for thread in threads:
            thread.join()
    finally:
        store.close()
    emit("DONE")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
