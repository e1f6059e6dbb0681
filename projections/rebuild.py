"""Rebuild and migrate for `SqlProjections`: replay the log into shadow tables, then swap them in.

One rebuild at a time per database (a file lock on SQLite, an advisory lock on PostgreSQL);
readers keep the live tables until the swap commits. `migrate` is a rebuild that replaces tables
of an older layout, blue/green.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager
from typing import Any, cast

from sqlalchemy import Column, Connection, Engine, MetaData, Table, delete, select, text
from sqlalchemy.schema import CreateTable

from flowstore.codec import PlainEvent
from flowstore.domain import DomainEvent
from flowstore.errors import ProjectionLayoutError, RebuildRunningError
from flowstore.gcpause import PausedCollection
from flowstore.projections.batch import RowBatch, RowCache
from flowstore.projections.tables import (
    REBUILD_SUFFIX,
    TRACKING,
    ProjectionTables,
    define_tables,
    layout_of,
)
from flowstore.projections.verify import EventPage

__all__ = ["PAGE", "PlainPage", "Rebuilds"]

PAGE = 20_000
"""Events a rebuild reads, folds and writes per transaction."""

PlainPage = Callable[[int, int], Sequence[tuple[int, PlainEvent | Any]]]
"""An `EventPage` whose events may also come as plain data (`flowstore.codec.PlainEvent`), as a
rebuild reads them (`RowBatch.apply` folds either)."""

log = logging.getLogger(__name__)


class Rebuilds:
    """Rebuild, migrate and swap for `SqlProjections` (a mixin: the runner provides the tables,
    connections, folds and writes)."""

    tables: ProjectionTables
    engine: Engine
    layout: int
    name: str
    _lock: threading.RLock
    _rebuild_mutex: threading.Lock
    _shared_connection: bool
    _sqlite: bool
    _owned_position: int | None
    _found_layout: int | None
    _layout_checked_at: float

    def _read(self, *, check: bool = True) -> AbstractContextManager[Connection]:
        raise NotImplementedError  # the runner's

    def _locked(self) -> AbstractContextManager[tuple[Connection, int]]:
        raise NotImplementedError  # the runner's: a transaction holding the tracking row

    def _position(self, conn: Connection, *, lock: bool) -> int:
        raise NotImplementedError  # the runner's

    def _set_position(self, conn: Connection, position: int) -> None:
        raise NotImplementedError  # the runner's

    def _layout_in(self, conn: Connection) -> int | None:
        raise NotImplementedError  # the runner's

    def _record_layout(self, conn: Connection) -> None:
        raise NotImplementedError  # the runner's

    def _fold(
        self,
        conn: Connection,
        tables: ProjectionTables,
        events: Sequence[tuple[int, DomainEvent]],
        cache: RowCache | None = None,
    ) -> RowBatch:
        raise NotImplementedError  # the runner's

    def _apply(
        self,
        conn: Connection,
        tables: ProjectionTables,
        events: Sequence[tuple[int, DomainEvent]],
        cache: RowCache | None = None,
    ) -> RowBatch:
        raise NotImplementedError  # the runner's

    def _write(self, conn: Connection, t: ProjectionTables, batch: RowBatch) -> None:
        raise NotImplementedError  # the runner's

    def _name_unreadable(self, conn: Connection, events: Sequence[tuple[int, object]]) -> None:
        raise NotImplementedError  # the runner's

    def rebuild(
        self,
        read: EventPage | PlainPage,
        *,
        page: int = PAGE,
        progress: Callable[[int, int], None] | None = None,
        migrating: bool = False,
    ) -> int:
        """Replay the whole log into fresh tables, then swap them in; return the events replayed.

        `migrating` (see `migrate`): the tables being replaced have another layout, so the swap
        takes their tracking rows (whichever layout) instead of this layout's, and replaces them.

        Memory stays bounded: each page is applied and committed before the next is read, and the
        copies of recent state rows kept between pages (only this rebuild writes the new tables, so
        they cannot go stale) are capped. Readers keep the old tables until the swap commits.
        The new tables get their secondary indexes at the swap, built once over all their rows
        rather than kept up to date row by row (those by instance id from the log's first
        erasure on, whose deletes use them).
        """
        # The cyclic collector stays off throughout (`PausedCollection`), and comes back on only
        # once the rebuild's objects are gone: what it would scan is a page's objects, and no
        # cycles.
        with self._rebuild_lock(), PausedCollection() as collection:
            shadow = define_tables(REBUILD_SUFFIX)
            try:
                return self._rebuild(
                    shadow,
                    read,
                    collection,
                    page=page,
                    progress=progress,
                    migrating=migrating,
                )
            except BaseException:
                # A failed rebuild (a full disk, a lost connection) must not leave its half-filled
                # shadow tables behind: they held thousands of rows and broke later commands.
                self._drop_shadow(shadow)
                raise

    def _drop_shadow(self, shadow: ProjectionTables) -> None:
        try:
            with self._lock, self.engine.begin() as conn:
                shadow.metadata.drop_all(conn)
        except Exception:
            log.warning("could not drop the rebuild's shadow tables", exc_info=True)

    @contextmanager
    def _rebuild_lock(self) -> Iterator[None]:
        """One rebuild at a time on this database, across processes; else `RebuildRunningError`.

        SQLite: an exclusive flock on a file beside the database (per open file, so two threads of
        one process exclude each other too). PostgreSQL: a session-level advisory lock, held on a
        connection of its own for the whole rebuild. memory://: this process is the only one.
        """
        if self._shared_connection:
            if not self._rebuild_mutex.acquire(blocking=False):
                raise RebuildRunningError("in this process")
            try:
                yield
            finally:
                self._rebuild_mutex.release()
            return
        if self._sqlite:
            database = self.engine.url.database or ""
            path = f"{database}.rebuild-lock"
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    raise RebuildRunningError(f"lock file {path}") from None
                yield
            finally:
                os.close(fd)  # releases the flock
            return
        with self.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            taken = conn.execute(
                text("SELECT pg_try_advisory_lock(:key)"), {"key": _REBUILD_LOCK_KEY}
            ).scalar_one()
            if not taken:
                raise RebuildRunningError("PostgreSQL advisory lock")
            try:
                yield
            finally:
                conn.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": _REBUILD_LOCK_KEY})

    def _rebuild(
        self,
        shadow: ProjectionTables,
        read: PlainPage,
        collection: PausedCollection,
        *,
        page: int,
        progress: Callable[[int, int], None] | None,
        migrating: bool = False,
    ) -> int:
        rows = RowCache()
        with self._lock, self.engine.begin() as conn:
            if not migrating:
                self._position(conn, lock=False)  # the tables have this layout (else raise)
            shadow.metadata.drop_all(conn)
            for table in shadow.all:
                # The secondary indexes come at the swap; on SQLite so does history's key.
                keyless = self._filled_without_key(shadow, table)
                conn.execute(CreateTable(_without_key(table) if keyless else table))
        by_instance = False  # whether the indexes erasures delete by exist yet
        position, replayed = 0, 0
        rows.complete = True  # the new tables are empty: what the copies lack is not there
        # Stream without holding the tracking lock: live writers carry on. Reading and folding a
        # page happen outside any write transaction, which holds SQLite's one write lock.
        # Each page is written by another thread while this one reads and folds the next: the
        # driver lets go of the GIL while the database works, so they overlap (PostgreSQL's server
        # inserts meanwhile; SQLite's driver takes the GIL back for every row, so there it overlaps
        # little). One page in flight at most: memory stays bounded.
        pending: Future[tuple[int, int]] | None = None
        events: Sequence[tuple[int, DomainEvent]] = ()
        batch: RowBatch | None = None
        with ThreadPoolExecutor(1, thread_name_prefix="flowstore-rebuild") as writer:
            while True:
                if collection.due():
                    # Once a second, the cyclic collector runs for other threads' cycles: with
                    # the page in flight written and let go of, it has little of ours to scan.
                    self._written(pending, progress)
                    pending, events, batch = None, (), None
                    collection.breathe()
                events = cast(Sequence[tuple[int, DomainEvent]], read(position + 1, page))
                if not events:
                    break
                if not rows.complete:  # the fold may read rows the page in flight writes
                    self._written(pending, progress)
                    pending = None
                with self._read(check=False) as conn:  # the new tables, whatever the layout
                    batch = self._fold(conn, shadow, events, cache=rows)
                rows.keep(batch)
                # The first erasure of the log: from then on, deleting an instance's rows by its
                # id is worth an index (kept up to date, row by row, from there).
                index = bool(batch.erased) and not by_instance
                by_instance = by_instance or index
                position, replayed = events[-1][0], replayed + len(events)
                self._written(pending, progress)
                pending = writer.submit(
                    self._write_page, shadow, batch, events, index, (replayed, position)
                )
            self._written(pending, progress)
        with self._claimed() if migrating else self._locked() as (conn, _):
            while events := cast(Sequence[tuple[int, DomainEvent]], read(position + 1, page)):
                # what arrived meanwhile
                rows.keep(self._apply(conn, shadow, events, cache=rows))
                position, replayed = events[-1][0], replayed + len(events)
            self._swap(conn, shadow)
            if migrating:
                self._take_over_tracking(conn, position)
            else:
                self._set_position(conn, position)
            self._owned_position = None
        if progress:
            progress(replayed, position)
        return replayed

    def _write_page(
        self,
        shadow: ProjectionTables,
        batch: RowBatch,
        events: Sequence[tuple[int, object]],
        index: bool,
        progress: tuple[int, int],
    ) -> tuple[int, int]:
        """Write a folded page into the shadow tables in one transaction; return `progress`."""
        with self._lock, self.engine.begin() as conn:
            if index:
                _create_instance_indexes(conn, shadow)
            self._write(conn, shadow, batch)
            self._name_unreadable(conn, events)
        return progress

    @staticmethod
    def _written(
        pending: Future[tuple[int, int]] | None, progress: Callable[[int, int], None] | None
    ) -> None:
        """Wait for the page in flight to be written (raising what writing it raised)."""
        if pending is not None:
            done = pending.result()
            if progress:
                progress(*done)

    def migrate(
        self,
        read: EventPage | PlainPage,
        *,
        page: int = 5000,
        progress: Callable[[int, int], None] | None = None,
    ) -> int:
        """Bring tables of an older layout to this one, blue/green; return the events replayed.

        The new layout is built beside the old tables (like a rebuild, and under the same
        one-at-a-time lock) while processes of the previous version keep serving and moving
        them; the swap then takes their tracking rows, so it waits for a catch-up in progress,
        and from then on those processes get `ProjectionLayoutError`. Nothing to do (0) when the
        tables already have this layout; tables of a newer layout raise.
        """
        with self._lock, self.engine.begin() as conn:
            found = self._layout_in(conn)
        if found == self.layout:
            return 0
        if found is not None and found > self.layout:
            raise ProjectionLayoutError(found, self.layout)
        log.warning("migrating projection tables from layout %s to %s", found, self.layout)
        return self.rebuild(read, page=page, progress=progress, migrating=True)

    @contextmanager
    def _claimed(self) -> Iterator[tuple[Connection, int]]:
        """A transaction holding every tracking row of the tables (of whatever layout)."""
        with self._lock, self.engine.begin() as conn:
            rows = select(TRACKING.c.name)
            conn.execute(rows if self._sqlite else rows.with_for_update()).all()
            yield conn, 0

    def _take_over_tracking(self, conn: Connection, position: int) -> None:
        """After a migration's swap: this layout's rows replace every other layout's."""
        names = [n for (n,) in conn.execute(select(TRACKING.c.name)) if layout_of(n) is not None]
        if names:
            conn.execute(delete(TRACKING).where(TRACKING.c.name.in_(names)))
        conn.execute(TRACKING.insert().values(name=self.name, position=position))
        self._record_layout(conn)
        self._found_layout = self.layout
        self._layout_checked_at = time.monotonic()

    def _filled_without_key(self, shadow: ProjectionTables, table: Table) -> bool:
        """Whether the rebuild fills `table` (of `shadow`) without its primary key, which the
        swap then builds (`_without_key`): SQLite's history."""
        return self._sqlite and table is shadow.history

    def _swap(self, conn: Connection, shadow: ProjectionTables) -> None:
        with _sorting_threads(conn, 2) if self._sqlite else contextlib.nullcontext():
            for live, new in zip(self.tables.all, shadow.all, strict=True):
                for index in new.indexes:
                    conn.execute(text(f'DROP INDEX IF EXISTS "{index.name}"'))
                conn.execute(text(f'DROP TABLE IF EXISTS "{live.name}"'))
                conn.execute(text(f'ALTER TABLE "{new.name}" RENAME TO "{live.name}"'))
                if self._filled_without_key(shadow, new):
                    conn.execute(text(_key_index_ddl(live)))
                for index in live.indexes:
                    index.create(conn)


def _without_key(table: Table) -> Table:
    """`table` without its primary key, for the rebuild to fill: its columns' names, types and
    nullability, which is all the history table declares (a test checks that the DDL is the
    table's but for the PRIMARY KEY clause).

    SQLite: a rebuild fills `flow_history` with plain inserts (facts; nothing upserts into it),
    so its key is needed only once the rows are all there. Kept up to date row by row, the
    key's B-tree cost the writer 1.5-1.9 of its 10 CPU µs per event (a 1M-event log, issue 17);
    built once at the swap (`_key_index_ddl`), about 0.6.
    """
    return Table(
        table.name,
        MetaData(),
        *(Column(c.name, c.type, nullable=c.nullable) for c in table.columns),
    )


def _key_index_ddl(table: Table) -> str:
    """SQLite: the unique index a rebuilt `table` holds its primary key's columns in.

    It is the constraint the PRIMARY KEY clause of a table created whole would have declared:
    on SQLite a non-integer primary key is itself such an index (`sqlite_autoindex_...`),
    enforcing the same uniqueness and serving the same lookups (and ON CONFLICT targets).
    """
    columns = ", ".join(f'"{c.name}"' for c in table.primary_key.columns)
    return f'CREATE UNIQUE INDEX "{table.name}_key" ON "{table.name}" ({columns})'


@contextmanager
def _sorting_threads(conn: Connection, threads: int) -> Iterator[None]:
    """SQLite: let the swap's index builds sort with `threads` helper threads (then set back).

    At the swap the read-ahead process is done and its core free: on two threads, history's
    three index builds at 1M rows took 1.7 s wall against 2.1 on one. A build of SQLite
    without worker threads ignores it."""
    before = conn.exec_driver_sql("PRAGMA threads").scalar_one()
    conn.exec_driver_sql(f"PRAGMA threads = {threads:d}")
    restore = f"PRAGMA threads = {int(before):d}"
    try:
        yield
    except BaseException:
        # What failed the swap is what the caller must see, not a failure to set this back on
        # a connection it may have broken.
        with contextlib.suppress(Exception):
            conn.exec_driver_sql(restore)
        raise
    conn.exec_driver_sql(restore)


def _create_instance_indexes(conn: Connection, shadow: ProjectionTables) -> None:
    """Index the shadow tables by instance id (what erasures delete by)."""
    for table in shadow.all:
        for index in table.indexes:
            if index.name and index.name.endswith("_instance"):
                index.create(conn)


# pg_advisory_lock's key for rebuilds: any bigint the application uses for nothing else.
_REBUILD_LOCK_KEY = 0x666C6F77_72656231  # "flowreb1"
