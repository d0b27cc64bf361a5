"""Alembic environment for the pgflow schema.

pgflow keeps its Alembic version table inside schema ``pgflow``, so an
application with its own Alembic history in ``public`` is never disturbed.
Run through ``pgflow migrate`` (or :func:`pgflow.schema.migrate`), which hands
over a live connection in ``config.attributes["connection"]``.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import text

# Two-key advisory lock held while migrating: concurrent `pgflow migrate`
# processes queue up behind it, and the later ones find nothing to do.
MIGRATION_LOCK = (7366501, 1)

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run pgflow migrations through `pgflow migrate`")

context.configure(
    connection=connection,
    version_table="alembic_version",
    version_table_schema="pgflow",
    transactional_ddl=True,
)

with context.begin_transaction():
    connection.execute(text("select pg_advisory_xact_lock(:a, :b)"),
                       {"a": MIGRATION_LOCK[0], "b": MIGRATION_LOCK[1]})
    connection.execute(text("create schema if not exists pgflow"))
    context.run_migrations()
