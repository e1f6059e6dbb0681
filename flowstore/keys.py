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
import itertools
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

from flowstore.inputs import ERASED_USER_PREFIX
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
_NONCE_SPACE = 1 << (8 * _NONCE)
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


class _Nonces:
    """AES-GCM nonces for every key of this process: a 96-bit counter from a random start.

    A nonce must never repeat under one key, and a user's key is used by every thread and
    process of every store. In this process the counter never repeats (before 2**96 nonces);
    each process, and each forked child (re-seeded at the fork, before any of its threads can
    seal), starts at its own random point, so two processes collide only if their starts lie
    within the nonces they use of each other: about n*m/2**95 for n and m nonces, the same
    birthday bound as drawing every nonce at random. Unlike `os.urandom` per nonce it makes no
    system call, which would hand the GIL to another thread (the live projector) in the middle
    of each command.
    """

    def __init__(self) -> None:
        self._reseed()
        os.register_at_fork(after_in_child=self._reseed)

    def _reseed(self) -> None:
        self._counter = itertools.count(int.from_bytes(os.urandom(_NONCE), "big"))

    def __call__(self) -> bytes:
        """The next nonce (one C call under the GIL: no two threads ever get the same value)."""
        return (next(self._counter) % _NONCE_SPACE).to_bytes(_NONCE, "big")


_nonce = _Nonces()


@dataclass(frozen=True)
class SealedKey:
    """One user key, ready to seal and open: its subject id and its AES-GCM cipher."""

    subject: str
    aead: AESGCM

    def seal(self, plaintext: bytes, context: bytes) -> bytes:
        """Encrypt, bound to `context` (the event's id and version: a sealed blob cannot move)."""
        nonce = _nonce()
        return nonce + self.aead.encrypt(nonce, plaintext, context)

    def open(self, sealed: bytes, context: bytes) -> bytes | None:
        """Decrypt; None when the blob was not sealed by this key for this context."""
        try:
            return self.aead.decrypt(sealed[:_NONCE], sealed[_NONCE:], context)
        except (InvalidTag, ValueError):
            return None


class UserKeys(ABC):
    """Finds or creates users' keys, with a cache in front of the key table.

    A key never changes once created; it only disappears when its user is erased. So keys found
    are cached for good (a full cache starts afresh), and only "no such key" answers expire, after
    `refresh` seconds. The erasing process drops its copies at once (`shred`). Other processes
    learn of erasures from the log (`watch`): at most every `refresh` seconds, one thread (the
    others go on meanwhile) asks for the subjects of the `FlowErased` events appended since its
    last look, which erasure appends before it shreds, and drops those keys; they are then never
    cached again, until this process creates the user a new key. A write racing an erasure
    elsewhere is covered by the erasure's second pass (`flowstore.erasure`). `refresh` 0 turns
    the cache off. In this process, `user_lock` orders a user's writes against the shredding of
    their key: a write that holds it from key lookup to append can never be sealed with a key
    deleted meanwhile, and a lookup that started before a shred caches nothing (`_generation`).
    """

    _BOUND = 100_000

    def __init__(self, refresh: float = 1.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.refresh = refresh
        self._clock = clock
        self._lock = threading.Lock()
        # Misses load one at a time: threads missing the same key at once make one query, not N.
        self._loading = threading.Lock()
        self._by_user: dict[str, SealedKey] = {}
        self._by_subject: dict[str, SealedKey] = {}
        self._gone: dict[str, float] = {}  # subject -> until when "shredded" is trusted
        self._erasing: set[str] = set()  # user ids and subjects seen erased: never cached
        self._user_of: dict[str, str] = {}  # subject -> user id, of the cached keys
        self._feed: Callable[[], list[str]] | None = None
        self._next_look = 0.0
        self._looking = threading.Lock()
        # Bumped by every shred: a lookup that started before a shred must not cache what it read.
        self._generation = 0
        self._user_locks = [threading.RLock() for _ in range(_USER_LOCK_STRIPES)]
        self._dropped: tuple[Callable[[], None], ...] = ()

    # The storage, per backend

    @abstractmethod
    def _load_users(self, refs: list[str]) -> dict[str, tuple[str, bytes]]:
        """The (subject, key) of each user ref that has a key."""
        ...

    @abstractmethod
    def _insert(self, rows: list[tuple[str, str, bytes]]) -> None:
        """Insert (subject, ref, key) rows; one for a user that already has a key is skipped."""
        ...

    @abstractmethod
    def _load_subjects(self, subjects: list[str]) -> dict[str, bytes]: ...

    @abstractmethod
    def _delete_user(self, ref: str) -> list[str]: ...

    def close(self) -> None:  # noqa: B027 (nothing to release by default, e.g. in memory)
        """Release connections."""

    # The API

    def on_drop(self, listener: Callable[[], None]) -> None:
        """Call `listener()` after keys were dropped from this cache (a shred, a forget, a trim)."""
        self._dropped = (*self._dropped, listener)

    def _tell_dropped(self) -> None:
        for listener in self._dropped:
            listener()

    def cached(self, subjects: Iterable[str]) -> set[str]:
        """Which of `subjects` this process holds the key of right now (after a look for erasures).

        A page decoded now would open exactly these events' sealed fields with the cached keys,
        without asking the key table (`for_subject`).
        """
        self._look()
        return {subject for subject in subjects if subject in self._by_subject}

    def user_lock(self, user_id: str) -> threading.RLock:
        """The lock that orders this user's writes (key lookup to append) against `shred`."""
        # Striped, so memory stays bounded whatever the number of users; re-entrant, so an
        # erasure can append its own events while it holds the user's lock.
        return self._user_locks[hash(user_id) % _USER_LOCK_STRIPES]

    def watch(self, erased_subjects: Callable[[], list[str]]) -> None:
        """Drop cached keys erased elsewhere: `erased_subjects()` gives those since the last call."""
        self._feed = erased_subjects
        self._next_look = self._clock() + self.refresh

    def _look(self) -> None:
        """Forget the keys erased elsewhere, if `refresh` seconds passed since the last look."""
        if self._feed is None or self._clock() < self._next_look:
            return
        if not self._looking.acquire(blocking=False):
            return  # another thread is looking: no stampede
        try:
            if self._clock() >= self._next_look:
                subjects = self._feed()
                self._next_look = self._clock() + self.refresh
                for subject in subjects:
                    self.forget(subject)
        finally:
            self._looking.release()

    def for_user(self, user_id: str) -> SealedKey:
        """The user's current key, created on first use."""
        self._look()
        key = self._by_user.get(user_id)
        if key is not None:
            return key
        return self.for_users((user_id,))[user_id]

    def for_users(self, user_ids: Iterable[str]) -> dict[str, SealedKey]:
        """The current keys of many users, the missing ones loaded (or created) in one go each."""
        self._look()
        keys: dict[str, SealedKey] = {}
        missing: list[str] = []
        cached = self._by_user.get
        for user_id in dict.fromkeys(user_ids):
            key = cached(user_id)
            if key is not None:
                keys[user_id] = key
            else:
                missing.append(user_id)
        if not missing:
            return keys
        with self._loading:
            still = [u for u in missing if u not in self._by_user]
            keys.update((u, self._by_user[u]) for u in missing if u not in still)
            if still:
                keys.update(self._load_or_create(still))
        return keys

    def _load_or_create(self, user_ids: list[str]) -> dict[str, SealedKey]:
        generation = self._generation
        refs = {user_id: _user_ref(user_id) for user_id in user_ids}
        found: dict[str, tuple[str, bytes]] = {}
        for i in range(0, len(user_ids), 500):
            found.update(self._load_users([refs[u] for u in user_ids[i : i + 500]]))
        new = [u for u in user_ids if refs[u] not in found]
        if new:
            self._insert([(uuid4().hex, refs[u], AESGCM.generate_key(_KEY_BITS)) for u in new])
            # Ours, or the ones concurrent writers inserted first.
            found.update(self._load_users([refs[u] for u in new]))
        keys: dict[str, SealedKey] = {}
        with self._lock:
            self._trim()
            for user_id in user_ids:
                subject, raw = found[refs[user_id]]
                key = keys[user_id] = SealedKey(subject, AESGCM(raw))
                if user_id in new:
                    # Created after any erasure of this user: a key that may be kept.
                    self._erasing.discard(user_id)
                if (
                    self.refresh > 0
                    and generation == self._generation  # else read before a shred: not cached
                    and not self._erasing.intersection((user_id, subject))
                ):
                    self._by_user[user_id] = key
                    self._by_subject[subject] = key
                    self._user_of[subject] = user_id
        return keys

    def for_subject(self, subject: str) -> SealedKey | None:
        """The key known by `subject`; None once it has been shredded."""
        self._look()
        key = self._by_subject.get(subject)
        if key is not None:
            return key
        return self._lookup((subject,))[subject]

    def prefetch(self, subjects: Iterable[str]) -> None:
        """Load the keys of many subjects at once (a page of events being decoded)."""
        self._look()
        self._lookup(subjects)

    def forget(self, subject: str) -> None:
        """The key's user is being erased (elsewhere): drop the key and never cache it again."""
        with self._lock:
            if len(self._erasing) > self._BOUND:
                # Forgetting which users were erased is safe only with every cached key dropped.
                self._erasing.clear()
                self._by_user.clear()
                self._by_subject.clear()
                self._user_of.clear()
            self._erasing.add(subject)
            self._by_subject.pop(subject, None)
            user_id = self._user_of.pop(subject, None)
            if user_id is not None:
                self._erasing.add(user_id)
                self._by_user.pop(user_id, None)
        self._tell_dropped()

    def _lookup(self, subjects: Iterable[str]) -> dict[str, SealedKey | None]:
        """The keys of `subjects`, from the cache where known, the rest in one query."""
        now = self._clock()
        keys: dict[str, SealedKey | None] = {}
        missing = []
        for subject in set(subjects):
            key = self._by_subject.get(subject)
            if key is not None:
                keys[subject] = key
            elif self._gone.get(subject, 0.0) > now:
                keys[subject] = None
            else:
                missing.append(subject)
        if missing:
            generation = self._generation
            found = self._load_subjects(sorted(missing))
            with self._lock:
                self._trim()
                for subject in missing:
                    raw = found.get(subject)
                    if raw is None:
                        keys[subject] = None
                        self._gone[subject] = now + self.refresh
                        continue
                    key = keys[subject] = SealedKey(subject, AESGCM(raw))
                    if (
                        self.refresh > 0
                        and generation == self._generation  # else read before a shred
                        and subject not in self._erasing
                    ):
                        self._by_subject[subject] = key
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
                    self._user_of.pop(subject, None)
        self._tell_dropped()
        return subjects

    def _trim(self) -> None:
        # A bound, not an LRU: a full cache is simply started afresh (keys are one read away).
        if len(self._by_subject) > self._BOUND or len(self._by_user) > self._BOUND:
            self._by_subject.clear()
            self._by_user.clear()
            self._user_of.clear()
        if len(self._gone) > self._BOUND:
            self._gone.clear()


class MemoryKeyStore(UserKeys):
    """Keys of a `memory://` store: gone with the process, like its log."""

    def __init__(self, refresh: float = 1.0) -> None:
        super().__init__(refresh)
        self._keys: dict[str, tuple[str, bytes]] = {}  # subject -> (user ref, key)

    def _load_users(self, refs: list[str]) -> dict[str, tuple[str, bytes]]:
        wanted = set(refs)
        return {r: (s, k) for s, (r, k) in list(self._keys.items()) if r in wanted}

    def _insert(self, rows: list[tuple[str, str, bytes]]) -> None:
        with self._lock:
            for subject, ref, key in rows:
                if not self._load_users([ref]):
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
        self._by_refs = select(table.c.user_ref, table.c.subject, table.c.key).where(
            table.c.user_ref.in_(bindparam("refs", expanding=True))
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

    def _load_users(self, refs: list[str]) -> dict[str, tuple[str, bytes]]:
        with self.engine.connect().execution_options(**READ_ONLY) as conn:
            rows = conn.execute(self._by_refs, {"refs": refs})
            return {row.user_ref: (row.subject, self._unwrap(row.key)) for row in rows}

    def _insert(self, rows: list[tuple[str, str, bytes]]) -> None:
        with self.engine.begin() as conn:
            conn.execute(
                self._insert_stmt,
                [{"subject": s, "user_ref": r, "key": self._wrap(k)} for s, r, k in rows],
            )

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
