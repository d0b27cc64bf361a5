"""A cheaper claim and start (sql/migrations/0011_hot_paths.sql).

Revision ID: 0011_hot_paths
Revises: 0010_dashboard
"""

from pgflow.schema import run_sql_file

revision = "0011_hot_paths"
down_revision = "0010_dashboard"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_sql_file("0011_hot_paths.sql")


def downgrade() -> None:
    run_sql_file("0011_hot_paths.down.sql")
