"""Schedules: cron and intervals, fired by the scheduler leader (sql/migrations/0007_schedules.sql).

Revision ID: 0007_schedules
Revises: 0006_schema_compat
"""

from pgflow.schema import run_sql_file

revision = "0007_schedules"
down_revision = "0006_schema_compat"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_sql_file("0007_schedules.sql")


def downgrade() -> None:
    run_sql_file("0007_schedules.down.sql")
