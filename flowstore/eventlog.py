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
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar, cast
from uuid import UUID

import orjson
from eventsourcing.application import AggregateNotFoundError, Application
from eventsourcing.cryptography import AESCipher
from eventsourcing.persistence import (
    IntegrityError,
    InterfaceError,
    InternalError,
    Mapper,
    Notification,
    OperationalError,
    Transcoder,
)
from eventsourcing.sqlite import SQLiteApplicationRecorder
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
from flowstore.keys import MemoryKeyStore, SealedKey, SqlKeyStore, UserKeys
from flowstore.storage import SQLITE_PERSISTENCE, StorageConfig

if TYPE_CHECKING:
    from sqlalchemy import Engine, MetaData, Table

__all__ = [
    "CIPHER_KEY_ENV",
    "EventLog",
    "Recent",
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


class Recent:
    """The events of this process's newest appends by notification id, for the live projector.

    The projector's page read (`EventLog.read_live`) takes a run of consecutive ids from here
    instead of reading the rows back and decoding them (decrypting, opening the sealed fields,
    validating), and reads the log for anything else. Only events of committed appends enter
    (their ids come back from the commit: a failed or conflicting append, or a group member
    rolled back to its savepoint, has none), decided by this store, instance events only: their
    one mutable field, the payload, is a private copy (`check_payload`), while a definition's or
    an imported event's objects are the caller's. Positions and the tracking row's move are the
    projector's as before, so exactly once is untouched.

    Erasure: a read of the log opens an event's sealed fields with the key its subject names,
    taken from this process's cache when it holds it (keys found are cached until this process
    shreds them or learns from a `FlowErased` in the log that another process erased the user,
    `UserKeys.forget`), else from the key table (a stand-in user and no payload once shredded).
    An event is taken from here only while the key it was sealed with is in this process's
    cache (`UserKeys.cached`, after the same look for erasures a read makes), so a read at that
    moment would have opened it with that very key and given the same fields; a key leaving the
    cache (`UserKeys.on_drop`) empties the buffer, and those events are then read from the log
    as before. Erasing here (`flowstore.erasure`) appends `FlowErased` under the user's lock,
    catches the tables up (whose fold deletes the instance's rows, whatever the events carried),
    then shreds the key: the shred empties the buffer, so no personal data of the user stays in
    it, and nothing buffered is projected afterwards that a read of the log would not give. An
    erasure by another process is only known here once learnt from the log; until then this
    process's cached key opens the user's events read from the log just the same (as before the
    buffer): the buffer adds no exposure.
    """

    SIZE = 10_000
    """Events kept at most (the oldest go first): a few pages of the projector's reads."""

    def __init__(self, keys: UserKeys) -> None:
        self._keys = keys
        self._events: OrderedDict[int, tuple[InstanceEvent, str | None]] = OrderedDict()
        self._lock = threading.Lock()
        keys.on_drop(self.clear)

    def add(
        self, ids: Sequence[int], events: Sequence[DomainEvent], keys: Mapping[str, SealedKey]
    ) -> None:
        """Keep committed events, with the subject of the key each was sealed with (`keys`: by
        user id; None: none)."""
        with self._lock:
            kept = self._events
            for position, event in zip(ids, events, strict=True):
                if not isinstance(event, InstanceEvent):
                    continue
                user_id = event.user_id
                key = keys.get(user_id)
                if key is None and not user_id.startswith(ERASED_USER_PREFIX):
                    continue  # sealed with a key we do not know: read it from the log
                kept[position] = (event, None if key is None else key.subject)
            while len(kept) > self.SIZE:
                kept.popitem(last=False)

    def take(self, start: int, limit: int) -> list[tuple[int, DomainEvent]]:
        """The events at `start`, `start + 1`, ... (at most `limit`) while the buffer has them and
        their keys are still cached here; what is before `start` is dropped (projected)."""
        run: list[tuple[int, InstanceEvent, str | None]] = []
        with self._lock:
            events = self._events
            while events and next(iter(events)) < start:
                events.popitem(last=False)
            position = start
            while len(run) < limit and (found := events.pop(position, None)) is not None:
                run.append((position, *found))
                position += 1
        taken = self._usable(run)
        return taken[: next((i for i, (p, _) in enumerate(taken) if p != start + i), len(taken))]

    def pick(self, positions: Sequence[int]) -> dict[int, DomainEvent]:
        """The events at these positions that the buffer has (their keys still cached here)."""
        with self._lock:
            run = [(p, *found) for p in positions if (found := self._events.pop(p, None))]
        return dict(self._usable(run))

    def _usable(
        self, run: list[tuple[int, InstanceEvent, str | None]]
    ) -> list[tuple[int, DomainEvent]]:
        """The events of `run` whose keys this process holds now (the others: read the log)."""
        if not run:
            return []
        # Outside the lock: a look for erasures may drop keys, which clears the buffer.
        cached = self._keys.cached({subject for _, _, subject in run if subject is not None})
        return [(p, event) for p, event, subject in run if subject is None or subject in cached]

    def held(self) -> list[tuple[int, DomainEvent]]:
        """The events kept now, by notification id (what the next `take`s may hand over)."""
        with self._lock:
            return sorted(
                ((p, event) for p, (event, _) in self._events.items()), key=lambda e: e[0]
            )

    def clear(self) -> None:
        """Forget every event (a key left the cache: see the class's docstring)."""
        with self._lock:
            self._events.clear()


def _json_text(state: bytes) -> bool:
    """Whether a stored event's state is JSON (a log written without a cipher), not AES-GCM
    output. That begins with its random nonce, so one log in 256 has a first event beginning with
    `{`: only a whole JSON document tells them apart (random bytes never are one). Opening an
    encrypted log without its key would append plaintext to it."""
    try:
        orjson.loads(state)
    except orjson.JSONDecodeError:
        return False
    return True


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
        # This process's newest events, for its live projector (`Recent`; None: no projector).
        self.recent: Recent | None = None
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
            if not encrypted and _json_text(first[0].state):
                return  # plain JSON, so not encrypted: merely invalid, which reading it will say
            hint = (
                "the key does not match the one the log was written with"
                if encrypted
                else (
                    f"the log is encrypted (or its first event is not JSON): set {CIPHER_KEY_ENV}"
                    " or pass cipher_key"
                )
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
            keys = self.keys.for_users(
                [
                    user_id
                    for e in events
                    if isinstance(e, InstanceEvent)
                    and not (user_id := e.user_id).startswith(ERASED_USER_PREFIX)
                ]
            )
            try:
                ids = self._append(events, keys)
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
            if self.recent is not None and decided_here and ids:  # imports: not the caller's
                self.recent.add(ids, events, keys)
            return ids[-1] if ids else 0

    def _append(
        self, events: Sequence[DomainEvent], keys: Mapping[str, SealedKey]
    ) -> Sequence[int]:
        """Record the events (all or none), sealed with `keys`; their notification ids, once
        committed."""
        if self._group is not None:
            return self._group.append(events, keys)
        with self.write_lock:
            recordings = self.app.save(*events)
        return [recording.notification.id for recording in recordings]

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
        if plain and isinstance(self.app.recorder, SQLiteApplicationRecorder):
            return self._read_plain_rows(self.app.recorder, start, limit, contain=contain)
        with self.errors("reading the log"):
            page = self.app.recorder.select_notifications(start, limit)
        decoded = self._decode(page, contain=contain, plain=plain)
        return list(zip((n.id for n in page), decoded, strict=True))

    def _read_plain_rows(
        self, recorder: SQLiteApplicationRecorder, start: int, limit: int, *, contain: bool
    ) -> list[tuple[int, Any]]:
        """`read(start, limit, plain=True)` on SQLite, straight from the driver's rows.

        `select_notifications` builds a `Notification` and a `UUID` per row (and reads it
        through `sqlite3.Row`): 3 of a rebuild's 14 µs per event of reading and decoding. Here
        the rows are plain tuples, an instance's id is converted once per page (the recorder's
        own conversion), and only a page holding an event that does not decode is read again
        the usual way, to name it exactly as `_decode` does.
        """
        with self.errors("reading the log"), recorder.datastore.transaction(commit=False) as c:
            cursor = c.sqlite_cursor
            cursor.row_factory = None  # tuples, not sqlite3.Row
            cursor.execute(
                "SELECT rowid, originator_id, originator_version, topic, state FROM "
                f"{recorder.events_table_name} WHERE rowid>=? ORDER BY rowid LIMIT ?",
                (start, limit),
            )
            found = cursor.fetchall()
            convert, ids = recorder.convert_originator_id, dict[Any, Any]()
            rows = [
                (ids[o] if o in ids else ids.setdefault(o, convert(o)), v, t, s)
                for _, o, v, t, s in found
            ]
        try:
            events: list[Any] = cast(PydanticMapper, self.app.mapper).to_plain_rows(rows)
        except CorruptEventError:
            if not contain:
                raise
            page = [
                Notification(id=n, originator_id=o, originator_version=v, topic=t, state=s)
                for (n, *_), (o, v, t, s) in zip(found, rows, strict=True)
            ]
            events = self._decode(page, contain=True, plain=True)
        return list(zip((n for n, *_ in found), events, strict=True))

    def _decode(
        self, page: Sequence[Notification], *, contain: bool, plain: bool = False
    ) -> list[Any]:
        """The events of `page`, decoded (an `UnreadableEvent` in place of a bad one if `contain`;
        `PlainEvent`s if `plain`)."""
        if not page:
            return []
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
        return events

    def read_live(self, start: int, limit: int = 1000) -> list[tuple[int, Any]]:
        """`read(start, limit, contain=True)`, this process's own newest events taken as they were
        appended (`Recent`) rather than read and decoded again; the rest read from the log."""
        recent = self.recent
        if recent is None:
            return self.read(start, limit, contain=True)
        taken = recent.take(start, limit)
        if len(taken) == limit:
            return taken
        # Whatever follows (other processes' events, the log's end, ours after a gap) comes
        # from the log: the ids `taken` holds are ours alone, so this is exactly the page `read`
        # would return. Of its rows, those the buffer still has need no decoding either.
        after = taken[-1][0] + 1 if taken else start
        with self.errors("reading the log"):
            page = self.app.recorder.select_notifications(after, limit - len(taken))
        known = recent.pick([notification.id for notification in page])
        decoded = iter(self._decode([n for n in page if n.id not in known], contain=True))
        return [*taken, *((n.id, known[n.id] if n.id in known else next(decoded)) for n in page)]

    def position(self) -> int:
        """The notification id of the newest event in the log (0 when the log is empty)."""
        with self.errors("reading the log"):
            return self.app.recorder.max_notification_id() or 0
