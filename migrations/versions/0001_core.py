"""Durable execution core: runs, steps, workers, claim and report procedures.

Revision ID: 0001_core
Revises:
"""

from pgflow.schema import run_sql_file

revision = "0001_core"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_sql_file("0001_core.sql")


def downgrade() -> None:
    run_sql_file("0001_core.down.sql")
