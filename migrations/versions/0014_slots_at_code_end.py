"""A capped run's slots go back when its code returns (sql/migrations/0014_slots_at_code_end.sql).

Revision ID: 0014_slots_at_code_end
Revises: 0013_locked_wakes
"""

from pgflow.schema import run_sql_file

revision = "0014_slots_at_code_end"
down_revision = "0013_locked_wakes"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_sql_file("0014_slots_at_code_end.sql")


def downgrade() -> None:
    run_sql_file("0014_slots_at_code_end.down.sql")
