"""API keys: a name, the key's first characters to tell keys apart, last use, revocation.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("api_keys") as batch:
        batch.add_column(sa.Column("name", sa.String(64), nullable=False, server_default=""))
        batch.add_column(sa.Column("prefix", sa.String(16), nullable=False, server_default=""))
        batch.add_column(sa.Column("last_used_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("api_keys") as batch:
        for column in ("revoked_at", "last_used_at", "prefix", "name"):
            batch.drop_column(column)
