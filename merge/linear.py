"""Linear merge θ = Σ_i λ_i θ_i (Eq. 14 of the paper), streamed tensor by tensor.

For each tensor name, the tensor is read from every expert in turn and accumulated in fp32
(`acc.addcmul_(θ_i, λ_i)`, experts in the given order — the same operation and order as
mergekit's `linear`, so both give bit-identical outputs), cast back to the input dtype and
appended to the output file. Memory holds one fp32 accumulator plus one input tensor, whatever
the number of experts; the output is never held whole.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from safetensors import safe_open

from xmerge.errors import XmergeError
from xmerge.merge.checkpoint import (
    MODEL_FILE,
    TORCH_DTYPES,
    atomic_output_dir,
    check_same_layout,
    copy_sidecars,
    model_file,
    read_layout,
)
from xmerge.merge.stream_writer import StreamingSafetensorsWriter

Progress = Callable[[str, int], None]  # (tensor name, bytes of input read for it)


def merge_linear(
    experts: Sequence[Path],
    weights: Sequence[float],
    out: Path,
    *,
    normalize: bool = False,
    progress: Progress | None = None,
) -> Path:
    """Write Σ λ_i θ_i of the expert dirs to the new dir `out` (model.safetensors + config); return `out`.

    normalize divides by Σ λ_i afterwards (mergekit's `normalize: true`). Raises XmergeError,
    writing nothing, on mismatched layouts or a NaN/inf in any expert."""
    experts = [Path(e) for e in experts]
    if not experts:
        raise XmergeError("a linear merge needs at least one expert")
    if len(weights) != len(experts):
        raise XmergeError(f"{len(experts)} experts but {len(weights)} weights")
    if not all(math.isfinite(w) for w in weights):
        raise XmergeError(f"merge weights must be finite, got {list(weights)}")
    if normalize and not sum(weights) > 0:
        raise XmergeError(f"weights sum to {sum(weights):g}; cannot normalize them")
    layout = check_same_layout(experts)
    _, metadata = read_layout(model_file(experts[0]))
    # one fp32 scalar tensor per expert, as mergekit builds its coefficients
    coefficients = torch.tensor(list(weights), dtype=torch.float32).unbind(0)
    total = torch.tensor(list(weights), dtype=torch.float32).sum()

    with atomic_output_dir(out) as tmp, contextlib.ExitStack() as stack:
        handles = [stack.enter_context(safe_open(model_file(e), framework="pt")) for e in experts]
        with StreamingSafetensorsWriter(tmp / MODEL_FILE, layout, metadata) as writer:
            for name, spec in layout.items():
                acc = torch.zeros(spec.shape, dtype=torch.float32)
                for handle, coefficient in zip(handles, coefficients):
                    acc.addcmul_(handle.get_tensor(name), coefficient)
                if normalize:
                    acc.div_(total)
                if not torch.isfinite(acc).all():
                    raise _non_finite_error(name, experts, handles)
                writer.write(name, acc.to(TORCH_DTYPES[spec.dtype]))
                if progress is not None:
                    progress(name, len(experts) * acc.numel() * TORCH_DTYPES[spec.dtype].itemsize)
        copy_sidecars(experts[0], tmp)
    return Path(out)


def _non_finite_error(name: str, experts: list[Path], handles: list) -> XmergeError:
    for expert, handle in zip(experts, handles):
        if not torch.isfinite(handle.get_tensor(name)).all():
            return XmergeError(f"expert {expert} has NaN/inf in tensor {name}; re-train or drop that expert")
    return XmergeError(f"merged tensor {name} overflowed its dtype; use smaller weights")
