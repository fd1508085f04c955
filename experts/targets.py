"""Teacher top-k targets: run the teacher once over token blocks, cache its top-k log-probs.

Layout: `cache_dir/targets/<key>/` holds `meta.json` and shards `shard-00000.safetensors`, ...
each with `indices` (n, T, k) int32 and `logprobs` (n, T, k) float16, n <= shard_blocks.
key = sha256(teacher hash, data fingerprint, k, split, digest of the blocks themselves), so a
different budget (other blocks) never reuses targets of another.

Log-probs are stored as float16: half the bytes of float32 (k = 256 costs 1.5 KB per token with
int32 ids), and the rounding is harmless for the sparse KL: fp16's relative error 2^-11 on a
log-prob lp moves p = exp(lp) by at most p·|lp|·2^-11 <= 2e-4 absolute. Log-softmax and top-k
are computed in float32 before the cast.

A build writes into a temporary sibling directory that is renamed to `<key>` only after every
shard and `meta.json` are written; an interrupted build leaves no `<key>` directory and is
never reused.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from safetensors import safe_open
from safetensors.torch import save_file

from xmerge.errors import XmergeError

INDEX_DTYPE = torch.int32
LOGPROB_DTYPE = torch.float16
FORMAT = "xmerge-targets/v1"


def _hash_file(digest, path: Path) -> None:
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)


def teacher_hash(model_or_path) -> str:
    """sha256 identifying a teacher's weights.

    A file (GGUF, safetensors): its bytes. An HF directory: the bytes of its *.safetensors files
    in name order, else of its *.gguf files (the same as modeling.teacher's
    `TeacherSource.content_hash` for local teachers). An in-memory model: its state dict, tensor
    by tensor in name order (name, dtype, shape, bytes).
    """
    digest = hashlib.sha256()
    if isinstance(model_or_path, (str, os.PathLike)):
        path = Path(model_or_path)
        if path.is_file():
            _hash_file(digest, path)
        elif path.is_dir():
            files = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.gguf"))
            if not files:
                raise XmergeError(f"teacher directory {path} holds no *.safetensors or *.gguf weights")
            for f in files:
                _hash_file(digest, f)
        else:
            raise XmergeError(f"teacher weights {path} not found: pass a local file or directory")
        return digest.hexdigest()
    state = model_or_path.state_dict()
    for name in sorted(state):
        tensor = state[name].detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def targets_key(*, teacher_hash: str, data_fingerprint: str, k: int, split: str, blocks: torch.Tensor) -> str:
    """The cache key of one targets build. blocks: (N, T) token ids."""
    blocks_digest = hashlib.sha256(blocks.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()
    parts = [FORMAT, teacher_hash, data_fingerprint, k, split, list(blocks.shape), blocks_digest]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


class TeacherTargets:
    """Cached top-k targets of N blocks; shards are read only when a block range needs them."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        meta = json.loads((self.directory / "meta.json").read_text())
        self.key: str = self.directory.name
        self.n_blocks: int = meta["n_blocks"]
        self.seq_len: int = meta["seq_len"]
        self.k: int = meta["k"]
        self.shard_blocks: int = meta["shard_blocks"]
        self.shard_files: list[str] = meta["shards"]

    def __len__(self) -> int:
        return self.n_blocks

    def load(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """indices (stop-start, T, k) int32 and logprobs (stop-start, T, k) float16 of blocks [start, stop)."""
        if not 0 <= start <= stop <= self.n_blocks:
            raise XmergeError(f"block range [{start}, {stop}) outside the {self.n_blocks} cached target blocks")
        indices, logprobs = [], []
        for shard in range(start // self.shard_blocks, -(-stop // self.shard_blocks)):
            first = shard * self.shard_blocks
            lo, hi = max(start, first) - first, min(stop, first + self.shard_blocks) - first
            with safe_open(self.directory / self.shard_files[shard], framework="pt") as f:
                indices.append(f.get_slice("indices")[lo:hi])
                logprobs.append(f.get_slice("logprobs")[lo:hi])
        if not indices:
            return (torch.empty(0, self.seq_len, self.k, dtype=INDEX_DTYPE),
                    torch.empty(0, self.seq_len, self.k, dtype=LOGPROB_DTYPE))
        return torch.cat(indices), torch.cat(logprobs)

    @property
    def indices(self) -> torch.Tensor:
        """(N, T, k) int32, all blocks."""
        return self.load(0, self.n_blocks)[0]

    @property
    def logprobs(self) -> torch.Tensor:
        """(N, T, k) float16, all blocks."""
        return self.load(0, self.n_blocks)[1]


def topk_logprobs(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of log_softmax(logits) in float32. logits: (..., V) -> indices, logprobs (..., min(k, V))."""
    values, indices = torch.log_softmax(logits.float(), dim=-1).topk(min(k, logits.shape[-1]), dim=-1)
    return indices.to(INDEX_DTYPE), values.to(LOGPROB_DTYPE)


@torch.inference_mode()
def _write_shards(teacher, blocks: torch.Tensor, out: Path, *, k: int, batch_size: int, shard_blocks: int,
                  progress: bool) -> tuple[list[str], int]:
    device = next(teacher.parameters()).device
    shards, k_used = [], k
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, disable=not progress) as bar:
        task = bar.add_task("teacher top-k targets (blocks)", total=len(blocks))
        for first in range(0, len(blocks), shard_blocks):
            indices, logprobs = [], []
            for start in range(first, min(first + shard_blocks, len(blocks)), batch_size):
                stop = min(start + batch_size, first + shard_blocks, len(blocks))
                logits = teacher(input_ids=blocks[start:stop].to(device), use_cache=False).logits
                idx, lp = topk_logprobs(logits, k)
                indices.append(idx.cpu())
                logprobs.append(lp.cpu())
                bar.advance(task, stop - start)
            name = f"shard-{len(shards):05d}.safetensors"
            save_file({"indices": torch.cat(indices), "logprobs": torch.cat(logprobs)}, out / name)
            shards.append(name)
            k_used = indices[0].shape[-1]
    return shards, k_used


def find_targets(blocks: torch.Tensor, *, k: int, teacher_hash: str, data_fingerprint: str, split: str,
                 cache_dir: Path) -> TeacherTargets | None:
    """The finished cached targets for these blocks (N, T) and key parts, or None (never a partial build)."""
    key = targets_key(teacher_hash=teacher_hash, data_fingerprint=data_fingerprint, k=k, split=split, blocks=blocks)
    directory = Path(cache_dir) / "targets" / key
    return TeacherTargets(directory) if (directory / "meta.json").exists() else None


def build_targets(teacher, blocks: torch.Tensor, *, k: int = 256, teacher_hash: str, data_fingerprint: str,
                  split: str, cache_dir: Path, batch_size: int = 4, shard_blocks: int = 64,
                  progress: bool = True) -> TeacherTargets:
    """Top-k targets of `teacher` (any HF causal LM) over blocks (N, T); cached, built at most once.

    When the cache holds this key the teacher is not run (it may be None).
    """
    if k < 1 or batch_size < 1 or shard_blocks < 1:
        raise XmergeError(f"k, batch_size and shard_blocks must be >= 1, got {k}, {batch_size}, {shard_blocks}")
    if blocks.ndim != 2 or blocks.dtype not in (torch.int32, torch.int64) or len(blocks) == 0:
        raise XmergeError(f"target blocks must be a non-empty (N, T) integer tensor, got {blocks.dtype} "
                          f"{tuple(blocks.shape)}")
    cached = find_targets(blocks, k=k, teacher_hash=teacher_hash, data_fingerprint=data_fingerprint, split=split,
                          cache_dir=cache_dir)
    if cached is not None:
        return cached
    key = targets_key(teacher_hash=teacher_hash, data_fingerprint=data_fingerprint, k=k, split=split, blocks=blocks)
    root = Path(cache_dir) / "targets"
    final = root / key
    if teacher is None:
        raise XmergeError(f"no cached teacher targets for key {key[:12]}; pass the teacher to build them")
    tmp = root / f".{key}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    was_training = teacher.training
    teacher.eval()
    try:
        shards, k_used = _write_shards(teacher, blocks, tmp, k=k, batch_size=batch_size,
                                       shard_blocks=shard_blocks, progress=progress)
        meta = {"format": FORMAT, "n_blocks": len(blocks), "seq_len": blocks.shape[1], "k": k_used,
                "k_requested": k, "shard_blocks": shard_blocks, "shards": shards, "teacher_hash": teacher_hash,
                "data_fingerprint": data_fingerprint, "split": split,
                "indices_dtype": str(INDEX_DTYPE), "logprobs_dtype": str(LOGPROB_DTYPE)}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "meta.json").exists():  # not a concurrent build that finished first
                raise
            shutil.rmtree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        teacher.train(was_training)
    return TeacherTargets(final)
