"""An application's Alembic autogenerate, on the database a store created, leaves the store's tables alone."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Column, Integer, MetaData, Table, create_engine, inspect
from sqlalchemy.engine import Connection

import flowstore
from flowstore import FlowStore
from flowstore.domain import DomainEvent
from tests.flows import linear

_APP_MODELS = """
from sqlalchemy import Column, Integer, MetaData, String, Table

metadata = MetaData()
Table("widgets", metadata, Column("id", Integer, primary_key=True), Column("name", String(50)))
"""


def _ignore(event: DomainEvent, connection: Connection) -> None:
    pass


@pytest.fixture
def used_database(store_url: str) -> str:
    """A database a store has created every table in that it makes on its own; its SQLAlchemy URL."""
    with FlowStore(store_url) as store:
        store.create_flow(linear("line"))
        store.execute_transition("u1", "line", "next")
        follower = store.follow("audit", _ignore, start=False)
        follower.catch_up()
        follower.stop()
    return store_url.replace("postgresql://", "postgresql+psycopg://", 1)


def test_metadata_names_every_table_the_store_made(store_url: str, used_database: str) -> None:
    engine = create_engine(used_database)
    made = set(inspect(engine).get_table_names())
    engine.dispose()
    known = set(flowstore.metadata(store_url).tables)
    assert made <= known
    assert {
        "flow_states",
        "flowstore_user_keys",
        "projection_tracking",
        "flowstore_followers",
    } <= made


def _removed_tables(url: str, **opts: object) -> set[str]:
    app = MetaData()
    Table("widgets", app, Column("id", Integer, primary_key=True))
    engine = create_engine(url)
    with engine.connect() as conn:
        diffs = compare_metadata(MigrationContext.configure(conn, opts=opts), app)
    engine.dispose()
    return {diff[1].name for diff in diffs if isinstance(diff, tuple) and diff[0] == "remove_table"}


def test_the_hooks_keep_the_tables_autogenerate_would_drop(used_database: str) -> None:
    assert {"flow_states", "flowstore_user_keys", "flowstore_followers"} <= _removed_tables(
        used_database
    )
    assert _removed_tables(used_database, include_object=flowstore.alembic_include_object) == set()
    assert _removed_tables(used_database, include_name=flowstore.alembic_include_name) == set()


@pytest.fixture
def logging_restored() -> Iterator[None]:
    """Undo what the generated env.py's `fileConfig` does to logging (it disables our loggers)."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    loggers = [
        lg for lg in logging.Logger.manager.loggerDict.values() if isinstance(lg, logging.Logger)
    ]
    disabled = {lg.name: lg.disabled for lg in loggers}
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    for logger in loggers:
        logger.disabled = disabled[logger.name]


@pytest.mark.usefixtures("logging_restored")
def test_autogenerate_in_an_app_leaves_the_stores_tables_alone(
    used_database: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "app_models.py").write_text(_APP_MODELS)
    monkeypatch.syspath_prepend(str(tmp_path))
    migrations = tmp_path / "migrations"
    config = Config(str(tmp_path / "alembic.ini"))
    config.set_main_option("script_location", str(migrations))
    config.set_main_option("sqlalchemy.url", used_database.replace("%", "%%"))
    command.init(config, str(migrations))
    env = migrations / "env.py"
    source = env.read_text()
    # The app's own models, and the lines README.md tells an app to add.
    source = source.replace(
        "from alembic import context\n", "from alembic import context\nimport flowstore\n"
    )
    source = source.replace(
        "target_metadata = None", "import app_models\ntarget_metadata = app_models.metadata"
    )
    configured = "connection=connection, target_metadata=target_metadata"
    assert configured in source
    source = source.replace(
        configured,
        configured + ", include_object=flowstore.alembic_include_object,"
        " include_name=flowstore.alembic_include_name",
    )
    env.write_text(source)
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert "include_object=flowstore.alembic_include_object" in readme  # what env.py got here

    command.revision(config, message="widgets", autogenerate=True)
    [script] = (migrations / "versions").glob("*.py")
    text = script.read_text()
    assert "op.create_table('widgets'" in text  # autogenerate did compare the app's models
    for name in flowstore.metadata().tables:
        assert f"'{name}'" not in text, name
