"""ORM rows -> frozen records, loaded inside the session that read them."""

from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import select
from sqlalchemy.orm import Session

from xmerge.registry.records import Composition, EvalRun, Expert, Member, Operation, Seed
from xmerge.registry.schema import (
    CompositionRow,
    EvalRunRow,
    ExpertRow,
    FileRow,
    MemberRow,
    OperationRow,
    SeedRow,
)


def aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)  # SQLite drops the zone


def files_of(session: Session, owner: str, owner_id: int) -> dict[str, str]:
    rows = session.scalars(select(FileRow).where(FileRow.owner == owner, FileRow.owner_id == owner_id))
    return {row.filename: row.sha256 for row in sorted(rows, key=lambda r: r.filename)}


def seed(session: Session, row: SeedRow) -> Seed:
    return Seed(id=row.id, name=row.name, teacher_spec=row.teacher_spec, teacher_hash=row.teacher_hash,
                student_config=dict(row.student_config), weights_sha=row.weights_sha,
                files=files_of(session, "seed", row.id), created_at=aware(row.created_at))


def expert(session: Session, row: ExpertRow) -> Expert:
    return Expert(id=row.id, seed=session.get(SeedRow, row.seed_id).name, seed_id=row.seed_id,
                  domain=row.domain, version=row.version, team=row.team, weights_sha=row.weights_sha,
                  recipe=dict(row.recipe), data_fingerprint=row.data_fingerprint, metrics=dict(row.metrics),
                  status=row.status, files=files_of(session, "expert", row.id), created_at=aware(row.created_at))


def composition(session: Session, row: CompositionRow) -> Composition:
    members = session.scalars(select(MemberRow).where(MemberRow.composition_id == row.id)
                              .order_by(MemberRow.expert_id))
    return Composition(id=row.id, name=row.name, version=row.version, seed=session.get(SeedRow, row.seed_id).name,
                       seed_id=row.seed_id, method=row.method, params=dict(row.params), parent_id=row.parent_id,
                       weights_sha=row.weights_sha,
                       members=tuple(Member(expert_id=m.expert_id, weight=m.weight) for m in members),
                       files=files_of(session, "composition", row.id), created_at=aware(row.created_at))


def operation(row: OperationRow) -> Operation:
    return Operation(id=row.id, kind=row.kind, composition=row.composition, inputs=dict(row.inputs),
                     report=dict(row.report), decision=row.decision, who=row.who,
                     result_composition_id=row.result_composition_id, created_at=aware(row.created_at))


def eval_run(row: EvalRunRow) -> EvalRun:
    return EvalRun(id=row.id, model_ref=row.model_ref, model_hash=row.model_hash, suite=row.suite,
                   reference_ref=row.reference_ref, reference_hash=row.reference_hash, metrics=dict(row.metrics),
                   w_tau=dict(row.w_tau), tau_star=row.tau_star, report_path=row.report_path,
                   created_at=aware(row.created_at))
