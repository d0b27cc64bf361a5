"""The dashboard's runs list filtered by concurrency key (sql/migrations/0009_dashboard.sql).

Revision ID: 0009_dashboard
Revises: 0008_flow_control
"""

from pgflow.schema import run_sql_file

revision = "0009_dashboard"
down_revision = "0008_flow_control"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_sql_file("0009_dashboard.sql")


def downgrade() -> None:
    run_sql_file("0009_dashboard.down.sql")
