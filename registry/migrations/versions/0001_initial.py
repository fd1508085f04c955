"""Initial schema: blobs, seeds, experts, compositions (+ members), model files, operations, eval runs.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def _created_at() -> sa.Column:
    return sa.Column("created_at", sa.DateTime(timezone=True), nullable=False)


def upgrade() -> None:
    op.create_table(
        "blobs",
        sa.Column("sha256", sa.String(64), primary_key=True),
        sa.Column("size", sa.BigInteger, nullable=False),
        sa.Column("path", sa.Text, nullable=False),
        _created_at(),
    )
    op.create_table(
        "seeds",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(200), nullable=False, unique=True),
        sa.Column("teacher_spec", sa.Text, nullable=False),
        sa.Column("teacher_hash", sa.String(64), nullable=False),
        sa.Column("student_config", sa.JSON, nullable=False),
        sa.Column("weights_sha", sa.String(64), sa.ForeignKey("blobs.sha256"), nullable=False),
        _created_at(),
    )
    op.create_table(
        "experts",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("seed_id", sa.Integer, sa.ForeignKey("seeds.id"), nullable=False, index=True),
        sa.Column("domain", sa.String(200), nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("team", sa.String(200), nullable=False),
        sa.Column("weights_sha", sa.String(64), sa.ForeignKey("blobs.sha256"), nullable=False),
        sa.Column("recipe", sa.JSON, nullable=False),
        sa.Column("data_fingerprint", sa.String(200), nullable=False),
        sa.Column("metrics", sa.JSON, nullable=False),
        _created_at(),
        sa.UniqueConstraint("seed_id", "domain", "version", name="uq_expert_version"),
    )
    op.create_table(
        "compositions",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("seed_id", sa.Integer, sa.ForeignKey("seeds.id"), nullable=False, index=True),
        sa.Column("method", sa.String(100), nullable=False),
        sa.Column("params", sa.JSON, nullable=False),
        sa.Column("parent_id", sa.Integer, sa.ForeignKey("compositions.id"), nullable=True),
        sa.Column("weights_sha", sa.String(64), sa.ForeignKey("blobs.sha256"), nullable=False),
        _created_at(),
        sa.UniqueConstraint("name", "version", name="uq_composition_version"),
    )
    op.create_table(
        "composition_members",
        sa.Column("composition_id", sa.Integer, sa.ForeignKey("compositions.id"), primary_key=True),
        sa.Column("expert_id", sa.Integer, sa.ForeignKey("experts.id"), primary_key=True, index=True),
        sa.Column("weight", sa.Float, nullable=False),
    )
    op.create_table(
        "model_files",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("owner", sa.String(20), nullable=False),
        sa.Column("owner_id", sa.Integer, nullable=False),
        sa.Column("filename", sa.String(255), nullable=False),
        sa.Column("sha256", sa.String(64), sa.ForeignKey("blobs.sha256"), nullable=False, index=True),
        sa.UniqueConstraint("owner", "owner_id", "filename", name="uq_model_file"),
    )
    op.create_table(
        "operations",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("kind", sa.String(20), nullable=False),
        sa.Column("composition", sa.String(200), nullable=False, index=True),
        sa.Column("inputs", sa.JSON, nullable=False),
        sa.Column("report", sa.JSON, nullable=False),
        sa.Column("decision", sa.String(20), nullable=False),
        sa.Column("who", sa.String(200), nullable=False),
        sa.Column("result_composition_id", sa.Integer, sa.ForeignKey("compositions.id"), nullable=True),
        _created_at(),
    )
    op.create_table(
        "eval_runs",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("model_ref", sa.Text, nullable=False),
        sa.Column("model_hash", sa.String(64), nullable=False),
        sa.Column("suite", sa.String(200), nullable=False),
        sa.Column("metrics", sa.JSON, nullable=False),
        sa.Column("w_tau", sa.JSON, nullable=False),
        sa.Column("tau_star", sa.Float, nullable=True),
        sa.Column("report_path", sa.Text, nullable=True),
        _created_at(),
    )


def downgrade() -> None:
    for table in ("eval_runs", "operations", "model_files", "composition_members", "compositions", "experts",
                  "seeds", "blobs"):
        op.drop_table(table)
