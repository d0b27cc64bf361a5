"""Each customer's sign-up run: a column that points at pgflow's runs.

Revision ID: 0002_signups
Revises: 0001_customers

It can reference ``pgflow.runs`` because env.py brings pgflow's schema to its
head before the application's revisions run.
"""

import sqlalchemy as sa
from alembic import op

revision = "0002_signups"
down_revision = "0001_customers"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("customers", sa.Column("signup_run_id", sa.Uuid,
                                         sa.ForeignKey("pgflow.runs.id", ondelete="set null")))


def downgrade() -> None:
    op.drop_column("customers", "signup_run_id")
