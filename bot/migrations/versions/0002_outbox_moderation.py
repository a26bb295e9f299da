"""outbox of replies not yet delivered; moderation lists; removed jokes

Revision ID: 0002_outbox_moderation
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002_outbox_moderation"
down_revision = "0001"
branch_labels = None
depends_on = None

_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "outbox",
        sa.Column("id", _ID, autoincrement=True, nullable=False),
        sa.Column("channel", sa.String(length=32), nullable=False),
        sa.Column("chat_key", sa.String(length=160), nullable=False),
        sa.Column("joke_id", sa.BigInteger(), nullable=True),
        sa.Column("payload", sa.JSON(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("claimed_by", sa.String(length=64), nullable=True),
        sa.Column("lease_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("result", sa.JSON(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_outbox_due", "outbox", ["channel", "state", "next_attempt_at"])
    op.create_index("ix_outbox_chat", "outbox", ["channel", "chat_key", "state", "id"])
    op.create_index("ix_outbox_joke_id", "outbox", ["joke_id"])
    op.create_table(
        "moderation",
        sa.Column("id", _ID, autoincrement=True, nullable=False),
        sa.Column("list", sa.String(length=8), nullable=False),
        sa.Column("subject", sa.String(length=160), nullable=False),
        sa.Column("note", sa.Text(), nullable=True),
        sa.Column("created_by", sa.String(length=160), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("list", "subject", name="uq_moderation_list_subject"),
    )
    op.create_table(
        "joke_removals",
        sa.Column("joke_id", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("removed_by", sa.String(length=160), nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("removed_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("joke_id"),
    )


def downgrade() -> None:
    op.drop_table("joke_removals")
    op.drop_table("moderation")
    op.drop_index("ix_outbox_joke_id", table_name="outbox")
    op.drop_index("ix_outbox_chat", table_name="outbox")
    op.drop_index("ix_outbox_due", table_name="outbox")
    op.drop_table("outbox")
