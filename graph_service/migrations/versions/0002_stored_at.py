"""preferences.stored_at: when the store received a record (created_at is the client's and may be any past time)

The graph service asks "which users got preferences since T?" to invalidate their cached embeddings,
including preferences written by another replica; created_at cannot answer that. The database's own
clock fills the column (CURRENT_TIMESTAMP), so replicas on different machines agree on one clock.
Rows stored before this revision get their created_at.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01
"""
import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

# SQLite cannot ALTER a column, so batch mode copies the table; keep it WITHOUT ROWID (0001).
_TABLE_KWARGS = {"sqlite_with_rowid": False}


def upgrade() -> None:
    with op.batch_alter_table("preferences", table_kwargs=_TABLE_KWARGS) as batch:
        batch.add_column(sa.Column("stored_at", sa.DateTime(timezone=True), nullable=True))
    op.execute("UPDATE preferences SET stored_at = created_at")
    with op.batch_alter_table("preferences", table_kwargs=_TABLE_KWARGS) as batch:
        batch.alter_column("stored_at", existing_type=sa.DateTime(timezone=True), nullable=False,
                           server_default=sa.func.current_timestamp())
    op.create_index("ix_preferences_stored_at", "preferences", ["stored_at"])


def downgrade() -> None:
    op.drop_index("ix_preferences_stored_at", "preferences")
    with op.batch_alter_table("preferences", table_kwargs=_TABLE_KWARGS) as batch:
        batch.drop_column("stored_at")
