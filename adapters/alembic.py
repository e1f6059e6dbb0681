"""Living beside an application's own Alembic migrations: the store's tables, and a filter for them.

flowstore creates and migrates its own tables (the event log, the users' keys, the projection and
tracking tables). An application whose Alembic autogenerate compares its models with the same
database would propose to drop them all; in its `env.py`:

    import flowstore
    context.configure(..., include_object=flowstore.alembic_include_object)

`metadata()` holds every table the store may create, as one SQLAlchemy `MetaData`.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import MetaData, Table

from flowstore.adapters.kafka.tracking import TRACKING_TABLE as KAFKA_TRACKING_TABLE
from flowstore.eventlog import log_tables
from flowstore.follow import FOLLOWERS
from flowstore.keys import key_table
from flowstore.projections.tables import REBUILD_SUFFIX, define_tables, tracking_metadata
from flowstore.storage import parse_url

__all__ = ["include_name", "include_object", "is_flowstore_table", "metadata"]


def metadata(url: str | None = None) -> MetaData:
    """Every table a store creates in its database, in one `MetaData` (a fresh one each call).

    With `url`, the event log's table as that backend names it; without, both SQLite's and
    PostgreSQL's. Includes the tables made only when used: a rebuild's twins, the Kafka publisher's
    and the followers' tracking. flowstore creates these itself: do not `create_all` them.
    """
    backend = parse_url(url).backend if url is not None else None
    md = MetaData()
    log_tables(md, None if backend == "memory" else backend)
    key_table(md)
    for suffix in ("", REBUILD_SUFFIX):
        for table in define_tables(suffix).all:
            table.to_metadata(md)
    # The projections' bookkeeping (tracking, unreadable events, quarantine) shares one MetaData.
    for table in (*tracking_metadata.tables.values(), KAFKA_TRACKING_TABLE, FOLLOWERS):
        table.to_metadata(md)
    return md


_NAMES = frozenset(metadata().tables)


def is_flowstore_table(name: str | None) -> bool:
    """Whether `name` is one of the tables a store creates (any backend)."""
    return name is not None and name in _NAMES


def include_object(
    obj: Any, name: str | None, type_: str, reflected: bool, compare_to: Any
) -> bool:
    """Alembic's `include_object` hook: False for the store's tables and everything on them."""
    if type_ == "table":
        return not is_flowstore_table(name)
    table = getattr(obj, "table", None)  # columns, indexes and constraints name their table
    return not (isinstance(table, Table) and is_flowstore_table(table.name))


def include_name(name: str | None, type_: str, parent_names: dict[str, Any]) -> bool:
    """Alembic's `include_name` hook: the store's tables are not even reflected."""
    if type_ == "table":
        return not is_flowstore_table(name)
    return not is_flowstore_table(parent_names.get("table_name"))
