"""The OpenAI-compatible surface: `files.purpose` (`fine-tune` for files uploaded through it) and
`jobs.fine_tuning`, the OpenAI fine-tuning request a pipeline was created from (its model name,
files, suffix, metadata and hyperparameters as OpenAI reports them back).

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-07
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("files") as batch:
        batch.add_column(sa.Column("purpose", sa.String(32), nullable=True))
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("fine_tuning", sa.JSON(none_as_null=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("fine_tuning")
    with op.batch_alter_table("files") as batch:
        batch.drop_column("purpose")
