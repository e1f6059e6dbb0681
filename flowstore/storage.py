"""Where the log lives: a database URL turned into eventsourcing settings.

    sqlite:///relative/path.db   sqlite:////absolute/path.db     (the embedded default)
    postgresql://user:password@host:5432/dbname?schema=flows&pool_size=5
    memory://                                                    (in-process, for tests and demos)

This sits in `flowstore/` rather than `adapters/` because choosing storage is part of constructing a
`FlowStore`, and dependencies must point from adapters to the core, not back.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

from flowstore.errors import StorageConfigError

__all__ = ["DEFAULT_URL", "StorageConfig", "StorageConfigError", "parse_url", "resolve_url"]

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


_CONNECT_TIMEOUT = "2"
"""Seconds a PostgreSQL call waits for a connection per attempt, unless the URL sets connect_timeout."""

_POSTGRES_OPTIONS = {
    "schema": "POSTGRES_SCHEMA",
    "pool_size": "POSTGRES_POOL_SIZE",
    "max_overflow": "POSTGRES_MAX_OVERFLOW",
    "connect_timeout": "POSTGRES_CONNECT_TIMEOUT",
    "lock_timeout": "POSTGRES_LOCK_TIMEOUT",
}


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
        env = {"PERSISTENCE_MODULE": "eventsourcing.sqlite", "SQLITE_DBNAME": path}
        return StorageConfig("sqlite", env, f"sqlite:///{path}", url)
    if scheme in ("postgresql", "postgres"):
        if not parts.hostname or not parts.path.strip("/"):
            raise StorageConfigError(
                f"PostgreSQL URL {_mask(url)!r} needs a host and a database name", url=_mask(url)
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
