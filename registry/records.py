"""Frozen, session-free views of registry rows: what every public Registry method returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime


@dataclass(frozen=True)
class Seed:
    id: int
    name: str
    teacher_spec: str
    teacher_hash: str
    student_config: dict
    weights_sha: str
    files: dict[str, str]  # filename -> sha256 of the other files of the HF model dir
    created_at: datetime

    @property
    def ref(self) -> str:
        return f"seed:{self.name}"


@dataclass(frozen=True)
class Expert:
    id: int
    seed: str
    seed_id: int
    domain: str
    version: int
    team: str
    weights_sha: str
    recipe: dict
    data_fingerprint: str
    metrics: dict
    status: str
    files: dict[str, str]
    created_at: datetime

    @property
    def ref(self) -> str:
        return f"{self.domain}@v{self.version}"


@dataclass(frozen=True)
class Member:
    expert_id: int
    weight: float


@dataclass(frozen=True)
class Composition:
    id: int
    name: str
    version: int
    seed: str
    seed_id: int
    method: str
    params: dict
    parent_id: int | None
    weights_sha: str
    members: tuple[Member, ...]
    files: dict[str, str]
    created_at: datetime

    @property
    def ref(self) -> str:
        return f"{self.name}@v{self.version}"


@dataclass(frozen=True)
class Operation:
    id: int
    kind: str
    composition: str
    inputs: dict
    report: dict
    decision: str
    who: str
    result_composition_id: int | None
    created_at: datetime


@dataclass(frozen=True)
class EvalRun:
    id: int
    model_ref: str
    model_hash: str
    suite: str
    reference_ref: str
    reference_hash: str
    metrics: dict
    w_tau: dict
    tau_star: float | None
    report_path: str | None
    created_at: datetime


@dataclass(frozen=True)
class GcStats:
    temp_files: int = 0
    blobs: int = 0
    bytes_freed: int = 0
    removed: tuple[str, ...] = field(default=())
