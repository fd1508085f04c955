"""SQLAlchemy tables of the registry at the newest migration (head). Migrations in migrations/versions/."""

from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    pass


class BlobRow(Base):
    __tablename__ = "blobs"
    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    size: Mapped[int] = mapped_column(BigInteger)
    path: Mapped[str] = mapped_column(Text)  # relative to the registry home
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class SeedRow(Base):
    __tablename__ = "seeds"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    teacher_spec: Mapped[str] = mapped_column(Text)
    teacher_hash: Mapped[str] = mapped_column(String(64))
    student_config: Mapped[dict] = mapped_column(JSON)
    weights_sha: Mapped[str] = mapped_column(ForeignKey("blobs.sha256"))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ExpertRow(Base):
    __tablename__ = "experts"
    __table_args__ = (UniqueConstraint("seed_id", "domain", "version", name="uq_expert_version"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    seed_id: Mapped[int] = mapped_column(ForeignKey("seeds.id"), index=True)
    domain: Mapped[str] = mapped_column(String(200))
    version: Mapped[int] = mapped_column(Integer)
    team: Mapped[str] = mapped_column(String(200))
    weights_sha: Mapped[str] = mapped_column(ForeignKey("blobs.sha256"))
    recipe: Mapped[dict] = mapped_column(JSON)
    data_fingerprint: Mapped[str] = mapped_column(String(200))
    metrics: Mapped[dict] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(20), server_default="ready")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class CompositionRow(Base):
    __tablename__ = "compositions"
    __table_args__ = (UniqueConstraint("name", "version", name="uq_composition_version"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    version: Mapped[int] = mapped_column(Integer)
    seed_id: Mapped[int] = mapped_column(ForeignKey("seeds.id"), index=True)
    method: Mapped[str] = mapped_column(String(100))
    params: Mapped[dict] = mapped_column(JSON)
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("compositions.id"), nullable=True)
    weights_sha: Mapped[str] = mapped_column(ForeignKey("blobs.sha256"))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class MemberRow(Base):
    __tablename__ = "composition_members"
    composition_id: Mapped[int] = mapped_column(ForeignKey("compositions.id"), primary_key=True)
    expert_id: Mapped[int] = mapped_column(ForeignKey("experts.id"), primary_key=True, index=True)
    weight: Mapped[float] = mapped_column(Float)


class FileRow(Base):
    """One non-weights file of a model dir (config.json, tokenizer.json, ...) owned by a seed/expert/composition."""

    __tablename__ = "model_files"
    __table_args__ = (UniqueConstraint("owner", "owner_id", "filename", name="uq_model_file"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    owner: Mapped[str] = mapped_column(String(20))  # "seed" | "expert" | "composition"
    owner_id: Mapped[int] = mapped_column(Integer)
    filename: Mapped[str] = mapped_column(String(255))
    sha256: Mapped[str] = mapped_column(ForeignKey("blobs.sha256"), index=True)


class OperationRow(Base):
    __tablename__ = "operations"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String(20))
    composition: Mapped[str] = mapped_column(String(200), index=True)
    inputs: Mapped[dict] = mapped_column(JSON)
    report: Mapped[dict] = mapped_column(JSON)
    decision: Mapped[str] = mapped_column(String(20))
    who: Mapped[str] = mapped_column(String(200))
    result_composition_id: Mapped[int | None] = mapped_column(ForeignKey("compositions.id"), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class EvalRunRow(Base):
    __tablename__ = "eval_runs"
    __table_args__ = (Index("ix_eval_cache", "model_hash", "suite", "reference_hash"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_ref: Mapped[str] = mapped_column(Text)
    model_hash: Mapped[str] = mapped_column(String(64))
    suite: Mapped[str] = mapped_column(String(200))
    reference_ref: Mapped[str] = mapped_column(Text, server_default="")
    reference_hash: Mapped[str] = mapped_column(String(64), server_default="")
    metrics: Mapped[dict] = mapped_column(JSON)
    w_tau: Mapped[dict] = mapped_column(JSON)
    tau_star: Mapped[float | None] = mapped_column(Float, nullable=True)
    report_path: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
