"""a keyed hash of the voter's network on anonymous (web) votes

Revision ID: 0002_vote_networks
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002_vote_networks"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("ratings", sa.Column("network", sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("ratings") as batch_op:
        batch_op.drop_column("network")
