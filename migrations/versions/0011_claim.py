"""A cheaper claim: fewer statements in pgflow.claim_runs (sql/migrations/0011_claim.sql).

Revision ID: 0011_claim
Revises: 0010_dashboard
"""

from pgflow.schema import run_sql_file

revision = "0011_claim"
down_revision = "0010_dashboard"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_sql_file("0011_claim.sql")


def downgrade() -> None:
    run_sql_file("0011_claim.down.sql")
