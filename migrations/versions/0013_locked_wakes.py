"""A transaction that locks a pending run wakes its queue (sql/migrations/0013_locked_wakes.sql).

Revision ID: 0013_locked_wakes
Revises: 0012_quiet_starts
"""

from pgflow.schema import run_sql_file

revision = "0013_locked_wakes"
down_revision = "0012_quiet_starts"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_sql_file("0013_locked_wakes.sql")


def downgrade() -> None:
    run_sql_file("0013_locked_wakes.down.sql")
