"""The model directories a merge reads and writes, and the checks on their tensors.

Convention: every model (expert, seed, merge output) is a directory holding `config.json` and one
`model.safetensors`. Layouts are read from the safetensors header alone (8-byte little-endian
length + JSON), so structural checks cost no tensor reads.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from xmerge.errors import XmergeError

MODEL_FILE = "model.safetensors"
# Non-weight files a merged model inherits from its first input (config, tokenizer, generation).
SIDECAR_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
)
_MAX_HEADER_BYTES = 100_000_000

TORCH_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
}
DTYPE_NAMES = {dtype: name for name, dtype in TORCH_DTYPES.items()}


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of a safetensors file: safetensors dtype name ("BF16", ...) and shape."""

    dtype: str
    shape: tuple[int, ...]

    def __str__(self) -> str:
        return f"{self.dtype}{list(self.shape)}"


Layout = dict[str, TensorSpec]  # ordered as the tensors' bytes lie in the file


def model_file(model_dir: Path) -> Path:
    """`model_dir/model.safetensors`, with a clear error when the directory is not a model."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise XmergeError(f"model directory {model_dir} does not exist (expected a folder with {MODEL_FILE})")
    path = model_dir / MODEL_FILE
    if not path.is_file():
        if (model_dir / f"{MODEL_FILE}.index.json").is_file():
            raise XmergeError(f"{model_dir} holds a sharded checkpoint; merge needs one {MODEL_FILE}")
        raise XmergeError(f"{model_dir} has no {MODEL_FILE}")
    return path


def read_layout(path: Path) -> tuple[Layout, dict[str, str]]:
    """(layout, __metadata__) of a safetensors file, from its header only."""
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise XmergeError(f"{path} is not a safetensors file (shorter than 8 bytes)")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > _MAX_HEADER_BYTES:
            raise XmergeError(f"{path} is not a safetensors file (header length {header_len})")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise XmergeError(f"{path} is not a safetensors file (bad header: {exc})") from None
    metadata = header.pop("__metadata__", None) or {}
    entries = sorted(header.items(), key=lambda item: item[1]["data_offsets"][0])
    return {name: TensorSpec(e["dtype"], tuple(e["shape"])) for name, e in entries}, metadata


def check_same_layout(model_dirs: Sequence[Path]) -> Layout:
    """The common layout of all models; XmergeError naming the first tensor and file that differ.

    Also refuses non-float tensors, which no merge method can average."""
    reference_file = model_file(model_dirs[0])
    reference, _ = read_layout(reference_file)
    for name, spec in reference.items():
        if spec.dtype not in TORCH_DTYPES:
            raise XmergeError(f"tensor {name} of {reference_file} has dtype {spec.dtype}; only float tensors merge")
    for model_dir in model_dirs[1:]:
        path = model_file(model_dir)
        layout, _ = read_layout(path)
        for name, spec in reference.items():
            if name not in layout:
                raise XmergeError(f"tensor {name} of {reference_file} is missing from {path}; experts must share one seed")
            if layout[name] != spec:
                raise XmergeError(
                    f"tensor {name} is {layout[name]} in {path} but {spec} in {reference_file}; "
                    "experts must share one seed architecture and dtype"
                )
        extra = [name for name in layout if name not in reference]
        if extra:
            raise XmergeError(f"tensor {extra[0]} of {path} is not in {reference_file}; experts must share one seed")
    return reference


def check_finite(model_dirs: Sequence[Path], layout: Layout) -> None:
    """XmergeError naming the model and tensor of the first NaN/inf, reading one tensor at a time."""
    for model_dir in model_dirs:
        with safe_open(model_file(model_dir), framework="pt") as handle:
            for name in layout:
                if not torch.isfinite(handle.get_tensor(name)).all():
                    raise XmergeError(f"{model_dir} has NaN/inf in tensor {name}; re-train or drop that expert")


def check_output_layout(out_file: Path, expected: Layout) -> None:
    """XmergeError unless `out_file` has exactly the expected tensor names, shapes and dtypes."""
    layout, _ = read_layout(out_file)
    missing = [name for name in expected if name not in layout]
    extra = [name for name in layout if name not in expected]
    changed = [name for name in expected if name in layout and layout[name] != expected[name]]
    if missing or extra or changed:
        parts = []
        if missing:
            parts.append(f"{len(missing)} tensors dropped (first: {missing[0]})")
        if extra:
            parts.append(f"{len(extra)} unexpected tensors (first: {extra[0]})")
        if changed:
            name = changed[0]
            parts.append(f"{len(changed)} changed (first: {name} {layout[name]} != {expected[name]})")
        raise XmergeError(f"merge output {out_file} does not match its inputs: {'; '.join(parts)}")


def copy_sidecars(source_dir: Path, out_dir: Path) -> None:
    """Copy config/tokenizer files of `source_dir` that exist into `out_dir`."""
    for name in SIDECAR_FILES:
        if (Path(source_dir) / name).is_file():
            shutil.copyfile(Path(source_dir) / name, Path(out_dir) / name)


@contextlib.contextmanager
def atomic_output_dir(out: Path) -> Iterator[Path]:
    """Yield an empty temp directory beside `out`, renamed to `out` only if the block succeeds.

    `out` must not exist or be an empty directory; on failure nothing is left behind."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise XmergeError(f"output {out} already exists and is not an empty directory; choose a new path")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            out.rmdir()
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
