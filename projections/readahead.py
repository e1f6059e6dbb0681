"""A rebuild's reader in a second process: it reads and decodes the log's next pages while this
process folds and writes the current one (reading and decoding are a third of a rebuild's CPU).

    with ReadAhead(log, read_plain, page) as read:   # an `EventPage` like `read_plain`
        tables.rebuild(read, page=page)

The child is a fresh interpreter (not a fork of a process with threads and open connections). It
opens the log itself from the store's settings, which it gets through its stdin pipe (the database
URL and the cipher key never go into its argv or environment), then waits until told where to
start: this process reads the first pages itself meanwhile, so the child's start-up costs nothing.
From there on the child streams pages of plain events (`flowstore.codec.PlainEvent`, pickled: the
fields are dicts, strings, datetimes and UUIDs; definition and catalog events, which no table
folds, come without their fields; `compact`) down its stdout pipe, one page ahead at most (a full pipe blocks
it). Pages arrive in log order, each starting where the last one ended, so the rebuild sees exactly
what reading here would give, unreadable events included (`UnreadableEvent`).

The child ends with this process: when the pipe's other end closes (this process exited, or
closed it), its next write or read fails and it exits. Anything unexpected (the child failed, a
read this reader did not plan) falls back to reading here, from where the rebuild is.
"""

from __future__ import annotations

import contextlib
import gc
import os
import pickle
import select
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self, cast

from flowstore.eventlog import EventLog
from flowstore.projections.ops import INSTANCE_KINDS

__all__ = ["READ_AHEAD_FROM", "ReadAhead", "compact", "package_root"]

READ_AHEAD_FROM = 200_000
"""Events in the log from which `FlowStore.rebuild_projections` reads with a child process.

Measured on 2 cores (issue 17): the child takes this process's CPU per event from 61 to 47 µs
at 1M events and spends 23 µs of its own, so it pays where a core is free; on a machine whose
cores are busy it costs (the two processes take turns). Below a few hundred thousand events its
start-up (about a second) outweighs what it saves."""

_Page = list[tuple[int, Any]]
_READY = b"R"


class ReadAhead:
    """An `EventPage` of plain events whose pages after the first few come from a child process."""

    def __init__(self, log: EventLog, read_here: Callable[[int, int], _Page], page: int) -> None:
        self._read_here = read_here
        self._page = page
        self._next: int | None = None
        """Where the child's next page starts, once it was told where to start."""
        self._opened = False
        self.served = 0
        """Pages the child read (the others were read here)."""
        settings = {
            "config": log.config,
            "env": log.env,
            "encrypted": getattr(log.app.mapper, "cipher", None) is not None,
            "refresh": log.keys.refresh,
            "page": page,
        }
        self._child: subprocess.Popen[bytes] | None = subprocess.Popen(
            [sys.executable, "-c", _BOOT, package_root()],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            close_fds=True,
        )
        assert self._child.stdin is not None
        assert self._child.stdout is not None
        self._to: IO[bytes] = self._child.stdin
        self._from: IO[bytes] = self._child.stdout
        try:
            pickle.dump(settings, self._to, protocol=pickle.HIGHEST_PROTOCOL)
            self._to.flush()
        except OSError:  # the child died at once: read here
            self.close()

    def __call__(self, start: int, limit: int) -> _Page:
        """Up to `limit` events from `start` on: from the child when it has them ready."""
        read_here = self._read_here
        if self._child is None or limit != self._page:
            return read_here(start, limit)
        if self._next is None:
            events: _Page = read_here(start, limit)
            if len(events) < limit:  # the log's end is near: nothing left to read ahead
                self.close()
            elif self._ready():  # from the next page on, the child reads
                self._next = events[-1][0] + 1
                self._send(self._next)
            return events
        if start != self._next:  # not the page the child is reading: read here from now on
            self.close()
            return read_here(start, limit)
        try:
            events = pickle.load(self._from)
        except Exception:  # the child died: what it did not send is read here
            self.close()
            return read_here(start, limit)
        self.served += 1
        if len(events) < limit:  # the child reached the log's end and stopped
            self.close()
        else:
            self._next = events[-1][0] + 1
        return events

    def wait_until_ready(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for the child to open the log; whether it has."""
        return self._child is not None and (self._next is not None or self._ready(timeout))

    def _ready(self, timeout: float = 0.0) -> bool:
        """Whether the child has opened the log (once it said so, it is not asked again)."""
        if self._opened:
            return True
        fd = self._from.fileno()
        if not select.select([fd], [], [], timeout)[0]:
            return False
        if os.read(fd, 1) != _READY:  # the child failed to open the log (it says why on stderr)
            self.close()
            return False
        self._opened = True
        return True

    def _send(self, start: int) -> None:
        try:
            pickle.dump(start, self._to)
            self._to.flush()
        except OSError:
            self.close()

    def close(self) -> None:
        """Stop the child (if still running) and read here from now on."""
        child, self._child = self._child, None
        if child is None:
            return
        for pipe in (self._to, self._from):
            with contextlib.suppress(OSError):
                pipe.close()
        child.kill()
        child.wait()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


_BOOT = "import sys; sys.path.insert(0, sys.argv[1]); from flowstore.projections.readahead import serve; serve()"
"""The child's program: flowstore from where the parent's came from, then `serve`."""


def package_root() -> str:
    """The folder holding this process's `flowstore` package: what the child puts on its path.

    Found from the package itself, not from this file: in a source checkout this file is reached
    through the `flowstore/projections` link, in an installed wheel it lies inside `flowstore/`,
    and a folder inside the package on the path would make its modules top-level names.
    """
    package = sys.modules[__name__.partition(".")[0]]
    return str(Path(cast(str, package.__file__)).parent.parent)


def serve() -> None:
    """The child: open the log, say so, wait for where to start, then stream pages until the end."""
    # The pages are many thousands of objects in no cycle: reference counting frees them, and
    # the cyclic collector would only rescan them (as `flowstore.projections.rebuild` explains).
    gc.disable()
    to_parent = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # a stray print must not land in the pages
    from_parent = sys.stdin.buffer
    try:
        settings = pickle.load(from_parent)
        page = settings["page"]
        log = EventLog(
            settings["config"],
            settings["env"],
            encrypted=settings["encrypted"],
            refresh=settings["refresh"],
        )
        to_parent.write(_READY)
        to_parent.flush()
        start = pickle.load(from_parent)
        while True:
            events = log.read(start, page, contain=True, plain=True)
            pickle.dump(compact(events), to_parent, protocol=pickle.HIGHEST_PROTOCOL)
            to_parent.flush()
            if len(events) < page:
                return
            start = events[-1][0] + 1
    except (EOFError, BrokenPipeError, KeyboardInterrupt):
        return  # the parent is done with us (or gone)


def compact(events: _Page) -> _Page:
    """A page as the child sends it: the same events, in less to unpickle.

    Definition events hold nested models: no table folds them, so they travel as their kind.
    Equal strings among an instance event's top-level fields (flow ids, steps, transitions,
    services, user ids: a page holds a few of each, thousands of times) become one object, which
    pickle writes once and refers to after: the parent, whose CPU bounds the rebuild, builds each
    once per page (measured: unpickling 2.05 -> 1.60 µs per event, 13% fewer bytes).
    """
    seen: dict[str, str] = {}
    same = seen.setdefault
    sent: _Page = []
    for n, event in events:
        if type(event) is tuple:
            kind, fields = event
            if kind not in INSTANCE_KINDS:
                event = kind, {}
            else:
                event = kind, {k: same(v, v) if type(v) is str else v for k, v in fields.items()}
        sent.append((n, event))
    return sent
