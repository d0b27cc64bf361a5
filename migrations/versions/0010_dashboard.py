"""The dashboard's runs list filtered by concurrency key (sql/migrations/0010_dashboard.sql).

Revision ID: 0010_dashboard
Revises: 0009_observability
"""

from pgflow.schema import run_sql_file

revision = "0010_dashboard"
down_revision = "0009_observability"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_sql_file("0010_dashboard.sql")


def downgrade() -> None:
    run_sql_file("0010_dashboard.down.sql")
