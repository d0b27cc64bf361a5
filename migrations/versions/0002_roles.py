"""Least-privilege roles (pgflow_worker, pgflow_client, pgflow_reader) and a fixed search_path.

Revision ID: 0002_roles
Revises: 0001_core
"""

from pgflow.schema import run_sql_file

revision = "0002_roles"
down_revision = "0001_core"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_sql_file("0002_roles.sql")


def downgrade() -> None:
    run_sql_file("0002_roles.down.sql")
