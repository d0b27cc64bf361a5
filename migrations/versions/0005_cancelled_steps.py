"""A cancelled run's open journal entry (signal wait, sleep, child, back-off) ends as cancelled.

Revision ID: 0005_cancelled_steps
Revises: 0004_test_clock
"""

from pgflow.schema import run_sql_file

revision = "0005_cancelled_steps"
down_revision = "0004_test_clock"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_sql_file("0005_cancelled_steps.sql")


def downgrade() -> None:
    run_sql_file("0005_cancelled_steps.down.sql")
