"""Expert status, and the eval cache key (reference ref/hash + an index on model, suite, reference).

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("experts", sa.Column("status", sa.String(20), nullable=False, server_default="ready"))
    op.add_column("eval_runs", sa.Column("reference_ref", sa.Text, nullable=False, server_default=""))
    op.add_column("eval_runs", sa.Column("reference_hash", sa.String(64), nullable=False, server_default=""))
    op.create_index("ix_eval_cache", "eval_runs", ["model_hash", "suite", "reference_hash"])


def downgrade() -> None:
    op.drop_index("ix_eval_cache", table_name="eval_runs")
    with op.batch_alter_table("eval_runs") as batch:
        batch.drop_column("reference_hash")
        batch.drop_column("reference_ref")
    with op.batch_alter_table("experts") as batch:
        batch.drop_column("status")
