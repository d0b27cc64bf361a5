"""Starts skip the NOTIFY when no worker waits for one (sql/migrations/0012_quiet_starts.sql).

Revision ID: 0012_quiet_starts
Revises: 0011_hot_paths
"""

from pgflow.schema import run_sql_file

revision = "0012_quiet_starts"
down_revision = "0011_hot_paths"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_sql_file("0012_quiet_starts.sql")


def downgrade() -> None:
    run_sql_file("0012_quiet_starts.down.sql")
