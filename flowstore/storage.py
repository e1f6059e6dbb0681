"""Where the log lives: a database URL turned into eventsourcing settings.

    sqlite:///relative/path.db   sqlite:////absolute/path.db     (the embedded default)
    postgresql://user:password@host:5432/dbname?schema=flows&pool_size=5
    memory://                                                    (in-process, for tests and demos)

This sits in `flowstore/` rather than `adapters/` because choosing storage is part of constructing a
`FlowStore`, and dependencies must point from adapters to the core, not back.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, unquote, urlsplit

from flowstore.errors import StorageConfigError

if TYPE_CHECKING:
    from sqlalchemy import Engine

__all__ = [
    "DEFAULT_URL",
    "KEEPALIVES",
    "POOL_SIZE_ENV",
    "POOL_TIMEOUT_ENV",
    "POSTGRES_RECORDER",
    "READ_ONLY",
    "SQLITE_PERSISTENCE",
    "StorageConfig",
    "StorageConfigError",
    "connect_dedicated",
    "make_engine",
    "parse_url",
    "resolve_url",
    "serialize_ddl",
]

DEFAULT_URL = "sqlite:///flowstore.db"
"""The embedded default: a SQLite file in the working directory."""


@dataclass(frozen=True)
class StorageConfig:
    """A parsed database URL: the backend, eventsourcing's settings, and a SQLAlchemy URL."""

    backend: str
    """One of "sqlite", "postgres", "memory"."""
    env: dict[str, str] = field(default_factory=dict)
    sqlalchemy_url: str | None = None
    """The same database for SQLAlchemy (None for memory://)."""
    display: str = ""
    """The URL with any password masked, for logs and errors."""


SQLITE_PERSISTENCE = "flowstore.sqlitelog:SecureSQLiteFactory"
"""The eventsourcing persistence topic of SQLite stores."""

POSTGRES_RECORDER = "flowstore.pglog:OneTripRecorder"
"""The eventsourcing application recorder of PostgreSQL stores (`flowstore.pglog`)."""

_CONNECT_TIMEOUT = "2"
"""Seconds a PostgreSQL call waits for a connection per attempt, unless the URL sets connect_timeout."""

_POSTGRES_OPTIONS = {
    "schema": "POSTGRES_SCHEMA",
    "pool_size": "POSTGRES_POOL_SIZE",
    "max_overflow": "POSTGRES_MAX_OVERFLOW",
    "connect_timeout": "POSTGRES_CONNECT_TIMEOUT",
    "lock_timeout": "POSTGRES_LOCK_TIMEOUT",
}


_POSTGRES_MODULES = ("psycopg", "psycopg_pool")
"""What the postgres extra installs and eventsourcing.postgres imports."""


def resolve_url(url: str | None) -> str:
    """The URL to use: the one given, else $FLOWSTORE_URL, else the embedded SQLite default."""
    return url or os.environ.get("FLOWSTORE_URL") or DEFAULT_URL


def parse_url(url: str) -> StorageConfig:
    """Turn a database URL into settings; raise `StorageConfigError` naming what is wrong."""
    parts = urlsplit(url)
    scheme = parts.scheme.split("+", 1)[0].lower()
    if scheme == "memory":
        return StorageConfig("memory", {"PERSISTENCE_MODULE": "eventsourcing.popo"}, None, url)
    if scheme == "sqlite":
        # SQLAlchemy's convention: sqlite:///rel.db is relative, sqlite:////abs.db absolute.
        raw = url.split("://", 1)[1]
        path = raw[1:] if raw.startswith("/") else raw
        path = path.split("?", 1)[0]
        if not path or path == ":memory:":
            raise StorageConfigError(
                f"SQLite URL {url!r} names no file; use sqlite:///path/to.db or memory://", url=url
            )
        parent = Path(path).expanduser().resolve().parent
        if not parent.is_dir():
            raise StorageConfigError(
                f"SQLite URL {url!r}: directory {str(parent)!r} does not exist", url=url
            )
        # eventsourcing's SQLite persistence, with secure_delete on its connections (sqlitelog.py).
        env = {"PERSISTENCE_MODULE": SQLITE_PERSISTENCE, "SQLITE_DBNAME": path}
        return StorageConfig("sqlite", env, f"sqlite:///{path}", url)
    if scheme in ("postgresql", "postgres"):
        if not parts.hostname or not parts.path.strip("/"):
            raise StorageConfigError(
                f"PostgreSQL URL {_mask(url)!r} needs a host and a database name", url=_mask(url)
            )
        missing = [m for m in _POSTGRES_MODULES if importlib.util.find_spec(m) is None]
        if missing:
            # Said here, before eventsourcing's import of psycopg fails deep in the application's
            # constructor with a traceback that does not name the fix.
            raise StorageConfigError(
                f"PostgreSQL needs the postgres extra ({', '.join(missing)} not installed): "
                "pip install 'flowstore-es[postgres]'",
                url=_mask(url),
                missing=missing,
            )
        env = {
            "PERSISTENCE_MODULE": "eventsourcing.postgres",
            "POSTGRES_DBNAME": unquote(parts.path.strip("/")),
            "POSTGRES_HOST": parts.hostname,
            "POSTGRES_PORT": str(parts.port or 5432),
            "POSTGRES_USER": unquote(parts.username or ""),
            "POSTGRES_PASSWORD": unquote(parts.password or ""),
            # How long a call waits for a pooled connection, per attempt; eventsourcing makes ten
            # attempts. Its default of 30 s kept a command 2 to 5 minutes on a database that is
            # down; with 2 s it fails within about 22 s (raise it with ?connect_timeout=).
            "POSTGRES_CONNECT_TIMEOUT": _CONNECT_TIMEOUT,
            # eventsourcing's recorder, appending in one round trip rather than two.
            "APPLICATION_RECORDER_TOPIC": POSTGRES_RECORDER,
            # Not POSTGRES_ENABLE_DB_FUNCTIONS: its insert function (eventsourcing 9.5.6) skips the
            # LOCK TABLE that keeps notification ids in commit order, so followers of the log
            # (projections, the Kafka publisher) skipped late-committing events under concurrent
            # writers (tests/reliability/test_load.py). Three times faster, and wrong.
        }
        for key, values in parse_qs(parts.query).items():
            if key not in _POSTGRES_OPTIONS:
                raise StorageConfigError(
                    f"Unknown PostgreSQL URL option {key!r}; known: {sorted(_POSTGRES_OPTIONS)}",
                    url=_mask(url),
                )
            env[_POSTGRES_OPTIONS[key]] = values[-1]
        netloc = parts.netloc
        sa_url = f"postgresql+psycopg://{netloc}{parts.path}"
        return StorageConfig("postgres", env, sa_url, _mask(url))
    raise StorageConfigError(
        f"Unsupported database URL {_mask(url)!r}: use sqlite:///..., postgresql://... or memory://",
        url=_mask(url),
    )


def _mask(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    return url.replace(f":{parts.password}@", ":***@", 1)


POOL_SIZE_ENV = "FLOWSTORE_POOL_SIZE"
"""Connections the store's SQLAlchemy engine keeps open (default 5, plus as many again on demand)."""

POOL_TIMEOUT_ENV = "FLOWSTORE_POOL_TIMEOUT"
"""Seconds a call waits for a free pooled connection before `StorageUnavailableError` (default 30)."""

READ_ONLY = {"flowstore_read_only": True}
"""Execution options for a connection that only reads: on SQLite its transactions begin deferred,
so readers never wait for (or hold) the write lock."""


_DDL_LOCK = 0x666C6F7773746F72  # "flowstor": one key for every flowstore's CREATE TABLEs


def serialize_ddl(conn: Any) -> None:
    """Make this transaction's CREATE TABLE IF NOT EXISTS safe against other processes' own.

    Processes starting together on a new PostgreSQL database race on CREATE TABLE (both see no
    table, the second fails on the catalog's unique index): a transaction-level advisory lock
    queues them. SQLite needs nothing (its writers' BEGIN IMMEDIATE already does).
    """
    if conn.dialect.name == "postgresql":
        from sqlalchemy import text

        conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _DDL_LOCK})


KEEPALIVES: dict[str, Any] = {
    "keepalives": 1,
    "keepalives_idle": 5,
    "keepalives_interval": 2,
    "keepalives_count": 3,
}
"""libpq settings for a dedicated connection: a silent peer is declared dead after about 11 s."""


def connect_dedicated(config: StorageConfig, application_name: str, **settings: Any) -> Any:
    """A psycopg connection of its own to the store's PostgreSQL: autocommit, TCP keepalives.

    For what must live exactly as long as one connection (a session advisory lock, a LISTEN):
    autocommit so that it outlives every transaction on it, keepalives so that the server notices
    within seconds when this side goes silent, and outside the engine's pool, which could recycle
    the connection (pre-ping, overflow) under its holder's feet. `settings` (libpq parameters)
    override the keepalives (a leader's lease scales them, `flowstore.leader`).
    """
    import psycopg

    env = config.env
    return psycopg.connect(
        host=env.get("POSTGRES_HOST"),
        port=env.get("POSTGRES_PORT"),
        dbname=env.get("POSTGRES_DBNAME"),
        user=env.get("POSTGRES_USER"),
        password=env.get("POSTGRES_PASSWORD"),
        connect_timeout=int(env.get("POSTGRES_CONNECT_TIMEOUT") or _CONNECT_TIMEOUT),
        autocommit=True,
        application_name=application_name[:63],  # PostgreSQL's limit (NAMEDATALEN - 1)
        **{**KEEPALIVES, **settings},
    )


def make_engine(config: StorageConfig, *, pool_size: int | None = None) -> Engine:
    """The store's one SQLAlchemy engine: projections, users' keys and trackers share it.

    SQLite: transactions are real and writers take the lock at BEGIN (`BEGIN IMMEDIATE`, so that
    reading a tracking row and moving it is one atomic step), except on connections opened with
    `READ_ONLY`; deleted rows are overwritten on disk (`secure_delete`), and commits skip the fsync
    (the events, written by eventsourcing's own connection with synchronous=FULL, carry it; in WAL
    mode a later fsync makes every earlier commit durable too). PostgreSQL: pre-pinged
    connections, the URL's schema as the search path, and `pool_size` connections plus as many
    again on demand (default: the URL's `pool_size`, else `$FLOWSTORE_POOL_SIZE`, else 5).
    """
    import orjson
    from sqlalchemy import create_engine, event
    from sqlalchemy.pool import StaticPool

    def _json(value: Any) -> str:  # JSON columns written with orjson, like the events
        return orjson.dumps(value).decode()

    size = pool_size or int(
        config.env.get("POSTGRES_POOL_SIZE") or os.environ.get(POOL_SIZE_ENV) or 5
    )
    timeout = float(os.environ.get(POOL_TIMEOUT_ENV) or 30)
    if config.sqlalchemy_url is None:
        # memory:// keeps its tables in an in-process SQLite database on one shared connection.
        engine = create_engine(
            "sqlite://",
            poolclass=StaticPool,
            connect_args={"check_same_thread": False},
            json_serializer=_json,
        )
    elif config.backend == "sqlite":
        engine = create_engine(
            config.sqlalchemy_url,
            connect_args={"timeout": 60},
            json_serializer=_json,
            pool_size=size,
            max_overflow=size,
            pool_timeout=timeout,
        )
    else:
        schema = config.env.get("POSTGRES_SCHEMA")
        connect_args: dict[str, Any] = {"options": f"-csearch_path={schema}"} if schema else {}
        engine = create_engine(
            config.sqlalchemy_url,
            pool_pre_ping=True,
            json_serializer=_json,
            pool_size=size,
            max_overflow=size,
            pool_timeout=timeout,
            connect_args=connect_args,
        )
    if engine.dialect.name == "sqlite":
        from flowstore.sqlitelog import opened_read_only  # with eventsourcing: SQLite only

        @event.listens_for(engine, "connect")
        def _connect(dbapi_connection: Any, _: Any) -> None:
            # pysqlite's own transaction handling starts transactions late and never for SELECT;
            # SQLAlchemy's documented recipe hands control back to us.
            dbapi_connection.isolation_level = None
            dbapi_connection.execute("PRAGMA synchronous=NORMAL")
            dbapi_connection.execute("PRAGMA secure_delete=ON")

        @event.listens_for(engine, "handle_error")
        def _read_only(context: Any) -> None:
            # A connection that has the file read-only stays so: drop it rather than pool it
            # (`sqlitelog.opened_read_only`); the next one opens the file as it is then.
            if opened_read_only(context.original_exception):
                context.is_disconnect = True
                context.invalidate_pool_on_disconnect = False  # the others may be fine

        @event.listens_for(engine, "begin")
        def _begin(conn: Any) -> None:
            read_only = conn.get_execution_options().get("flowstore_read_only")
            conn.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")

    return engine
