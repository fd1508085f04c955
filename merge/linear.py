"""Linear merge θ = Σ_i λ_i θ_i (Eq. 14 of the paper), streamed in slices of each tensor.

Every tensor is processed CHUNK_ELEMENTS elements at a time: the slice is read from each expert
in turn into one reused buffer and accumulated in a cache-resident fp32 slice
(`acc.addcmul_(θ_i, λ_i)`, experts in the given order — the same operation and order as
mergekit's `linear`, elementwise, so both give bit-identical outputs), cast back to the input
dtype and appended to the output file. Memory is a few buffers of one slice each, whatever the
number of experts and the size of the model.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from xmerge.errors import XmergeError
from xmerge.merge.checkpoint import (
    CHUNK_ELEMENTS,
    MODEL_FILE,
    all_finite,
    atomic_output_dir,
    check_output_layout,
    check_same_layout,
    copy_sidecars,
    model_file,
)
from xmerge.merge.safetensors_io import TORCH_DTYPES, SafetensorsReader, StreamingSafetensorsWriter, read_layout

Progress = Callable[[int], None]  # called with the bytes of input just merged


def merge_linear(
    experts: Sequence[Path],
    weights: Sequence[float],
    out: Path,
    *,
    normalize: bool = False,
    progress: Progress | None = None,
    chunk_elements: int = CHUNK_ELEMENTS,
) -> Path:
    """Write Σ λ_i θ_i of the expert dirs to the new dir `out` (model.safetensors + config); return `out`.

    normalize divides by Σ λ_i afterwards (mergekit's `normalize: true`); chunk_elements is the
    slice length (the result does not depend on it). Raises XmergeError, writing nothing, on
    mismatched layouts or a NaN/inf in any expert."""
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
    itemsize = max(TORCH_DTYPES[spec.dtype].itemsize for spec in layout.values())
    in_buffer = torch.empty(chunk_elements * itemsize, dtype=torch.uint8)
    acc_buffer = torch.empty(chunk_elements, dtype=torch.float32)
    up_buffer = torch.empty(chunk_elements, dtype=torch.float32)

    with atomic_output_dir(out) as tmp, contextlib.ExitStack() as stack:
        readers = [stack.enter_context(SafetensorsReader(model_file(e))) for e in experts]
        writer = stack.enter_context(StreamingSafetensorsWriter(tmp / MODEL_FILE, layout, metadata))
        for name, spec in layout.items():
            dtype = TORCH_DTYPES[spec.dtype]
            for start in range(0, max(spec.numel, 1), chunk_elements):
                count = min(chunk_elements, spec.numel - start)
                acc = acc_buffer[:count].zero_()
                for reader, coefficient in zip(readers, coefficients):
                    part = reader.read(name, start, count, in_buffer)
                    # upcast first: addcmul_ on mixed dtypes takes a slower path (same result)
                    acc.addcmul_(part if dtype == torch.float32 else up_buffer[:count].copy_(part), coefficient)
                if normalize:
                    acc.div_(total)
                if not all_finite(acc):
                    raise _non_finite_error(name, start, count, experts, readers, in_buffer)
                writer.write(name, acc.to(dtype))
                if progress is not None:
                    progress(len(experts) * count * dtype.itemsize)
        stack.close()  # completes model.safetensors, to check it before the directory appears
        check_output_layout(tmp / MODEL_FILE, layout)
        copy_sidecars(experts[0], tmp)
    return Path(out)


def _non_finite_error(name, start, count, experts, readers, buffer) -> XmergeError:
    for expert, reader in zip(experts, readers):
        if not all_finite(reader.read(name, start, count, buffer)):
            return XmergeError(f"expert {expert} has NaN/inf in tensor {name}; re-train or drop that expert")
    return XmergeError(f"merged tensor {name} overflowed its dtype; use smaller weights")
