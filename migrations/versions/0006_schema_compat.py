"""pgflow.min_worker_revision: the oldest worker code that may run on this schema.

Revision ID: 0006_schema_compat
Revises: 0005_cancelled_steps
"""

from pgflow.schema import run_sql_file

revision = "0006_schema_compat"
down_revision = "0005_cancelled_steps"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_sql_file("0006_schema_compat.sql")


def downgrade() -> None:
    run_sql_file("0006_schema_compat.down.sql")
