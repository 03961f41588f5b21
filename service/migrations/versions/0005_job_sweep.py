"""Jobs: `sweep_id`, the trainings one sweep created (POST /v1/sweeps); `evaluates`, the training
an evaluation scores (named `job:<id>` in its spec).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-06
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("sweep_id", sa.String(32), nullable=True))
        batch.add_column(sa.Column("evaluates", sa.String(32), nullable=True))
        batch.create_index("ix_jobs_sweep_id", ["sweep_id"])
        batch.create_index("ix_jobs_evaluates", ["evaluates"])


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_index("ix_jobs_evaluates")
        batch.drop_index("ix_jobs_sweep_id")
        batch.drop_column("evaluates")
        batch.drop_column("sweep_id")
