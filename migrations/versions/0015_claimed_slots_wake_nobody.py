"""A claim wakes idle workers only for the slots it leaves free
(sql/migrations/0015_claimed_slots_wake_nobody.sql).

Revision ID: 0015_claimed_slots_wake_nobody
Revises: 0014_slots_at_code_end
"""

from pgflow.schema import run_sql_file

revision = "0015_claimed_slots_wake_nobody"
down_revision = "0014_slots_at_code_end"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_sql_file("0015_claimed_slots_wake_nobody.sql")


def downgrade() -> None:
    run_sql_file("0015_claimed_slots_wake_nobody.down.sql")
