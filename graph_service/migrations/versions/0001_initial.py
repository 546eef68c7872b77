"""initial schema: users, prompts, responses, preferences

Revision ID: 0001
Revises:
Create Date: 2026-11-26
"""
import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "users",
        sa.Column("id", sa.String(128), primary_key=True),
        sa.Column("group", sa.String(64), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_users_created_at", "users", ["created_at"])
    op.create_table("prompts", sa.Column("id", sa.String(64), primary_key=True),
                    sa.Column("text", sa.Text(), nullable=False))
    op.create_table("responses", sa.Column("id", sa.String(64), primary_key=True),
                    sa.Column("text", sa.Text(), nullable=False))
    op.create_table(
        "preferences",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("user_id", sa.String(128), sa.ForeignKey("users.id"), nullable=False),
        sa.Column("prompt_id", sa.String(64), sa.ForeignKey("prompts.id"), nullable=False),
        sa.Column("chosen_id", sa.String(64), sa.ForeignKey("responses.id"), nullable=False),
        sa.Column("rejected_id", sa.String(64), sa.ForeignKey("responses.id"), nullable=False),
        sa.Column("controversial", sa.Boolean(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        # SQLite: the primary key is the table (one B-tree fewer to write per preference).
        sqlite_with_rowid=False,
    )
    # No index on preferences.created_at: a snapshot reads nearly every row anyway, and each
    # index is one more random B-tree write per ingested record.
    op.create_index("ix_preferences_user_id", "preferences", ["user_id"])


def downgrade() -> None:
    op.drop_table("preferences")
    op.drop_table("responses")
    op.drop_table("prompts")
    op.drop_index("ix_users_created_at", "users")
    op.drop_table("users")
