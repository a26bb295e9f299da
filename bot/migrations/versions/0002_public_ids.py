"""random public ids for jokes (the web API shows these, never the sequential id)

Revision ID: 0002_public_ids
Revises: 0001
"""

import secrets

import sqlalchemy as sa
from alembic import op

revision = "0002_public_ids"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("jokes", sa.Column("public_id", sa.String(length=32), nullable=True))
    # Existing jokes get one too, so links to them keep working through the public API.
    jokes = sa.table("jokes", sa.column("id", sa.BigInteger), sa.column("public_id", sa.String))
    conn = op.get_bind()
    ids = [row[0] for row in conn.execute(sa.select(jokes.c.id)).all()]
    for joke_id in ids:
        conn.execute(
            jokes.update().where(jokes.c.id == joke_id).values(public_id=secrets.token_urlsafe(12))
        )
    op.create_index("ix_jokes_public_id", "jokes", ["public_id"], unique=True)


def downgrade() -> None:
    op.drop_index("ix_jokes_public_id", table_name="jokes")
    with op.batch_alter_table("jokes") as batch_op:
        batch_op.drop_column("public_id")
