"""The shared seed: the converted teacher every expert of a team setup starts from."""

from __future__ import annotations

import tempfile
from pathlib import Path

from xmerge.errors import XmergeError
from xmerge.experts.targets import teacher_hash
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
