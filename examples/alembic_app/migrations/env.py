"""The application's Alembic environment, which also brings pgflow's schema to its head.

``alembic upgrade head`` runs pgflow's revisions first (an application revision
may build on pgflow's tables, pgflow never builds on the application's), then the
application's, on one connection and in one transaction: both commit, or
neither does. Each history keeps its own version table: the application's in
``public.alembic_version``, pgflow's in ``pgflow.alembic_version``. Downgrades,
``alembic current`` and ``alembic revision --autogenerate`` leave pgflow alone.
"""

from __future__ import annotations

import os
from logging.config import fileConfig

from alembic import command, context
from alembic.config import Config
from sqlalchemy import Connection, create_engine, pool

import pgflow.schema

if context.config.config_file_name:
    fileConfig(context.config.config_file_name)

target_metadata = None  # the application's MetaData, for autogenerate


def database_url() -> str:
    url = os.environ.get("DATABASE_URL") or context.config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError("set DATABASE_URL or sqlalchemy.url in alembic.ini")
    # pgflow's revisions run on psycopg 3: plain postgresql:// URLs get that driver.
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url.removeprefix(prefix)
    return url


def upgrading_to_head() -> bool:
    """True for ``alembic upgrade head``; False for downgrades and read-only commands."""
    try:
        target = context.get_revision_argument()
    except KeyError:  # current, check, revision --autogenerate: no destination revision
        return False
    targets = set(target) if isinstance(target, tuple) else {target}
    return targets == set(context.script.get_heads())


def upgrade_pgflow(connection: Connection) -> None:
    """Run pgflow's own Alembic revisions up to its head on ``connection``, in its transaction."""
    if connection.dialect.driver != "psycopg":
        raise RuntimeError("pgflow's revisions need the psycopg 3 driver: use a "
                           f"postgresql+psycopg:// URL, not {connection.dialect.driver!r}")
    pgflow_config = Config()
    pgflow_config.set_main_option("script_location", str(pgflow.schema.migrations_dir()))
    pgflow_config.attributes["connection"] = connection
    ours = context.get_context().environment_context
    try:
        command.upgrade(pgflow_config, "head")
    finally:
        # Alembic's `context` is one module-level proxy: the run above unset it when
        # it ended, so point it at this environment again.
        ours.__enter__()


def run_migrations_offline() -> None:
    context.configure(url=database_url(), target_metadata=target_metadata,
                      literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    engine = create_engine(database_url(), poolclass=pool.NullPool)
    with engine.connect() as connection:
        context.configure(connection=connection, target_metadata=target_metadata,
                          transactional_ddl=True)
        with context.begin_transaction():
            if upgrading_to_head():
                upgrade_pgflow(connection)
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
