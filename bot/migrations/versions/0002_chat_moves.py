"""chats that became other chats (Telegram groups upgraded to supergroups)

Revision ID: 0002_chat_moves
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002_chat_moves"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "chat_moves",
        sa.Column("old_chat", sa.String(length=128), nullable=False),
        sa.Column("new_chat", sa.String(length=128), nullable=False),
        sa.Column("moved_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("old_chat"),
    )


def downgrade() -> None:
    op.drop_table("chat_moves")
