"""Training checkpoints: written atomically, so a SIGKILL leaves the previous one intact.

A checkpoint is a directory with the model weights (safetensors), the optimizer state (a file we
wrote ourselves, read back with ``weights_only=True``) and a small JSON of progress.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


@dataclass
class Progress:
    stage: int  # 1 or 2: the stage this checkpoint is inside (or about to start)
    step: int  # optimizer steps completed in that stage
    losses: dict = field(default_factory=dict)  # stage -> [first, last] loss seen so far
    tokens_per_s: dict = field(default_factory=dict)  # stage -> throughput of the run that finished it


def save_checkpoint(directory: Path, model, optimizer, progress: Progress) -> None:
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(weights_state(model), tmp / "model.safetensors")
    if optimizer is not None:
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    (tmp / "progress.json").write_text(json.dumps(asdict(progress)))
    for f in tmp.iterdir():  # durable before it becomes visible
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    old = directory.with_name(f".{directory.name}.old-{os.getpid()}")
    if directory.exists():
        directory.rename(old)
    tmp.rename(directory)
    shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(directory: Path, model, optimizer) -> Progress:
    directory = Path(directory)
    model.load_state_dict(load_file(directory / "model.safetensors"), strict=False)
    if optimizer is not None and (directory / "optimizer.pt").exists():
        optimizer.load_state_dict(torch.load(directory / "optimizer.pt", weights_only=True))
    return Progress(**json.loads((directory / "progress.json").read_text()))


def read_progress(directory: Path) -> Progress | None:
    path = Path(directory) / "progress.json"
    return Progress(**json.loads(path.read_text())) if path.is_file() else None


def weights_state(model) -> dict[str, torch.Tensor]:
    """CPU state dict without tied duplicates (safetensors refuses shared storage; a tied
    lm_head keeps only the embedding's name, as save_pretrained does)."""
    seen, out = set(), {}
    for name, tensor in model.state_dict().items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key not in seen:
            seen.add(key)
            out[name] = tensor.detach().contiguous().cpu()
    return out
