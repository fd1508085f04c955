"""The shared seed: the converted teacher every expert of a team setup starts from."""

from __future__ import annotations

import tempfile
from pathlib import Path

from xmerge.errors import XmergeError
from xmerge.experts.targets import TeacherTargets, build_targets, find_targets, teacher_hash
from xmerge.modeling.convert import convert_teacher, save_student
from xmerge.modeling.teacher import load_teacher, resolve_teacher


def create_seed(reg, name: str, teacher_spec: str, *, window: int = 512, sinks: int = 4, seed: int = 0,
                mixer: str = "hybrid", status=None):
    """Convert ``teacher_spec`` and register it as seed ``name``; returns the registry Seed."""
    if window < 1 or sinks < 0:
        raise XmergeError(f"window must be >= 1 and sinks >= 0, got window={window}, sinks={sinks}")
    if any(s.name == name for s in reg.list_seeds()):
        raise XmergeError(f"seed {name!r} already exists; pick another name")
    source = resolve_teacher(teacher_spec)
    if status:
        status(f"hashing and loading teacher {teacher_spec}")
    t_hash = teacher_hash(source.weights_path())
    teacher, tokenizer = load_teacher(teacher_spec)
    if status:
        status("converting")
    student = convert_teacher(teacher, window=window, sinks=sinks, seed=seed, mixer=mixer)
    with tempfile.TemporaryDirectory(dir=reg.home) as tmp:
        model_dir = save_student(student, tokenizer, Path(tmp) / "seed", teacher_spec=teacher_spec)
        return reg.add_seed(name, teacher_spec=teacher_spec, teacher_hash=t_hash,
                            student_config=student.config.to_dict(), model_dir=model_dir)


def checkout_cached(reg, record) -> Path:
    """A verified, reusable checkout of a registry model under <home>/cache/models/<weights sha>."""
    dest = Path(reg.home) / "cache" / "models" / record.weights_sha
    if not (dest / "model.safetensors").is_file():
        reg.checkout(record, dest)
    return dest


class SeedTeacher:
    """The teacher a seed was made from: loaded on first use, checked against the seed's hash."""

    def __init__(self, seed, device="cpu"):
        self.seed, self.device, self._model = seed, device, None

    def __call__(self):
        if self._model is None:
            if teacher_hash(resolve_teacher(self.seed.teacher_spec).weights_path()) != self.seed.teacher_hash:
                raise XmergeError(f"teacher {self.seed.teacher_spec!r} changed since seed {self.seed.name!r} was made")
            self._model = load_teacher(self.seed.teacher_spec)[0].to(self.device)
        return self._model

    def targets(self, blocks, *, split: str, k: int, fingerprint: str, cache_dir: Path, batch_size: int = 4) -> TeacherTargets:
        """Cached top-k targets of ``blocks`` (N, T); the teacher is loaded only when they are missing."""
        key = dict(teacher_hash=self.seed.teacher_hash, data_fingerprint=fingerprint, k=k, split=split,
                   cache_dir=cache_dir)
        cached = find_targets(blocks, **key)
        return cached if cached is not None else build_targets(self(), blocks, **key, batch_size=batch_size)
