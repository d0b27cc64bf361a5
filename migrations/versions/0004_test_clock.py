"""pgflow.reset_time puts the test clock back; pgflow.purge ages runs by real time.

Revision ID: 0004_test_clock
Revises: 0003_start_checks
"""

from pgflow.schema import run_sql_file

revision = "0004_test_clock"
down_revision = "0003_start_checks"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_sql_file("0004_test_clock.sql")


def downgrade() -> None:
    run_sql_file("0004_test_clock.down.sql")
