"""Refuse at start an input that cannot bind to the workflow's parameters; reserve "pgflow." names.

Revision ID: 0003_start_checks
Revises: 0002_roles
"""

from pgflow.schema import run_sql_file

revision = "0003_start_checks"
down_revision = "0002_roles"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_sql_file("0003_start_checks.sql")


def downgrade() -> None:
    run_sql_file("0003_start_checks.down.sql")
