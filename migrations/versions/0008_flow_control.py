"""Flow control: concurrency limits, rate limits, paused queues (sql/migrations/0008_flow_control.sql).

Revision ID: 0008_flow_control
Revises: 0007_schedules
"""

from pgflow.schema import run_sql_file

revision = "0008_flow_control"
down_revision = "0007_schedules"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_sql_file("0008_flow_control.sql")


def downgrade() -> None:
    run_sql_file("0008_flow_control.down.sql")
