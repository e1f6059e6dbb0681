"""A key per user, so that erasing a user is deleting one key (crypto-shredding).

The personal fields of every instance event (`PERSONAL_FIELDS`: who the user is, what they sent, the
error their input caused) are sealed with AES-GCM under a key of that user's own before the event is
stored; the rest of the event (flow, steps, transition names, times, versions) stays readable, so the
log keeps its shape and the statistics stay countable after an erasure. A key is known by a random
`subject` id stored in the clear beside the sealed fields; `UserKeys.shred(user_id)` deletes the
user's keys, after which their sealed fields can never be opened again, by anyone, while the log
stays append-only.

The keys live in the store's own database (`flowstore_user_keys`), wrapped with the store's cipher
key when one is configured, else in the clear (then a copy of the database holds both the sealed
data and its keys, as it does the events themselves: encryption at rest is `FLOWSTORE_CIPHER_KEY`'s
job; erasure is this module's).
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol
from uuid import uuid4

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from flowstore.definitions import ERASED_USER_PREFIX
from flowstore.sqlitelog import wipe_wal
from flowstore.storage import READ_ONLY, StorageConfig, make_engine

if TYPE_CHECKING:
    from sqlalchemy import Engine, MetaData, Table

__all__ = [
    "ERASED_USER_PREFIX",
    "KEY_TABLE",
    "PERSONAL_FIELDS",
    "KeyWrapper",
    "MemoryKeyStore",
    "SealedKey",
    "SqlKeyStore",
    "UserKeys",
    "erased_user_id",
    "key_table",
]

KEY_TABLE = "flowstore_user_keys"
"""The table of the users' keys, in the store's database."""

PERSONAL_FIELDS = ("user_id", "payload", "error", "message", "entity_id")
"""The fields of instance events that say something about a person; sealed with the user's key.

`message` and `entity_id` (the OwlMeans model's fields) came later: events written before them
have none, and read with their defaults."""


_log = logging.getLogger(__name__)

_NONCE = 12
_USER_LOCK_STRIPES = 256
_KEY_BITS = 256


def erased_user_id(subject: str) -> str:
    """The stand-in user id of the events sealed with `subject`'s key once that key is shredded."""
    return f"{ERASED_USER_PREFIX}{subject}"


def _user_ref(user_id: str) -> str:
    # Keys are looked up by a digest rather than the user id: the key table holds no personal data.
    return hashlib.sha256(user_id.encode("utf-8", "surrogatepass")).hexdigest()


class KeyWrapper(Protocol):
    """Encrypts keys at rest (the store's cipher when `FLOWSTORE_CIPHER_KEY` is set)."""

    def encrypt(self, plaintext: bytes) -> bytes:
        """Encrypt a key."""
        ...

    def decrypt(self, ciphertext: bytes) -> bytes:
        """Decrypt a key."""
        ...


@dataclass(frozen=True)
class SealedKey:
    """One user key, ready to seal and open: its subject id and its AES-GCM cipher."""

    subject: str
    aead: AESGCM

    def seal(self, plaintext: bytes, context: bytes) -> bytes:
        """Encrypt, bound to `context` (the event's id and version: a sealed blob cannot move)."""
        nonce = os.urandom(_NONCE)
        return nonce + self.aead.encrypt(nonce, plaintext, context)

    def open(self, sealed: bytes, context: bytes) -> bytes | None:
        """Decrypt; None when the blob was not sealed by this key for this context."""
        try:
            return self.aead.decrypt(sealed[:_NONCE], sealed[_NONCE:], context)
        except (InvalidTag, ValueError):
            return None


class UserKeys(ABC):
    """Finds or creates users' keys, with a short-lived cache in front of the key table.

    Cached entries live `refresh` seconds: a key shredded by another process stops being used here
    within that time (the erasing process itself forgets it at once). In this process, `user_lock`
    orders a user's writes against the shredding of their key: a write that holds it from key lookup
    to append can never be sealed with a key deleted meanwhile.
    """

    def __init__(self, refresh: float = 1.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.refresh = refresh
        self._clock = clock
        self._lock = threading.Lock()
        self._by_user: dict[str, tuple[SealedKey, float]] = {}
        self._by_subject: dict[str, tuple[SealedKey | None, float]] = {}
        # Bumped by every shred: a lookup that started before a shred must not cache what it read.
        self._generation = 0
        self._user_locks = [threading.RLock() for _ in range(_USER_LOCK_STRIPES)]

    # The storage, per backend

    @abstractmethod
    def _load_user(self, ref: str) -> tuple[str, bytes] | None: ...

    @abstractmethod
    def _insert(self, subject: str, ref: str, key: bytes) -> None:
        """Insert a key; a concurrent insert for the same user must make this a no-op."""
        ...

    @abstractmethod
    def _load_subjects(self, subjects: list[str]) -> dict[str, bytes]: ...

    @abstractmethod
    def _delete_user(self, ref: str) -> list[str]: ...

    def close(self) -> None:  # noqa: B027 (nothing to release by default, e.g. in memory)
        """Release connections."""

    # The API

    def user_lock(self, user_id: str) -> threading.RLock:
        """The lock that orders this user's writes (key lookup to append) against `shred`."""
        # Striped, so memory stays bounded whatever the number of users; re-entrant, so an
        # erasure can append its own events while it holds the user's lock.
        return self._user_locks[hash(user_id) % _USER_LOCK_STRIPES]

    def for_user(self, user_id: str) -> SealedKey:
        """The user's current key, created on first use."""
        now = self._clock()
        cached = self._by_user.get(user_id)
        if cached is not None and cached[1] > now:
            return cached[0]
        generation = self._generation
        ref = _user_ref(user_id)
        found = self._load_user(ref)
        if found is None:
            self._insert(uuid4().hex, ref, AESGCM.generate_key(_KEY_BITS))
            found = self._load_user(ref)  # ours, or the one a concurrent writer inserted first
            assert found is not None
        key = SealedKey(found[0], AESGCM(found[1]))
        self._remember(user_id, key, now, generation)
        return key

    def for_subject(self, subject: str) -> SealedKey | None:
        """The key known by `subject`; None once it has been shredded."""
        return self._lookup((subject,))[subject]

    def prefetch(self, subjects: Iterable[str]) -> None:
        """Load the keys of many subjects at once (a page of events being decoded)."""
        self._lookup(subjects)

    def _lookup(self, subjects: Iterable[str]) -> dict[str, SealedKey | None]:
        """The keys of `subjects`, from the cache where fresh, the rest in one query."""
        now = self._clock()
        keys: dict[str, SealedKey | None] = {}
        missing = []
        for subject in set(subjects):
            cached = self._by_subject.get(subject)
            if cached is not None and cached[1] > now:
                keys[subject] = cached[0]
            else:
                missing.append(subject)
        if missing:
            generation = self._generation
            found = self._load_subjects(sorted(missing))
            with self._lock:
                self._trim()
                for subject in missing:
                    raw = found.get(subject)
                    keys[subject] = SealedKey(subject, AESGCM(raw)) if raw is not None else None
                    if generation == self._generation:  # else read before a shred: not cached
                        self._by_subject[subject] = (keys[subject], now + self.refresh)
        return keys

    def shred(self, user_id: str) -> list[str]:
        """Delete every key of the user for good; return their subjects.

        The caches are cleared once the delete has committed, and lookups that started before it
        cache nothing: no key outlives its row in this process.
        """
        with self.user_lock(user_id):
            with self._lock:
                self._generation += 1
            subjects = self._delete_user(_user_ref(user_id))
            with self._lock:
                self._generation += 1
                self._by_user.pop(user_id, None)
                for subject in subjects:
                    self._by_subject.pop(subject, None)
        return subjects

    def _remember(self, user_id: str, key: SealedKey, now: float, generation: int) -> None:
        with self._lock:
            if generation != self._generation:
                return  # a shred ran while the key was read: it may be gone already
            self._trim()
            self._by_user[user_id] = (key, now + self.refresh)
            self._by_subject[key.subject] = (key, now + self.refresh)

    def _trim(self) -> None:
        # A bound, not an LRU: a full cache is simply started afresh (keys are one read away).
        if len(self._by_subject) > 100_000:
            self._by_subject.clear()
            self._by_user.clear()


class MemoryKeyStore(UserKeys):
    """Keys of a `memory://` store: gone with the process, like its log."""

    def __init__(self, refresh: float = 1.0) -> None:
        super().__init__(refresh)
        self._keys: dict[str, tuple[str, bytes]] = {}  # subject -> (user ref, key)

    def _load_user(self, ref: str) -> tuple[str, bytes] | None:
        return next(((s, k) for s, (r, k) in self._keys.items() if r == ref), None)

    def _insert(self, subject: str, ref: str, key: bytes) -> None:
        with self._lock:
            if self._load_user(ref) is None:
                self._keys[subject] = (ref, key)

    def _load_subjects(self, subjects: list[str]) -> dict[str, bytes]:
        return {s: self._keys[s][1] for s in subjects if s in self._keys}

    def _delete_user(self, ref: str) -> list[str]:
        with self._lock:
            subjects = [s for s, (r, _) in self._keys.items() if r == ref]
            for subject in subjects:
                del self._keys[subject]
        return subjects


def key_table(metadata: MetaData) -> Table:
    """The `flowstore_user_keys` table (one key per user) in `metadata`."""
    from sqlalchemy import Column, LargeBinary, String, Table

    return Table(
        KEY_TABLE,
        metadata,
        Column("subject", String(32), primary_key=True),
        Column("user_ref", String(64), nullable=False, unique=True),
        Column("key", LargeBinary, nullable=False),
    )


class SqlKeyStore(UserKeys):
    """Keys in the `flowstore_user_keys` table of the store's SQLite or PostgreSQL database."""

    def __init__(
        self,
        config: StorageConfig,
        wrapper: KeyWrapper | None = None,
        refresh: float = 1.0,
        engine: Engine | None = None,
    ) -> None:
        # Imported here: the domain modules stay importable without SQLAlchemy.
        from sqlalchemy import (
            MetaData,
            bindparam,
            delete,
            select,
        )
        from sqlalchemy.dialects import postgresql, sqlite
        from sqlalchemy.exc import DBAPIError

        super().__init__(refresh)
        assert config.sqlalchemy_url is not None
        self._wrapper = wrapper
        sqlite_file = config.backend == "sqlite"
        # The store's one engine (`make_engine`: on SQLite it overwrites deleted keys on disk,
        # `secure_delete`), or one of our own.
        self._owns_engine = engine is None
        self.engine = engine if engine is not None else make_engine(config)
        md = MetaData()
        self.table = table = key_table(md)
        self._sqlite_file = sqlite_file
        for attempt in range(5):
            try:
                md.create_all(self.engine, checkfirst=True)
                break
            except DBAPIError:
                # Processes opening a new PostgreSQL database together race on CREATE TABLE.
                if attempt == 4:
                    raise
                time.sleep(0.05 * (attempt + 1))
        insert: Any = sqlite.insert if sqlite_file else postgresql.insert
        self._insert_stmt = insert(table).on_conflict_do_nothing()
        self._by_ref = select(table.c.subject, table.c.key).where(
            table.c.user_ref == bindparam("ref")
        )
        self._by_subjects = select(table.c.subject, table.c.key).where(
            table.c.subject.in_(bindparam("subjects", expanding=True))
        )
        self._delete_ref = delete(table).where(table.c.user_ref == bindparam("ref"))
        self._refs = select(table.c.subject).where(table.c.user_ref == bindparam("ref"))

    def close(self) -> None:
        """Release connections (of an engine of our own; the store disposes of its engine)."""
        if self._owns_engine:
            self.engine.dispose()

    def _wrap(self, key: bytes) -> bytes:
        return self._wrapper.encrypt(key) if self._wrapper else key

    def _unwrap(self, stored: bytes) -> bytes:
        return self._wrapper.decrypt(stored) if self._wrapper else stored

    def _load_user(self, ref: str) -> tuple[str, bytes] | None:
        with self.engine.connect().execution_options(**READ_ONLY) as conn:
            row = conn.execute(self._by_ref, {"ref": ref}).first()
        return (row.subject, self._unwrap(row.key)) if row else None

    def _insert(self, subject: str, ref: str, key: bytes) -> None:
        with self.engine.begin() as conn:
            row = {"subject": subject, "user_ref": ref, "key": self._wrap(key)}
            conn.execute(self._insert_stmt, row)

    def _load_subjects(self, subjects: list[str]) -> dict[str, bytes]:
        found: dict[str, bytes] = {}
        with self.engine.connect().execution_options(**READ_ONLY) as conn:
            for i in range(0, len(subjects), 500):
                rows = conn.execute(self._by_subjects, {"subjects": subjects[i : i + 500]})
                found.update((row.subject, self._unwrap(row.key)) for row in rows)
        return found

    def _delete_user(self, ref: str) -> list[str]:
        from sqlalchemy import text

        with self.engine.begin() as conn:
            subjects = list(conn.execute(self._refs, {"ref": ref}).scalars())
            conn.execute(self._delete_ref, {"ref": ref})
            deleted_by = (
                None
                if self._sqlite_file
                else int(conn.execute(text("SELECT txid_current()")).scalar_one())
            )
        if subjects:
            purged = self.purge_deleted(deleted_by)
            if not purged:
                _log.warning(
                    "an erased key's bytes may remain on disk: %s",
                    "a reader kept SQLite's WAL from being truncated"
                    if self._sqlite_file
                    else "a transaction older than the erasure was still open; run "
                    "VACUUM FULL flowstore_user_keys once it has ended",
                )
        return subjects

    def purge_deleted(self, deleted_by: int | None = None) -> bool:
        """Remove deleted rows' bytes from where the database still keeps them; True when done.

        SQLite: the rows were overwritten in the file (secure_delete); the WAL still holds the frames
        written before, so it is checkpointed and truncated. PostgreSQL: a deleted row stays in its
        heap page, and plain VACUUM only marks its space free (the bytes stay until reused), so the
        small key table is rewritten (VACUUM FULL: a new file; the old one is unlinked). Its WAL,
        and any base backup, keep the row until they are recycled: see README "Erasure".
        """
        from sqlalchemy import text

        if self._sqlite_file:
            # On the DBAPI connection: the engine's connections begin every SQLAlchemy
            # transaction with BEGIN IMMEDIATE, and a checkpoint must run outside any.
            raw = self.engine.raw_connection()
            try:
                return wipe_wal(raw)
            finally:
                raw.close()
        with self.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            # VACUUM FULL copies a deleted row that a snapshot older than the delete may still
            # see: wait (briefly) until no other session of this database holds one.
            quiet = deleted_by is None or self._wait_for_newer_snapshots(conn, deleted_by)
            conn.execute(text(f"VACUUM FULL {self.table.name}"))
            return quiet

    @staticmethod
    def _wait_for_newer_snapshots(conn: Any, xid: int, timeout: float = 5.0) -> bool:
        from sqlalchemy import text

        older = text(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND pid <> pg_backend_pid() AND backend_xmin IS NOT NULL "
            "AND age(backend_xmin) >= age(CAST(CAST(:xid AS text) AS xid))"
        )
        deadline = time.monotonic() + timeout
        while conn.execute(older, {"xid": xid % 2**32}).scalar_one():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)  # polling the server's view of open snapshots, not a test's sync
        return True
