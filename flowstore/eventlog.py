"""The event log: eventsourcing's application and recorder, the codec, and the users' keys.

`EventLog` is what the service appends to and reads from. It owns one eventsourcing `Application`
(the recorder for the chosen backend, our orjson transcoder and sealing mapper), the users' keys
(`flowstore.keys`) and, on SQLite, the process's write lock; concurrent appends share commits
(`flowstore.groupcommit`). It decides nothing: commands are decided in `flowstore.domain` and
sequenced by `flowstore.commands`.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import logging
import os
import random
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar, cast
from uuid import UUID

from eventsourcing.application import AggregateNotFoundError, Application
from eventsourcing.cryptography import AESCipher
from eventsourcing.persistence import (
    IntegrityError,
    InterfaceError,
    InternalError,
    Mapper,
    OperationalError,
    Transcoder,
)
from eventsourcing.utils import get_topic

from flowstore.codec import OrjsonTranscoder, PydanticMapper
from flowstore.domain import DomainEvent, FlowErased, InstanceEvent, project
from flowstore.errors import (
    CorruptEventError,
    EncryptionKeyError,
    FlowError,
    FlowStateCorruptionError,
    StorageUnavailableError,
)
from flowstore.groupcommit import GroupCommit
from flowstore.inputs import ERASED_USER_PREFIX
from flowstore.keys import MemoryKeyStore, SqlKeyStore, UserKeys
from flowstore.storage import SQLITE_PERSISTENCE, StorageConfig

if TYPE_CHECKING:
    from sqlalchemy import Engine, MetaData, Table

__all__ = [
    "CIPHER_KEY_ENV",
    "EventLog",
    "UnreadableEvent",
    "backoff",
    "cipher_settings",
    "log_tables",
    "storage_errors",
]

T = TypeVar("T")

_log = logging.getLogger(__name__)

_OPEN_ATTEMPTS = 5
_ERASED_TOPIC = get_topic(FlowErased)

CIPHER_KEY_ENV = "FLOWSTORE_CIPHER_KEY"
"""Base64 AES key (16, 24 or 32 bytes) that encrypts every event at rest."""


def cipher_settings(cipher_key: str | None) -> dict[str, str]:
    """The Application settings that encrypt the log with `cipher_key` (or `$FLOWSTORE_CIPHER_KEY`)."""
    # eventsourcing looks settings up with the application's name as a prefix first, so both the
    # plain and the FLOWSTORE_-prefixed names are set: the key given here is the only one used.
    key = cipher_key if cipher_key is not None else os.environ.get(CIPHER_KEY_ENV, "")
    if key:
        try:
            AESCipher.check_key_size(len(base64.b64decode(key, validate=True)))
        except (ValueError, binascii.Error) as exc:
            raise EncryptionKeyError(f"{CIPHER_KEY_ENV} is not a base64 AES key: {exc}") from None
    topic = "eventsourcing.cryptography:AESCipher" if key else ""
    return {
        "CIPHER_KEY": key,
        "FLOWSTORE_CIPHER_KEY": key,
        "CIPHER_TOPIC": topic,
        "FLOWSTORE_CIPHER_TOPIC": topic,
    }


@contextlib.contextmanager
def storage_errors(env: Mapping[str, str], action: str) -> Iterator[None]:
    """Raise `StorageUnavailableError` when the database fails under `action`.

    Down, cut off or read-only: eventsourcing's OperationalError and InterfaceError (already
    retried: ten attempts on PostgreSQL, each waiting up to POSTGRES_CONNECT_TIMEOUT for a
    connection), and SQLAlchemy's (the projection tables). Other errors pass through.
    """
    try:
        yield
    except Exception as exc:
        from sqlalchemy import exc as sql  # loaded already, by the keys and the projections

        # sql.TimeoutError: no connection came free in the engine's pool in time (all busy).
        if not isinstance(
            exc,
            OperationalError
            | InterfaceError
            | sql.OperationalError
            | sql.InterfaceError
            | sql.TimeoutError,
        ):
            raise
        module = env.get("PERSISTENCE_MODULE", "")
        backend = {
            "eventsourcing.sqlite": "SQLite",
            SQLITE_PERSISTENCE: "SQLite",
            "eventsourcing.postgres": "PostgreSQL",
        }
        reason = str(getattr(exc, "orig", None) or exc)  # SQLAlchemy's names the statement
        raise StorageUnavailableError(
            backend.get(module, "The database"), action, reason or type(exc).__name__
        ) from exc


@dataclass(frozen=True)
class UnreadableEvent:
    """Stands in a contained read for an event of the log that cannot be decoded."""

    position: int
    originator_id: str
    originator_version: int
    detail: str


def backoff(attempt: int) -> None:
    """Sleep a jittered, growing pause so that writers contending for one row stop colliding."""
    time.sleep(random.uniform(0, 0.002 * (2 ** min(attempt, 6))))


class _FlowApplication(Application[UUID]):
    """The eventsourcing Application: orjson transcoder and pydantic mapper, immutable aggregates."""

    # Not to be renamed: eventsourcing derives the PostgreSQL table names and the settings'
    # prefix (FLOWSTORE_...) from it.
    name = "FlowStore"

    def construct_transcoder(self) -> Transcoder:
        return OrjsonTranscoder()

    def construct_mapper(self) -> Mapper[UUID]:
        return self.factory.mapper(
            transcoder=self.construct_transcoder(), mapper_class=PydanticMapper
        )


def log_tables(metadata: MetaData, backend: str | None = None) -> list[Table]:
    """The event log's table(s) as eventsourcing creates them, for `backend` (None: both kinds).

    SQLite: `stored_events` (the rowid is the notification id). PostgreSQL: `<app name>_events` in
    POSTGRES_SCHEMA (public by default), with a `notification_id` bigserial. eventsourcing creates
    and owns them; these definitions let other tools (Alembic) recognise them, not create them.
    """
    from sqlalchemy import BigInteger, Column, Index, Integer, LargeBinary, Table, Text, Uuid

    tables = []
    if backend in (None, "sqlite"):
        tables.append(
            Table(
                "stored_events",
                metadata,
                Column("originator_id", Text, primary_key=True),
                Column("originator_version", Integer, primary_key=True),
                Column("topic", Text),
                Column("state", LargeBinary),
            )
        )
    if backend in (None, "postgres"):
        name = f"{_FlowApplication.name.lower()}_events"
        tables.append(
            Table(
                name,
                metadata,
                Column("originator_id", Uuid, primary_key=True),
                Column("originator_version", BigInteger, primary_key=True),
                Column("topic", Text),
                Column("state", LargeBinary),
                Column("notification_id", BigInteger, autoincrement=True, nullable=False),
                Index(f"{name}_notification_id_idx", "notification_id", unique=True),
            )
        )
    return tables


class EventLog:
    """The append-only log of one store: append, read aggregates, read the total order."""

    def __init__(
        self,
        config: StorageConfig,
        env: dict[str, str],
        *,
        encrypted: bool,
        refresh: float,
        engine: Engine | None = None,
    ) -> None:
        self.config = config
        self.env = env
        # SQLite has one writer: threads of this process queue here, in order, rather than in
        # SQLite's busy-wait, which starves some of them under load. PostgreSQL needs no such lock.
        self.write_lock: AbstractContextManager[Any] = (
            nullcontext() if config.backend == "postgres" else threading.Lock()
        )
        self.app = self._open(env)
        # Concurrent commands of this process share commits (`GroupCommit`); on PostgreSQL the
        # group's leader is whoever holds a lock of its own (there is no write lock there).
        self._group: GroupCommit | None = None
        if config.backend == "sqlite" and config.sqlalchemy_url is not None:
            self._group = GroupCommit(self.app, self.write_lock)
        elif config.backend == "postgres":
            self._group = GroupCommit(self.app, threading.Lock(), postgres=True)
        try:
            with storage_errors(config.env, "opening the store"):
                self.keys = self._open_keys(refresh, engine)
                try:
                    self._check_key(encrypted)
                except BaseException:
                    self.keys.close()
                    raise
        except BaseException:
            self.app.close()
            raise

    @staticmethod
    def _open(env: dict[str, str]) -> _FlowApplication:
        # Processes starting together on one PostgreSQL database race on CREATE TABLE IF NOT EXISTS
        # ("tuple concurrently updated", or a unique violation in pg_type); the loser just retries.
        for attempt in range(_OPEN_ATTEMPTS):
            try:
                with storage_errors(env, "opening the event store"):
                    app = _FlowApplication(env=env)
            except (InternalError, IntegrityError):
                if attempt == _OPEN_ATTEMPTS - 1:
                    raise
                backoff(attempt)
                continue
            # A read-only SQLite file opens fine and fails on the first write (a command, or the
            # projections' bookkeeping): refuse it here, as SQLite itself decides (no write access).
            path = env.get("SQLITE_DBNAME", "")
            for file in (path, f"{path}-wal") if path else ():
                if os.path.exists(file) and not os.access(file, os.W_OK):
                    app.close()
                    raise StorageUnavailableError(
                        "SQLite", "opening the event store", f"{file} is read-only"
                    )
            return app
        raise AssertionError("unreachable")

    def _open_keys(self, refresh: float, engine: Engine | None) -> UserKeys:
        """The users' keys (see `flowstore.keys`), wrapped with the log's cipher if it has one."""
        keys: UserKeys
        if self.config.sqlalchemy_url is None:
            keys = MemoryKeyStore(refresh=refresh)
        else:
            keys = SqlKeyStore(self.config, self.app.mapper.cipher, refresh=refresh, engine=engine)
            # Other processes may erase users: their FlowErased events say whose keys to drop.
            self._erasures_seen = self.app.recorder.max_notification_id() or 0
            keys.watch(self._erased_subjects)
        cast(PydanticMapper, self.app.mapper).keys = keys
        return keys

    def _check_key(self, encrypted: bool) -> None:
        """Refuse to open a log this store cannot read: a wrong key, or a missing one."""
        first = self.app.recorder.select_notifications(1, 1)
        if not first:
            return
        try:
            self.app.mapper.to_domain_event(first[0])
        except FlowError as exc:  # AES-GCM tag mismatch, or ciphertext fed to the JSON decoder
            if not encrypted and first[0].state.startswith(b"{"):
                return  # plain JSON, so not encrypted: merely corrupt, which reading it will say
            hint = (
                "the key does not match the one the log was written with"
                if encrypted
                else (f"the log is encrypted: set {CIPHER_KEY_ENV} or pass cipher_key")
            )
            raise EncryptionKeyError(f"Cannot read the event log: {hint}") from exc

    @property
    def channel(self) -> str | None:
        """The channel the recorder NOTIFYs on every append (PostgreSQL; None elsewhere)."""
        return getattr(self.app.recorder, "channel_name", None)

    def _erased_subjects(self) -> list[str]:
        """The key subjects of the `FlowErased` events appended since the last call."""
        recorder = self.app.recorder
        mapper = cast(PydanticMapper, self.app.mapper)
        with self.errors("reading the log"):
            newest = recorder.max_notification_id() or 0
            subjects: list[str] = []
            while self._erasures_seen < newest:
                page = recorder.select_notifications(
                    self._erasures_seen + 1, 1000, stop=newest, topics=[_ERASED_TOPIC]
                )
                for notification in page:
                    subject = mapper._state(notification).get("subject")
                    if isinstance(subject, str):
                        subjects.append(subject)
                if len(page) < 1000:
                    self._erasures_seen = newest
                else:
                    self._erasures_seen = page[-1].id
        return subjects

    def close(self) -> None:
        """Release the keys' and the recorder's connections."""
        self.keys.close()
        self.app.close()

    def errors(self, action: str) -> AbstractContextManager[None]:
        """`storage_errors` for this log's backend."""
        return storage_errors(self.config.env, action)

    def save(self, events: Sequence[DomainEvent], *, decided_here: bool = False) -> int:
        """Append events (all or none); return the log position after them (0: nothing new).

        `decided_here` says the events were just decided by this store, stamped by its clock: then
        a conflict where the log already holds these very events is our own append, committed but
        unacknowledged (eventsourcing's PostgreSQL recorder retries an insert whose connection
        dropped, and the retry meets the rows it wrote), and it counts as done. Events copied
        from elsewhere (`import_events`) must not pass it: finding them stored proves nothing.
        A real conflict raises eventsourcing's `IntegrityError`.
        """
        with self.errors("appending events"):
            # The users' keys first, all at once and outside the write lock: creating them is a
            # transaction of its own, and the mapper, sealing, finds them cached. (Erased
            # stand-in ids name no one: nothing is sealed for them, so they need no key.)
            self.keys.for_users(
                e.user_id
                for e in events
                if isinstance(e, InstanceEvent) and not e.user_id.startswith(ERASED_USER_PREFIX)
            )
            try:
                position = self._append(events)
            except IntegrityError:
                if not decided_here:
                    raise
                first = events[0]  # the insert is atomic: the first event settles it for all
                stored = self.app.events.get(
                    first.originator_id,
                    gt=first.originator_version - 1,
                    lte=first.originator_version,
                )
                if list(stored) != [first]:
                    raise
                _log.warning(
                    "append at %s v%d was committed but not acknowledged; counted once",
                    first.originator_id,
                    first.originator_version,
                )
                return self.app.recorder.max_notification_id() or 0  # past our events
            return position

    def _append(self, events: Sequence[DomainEvent]) -> int:
        """Record the events (all or none); the log position after them, 0 if there were none."""
        if self._group is not None:
            return self._group.append(events)
        with self.write_lock:
            recordings = self.app.save(*events)
        return recordings[-1].notification.id if recordings else 0

    def get(self, aggregate_id: UUID, kind: type[T]) -> T | None:
        """The aggregate folded from its events (cached by eventsourcing), or None if it has none."""
        try:
            with self.errors(f"reading {kind.__name__} {aggregate_id}"):
                aggregate: object = self.app.repository.get(
                    aggregate_id, projector_func=cast(Any, project)
                )
        except AggregateNotFoundError:
            return None
        if not isinstance(aggregate, kind):
            msg = f"aggregate {aggregate_id} is a {type(aggregate).__name__}, not {kind.__name__}"
            raise FlowStateCorruptionError("*", "*", msg)
        return aggregate

    def events_of(self, aggregate_id: UUID) -> list[DomainEvent]:
        """Every event of one aggregate, in version order."""
        with self.errors(f"reading the events of {aggregate_id}"):
            return cast(list[DomainEvent], list(self.app.events.get(aggregate_id)))

    def read(
        self, start: int, limit: int = 1000, *, contain: bool = False, plain: bool = False
    ) -> list[tuple[int, Any]]:
        """Up to `limit` events of the total order from notification id `start` on.

        An event that cannot be decoded raises `CorruptEventError`, unless `contain`: then it is
        an `UnreadableEvent` in its place (the projections skip it and name it; the others go on).
        `plain`: each event as plain data, `PlainEvent` (`PydanticMapper.to_plain_events`).
        """
        with self.errors("reading the log"):
            page = self.app.recorder.select_notifications(start, limit)
        mapper = cast(PydanticMapper, self.app.mapper)
        decode_all = mapper.to_plain_events if plain else mapper.to_domain_events
        decode = mapper.to_plain_event if plain else mapper.to_domain_event
        try:
            events: list[Any] = list(decode_all(page))
        except CorruptEventError:
            if not contain:
                raise
            events = []
            for notification in page:  # one by one, to find the unreadable ones
                try:
                    events.append(decode(notification))
                except CorruptEventError as exc:
                    events.append(
                        UnreadableEvent(
                            notification.id,
                            str(notification.originator_id),
                            notification.originator_version,
                            exc.detail,
                        )
                    )
        return [(n.id, event) for n, event in zip(page, events, strict=True)]

    def position(self) -> int:
        """The notification id of the newest event in the log (0 when the log is empty)."""
        with self.errors("reading the log"):
            return self.app.recorder.max_notification_id() or 0
