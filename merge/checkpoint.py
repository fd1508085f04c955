"""The model directories a merge reads and writes, and the checks on their tensors.

Convention: every model (expert, seed, merge output) is a directory holding `config.json` and one
`model.safetensors`. Layouts are read from the safetensors header alone, so structural checks
cost no tensor reads.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from xmerge.errors import XmergeError
from xmerge.merge.safetensors_io import TORCH_DTYPES, Layout, SafetensorsReader, read_layout

MODEL_FILE = "model.safetensors"
CHUNK_ELEMENTS = 1 << 20  # elements read per input at a time: 2-4 MB, cache-sized
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
    """XmergeError naming the model and tensor of the first NaN/inf, reading CHUNK_ELEMENTS at a time."""
    buffer = torch.empty(CHUNK_ELEMENTS * max(TORCH_DTYPES[s.dtype].itemsize for s in layout.values()), dtype=torch.uint8)
    for model_dir in model_dirs:
        with SafetensorsReader(model_file(model_dir)) as reader:
            for name, spec in layout.items():
                for start in range(0, spec.numel, CHUNK_ELEMENTS):
                    part = reader.read(name, start, min(CHUNK_ELEMENTS, spec.numel - start), buffer)
                    if not all_finite(part):
                        raise XmergeError(f"{model_dir} has NaN/inf in tensor {name}; re-train or drop that expert")


def all_finite(values: torch.Tensor) -> bool:
    """Whether no element is NaN/inf; one reduction, with the exact test only when the sum is not finite."""
    return bool(torch.isfinite(values.sum())) or bool(torch.isfinite(values).all())


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
