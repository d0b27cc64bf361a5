"""Observability: trace context on runs, queue figures for metrics (sql/migrations/0009_observability.sql).

Revision ID: 0009_observability
Revises: 0008_flow_control
"""

from pgflow.schema import run_sql_file

revision = "0009_observability"
down_revision = "0008_flow_control"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_sql_file("0009_observability.sql")


def downgrade() -> None:
    run_sql_file("0009_observability.down.sql")
