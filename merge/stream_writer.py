"""A safetensors writer that streams tensors to disk one at a time, in constant memory.

safetensors' own `save_file` needs every tensor in memory at once. The format is an 8-byte
little-endian header length, a JSON header (dtype, shape, byte offsets of every tensor) padded
with spaces to a multiple of 8, then the raw bytes. When the layout is known up front (a merge
output has its inputs' layout) the header can be written first and each tensor's bytes appended
as soon as it is produced. The file appears under its final name only once complete.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

import torch

from xmerge.errors import XmergeError
from xmerge.merge.checkpoint import DTYPE_NAMES, TORCH_DTYPES, Layout


def _nbytes(dtype: str, shape: tuple[int, ...]) -> int:
    return math.prod(shape) * TORCH_DTYPES[dtype].itemsize


def encode_header(layout: Layout, metadata: dict[str, str]) -> bytes:
    """Length prefix + JSON header for tensors laid out back to back in `layout` order."""
    header: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, spec in layout.items():
        end = offset + _nbytes(spec.dtype, spec.shape)
        header[name] = {"dtype": spec.dtype, "shape": list(spec.shape), "data_offsets": [offset, end]}
        offset = end
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


class StreamingSafetensorsWriter:
    """Write `layout`'s tensors, in order, to `path` (via a temp file renamed on success).

        with StreamingSafetensorsWriter(path, layout, metadata) as writer:
            for name in layout:
                writer.write(name, tensor)
    """

    def __init__(self, path: Path, layout: Layout, metadata: dict[str, str]):
        self.path = Path(path)
        self.layout = layout
        self.metadata = metadata
        self._tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        self._pending = iter(layout.items())
        self._written = 0

    def __enter__(self) -> StreamingSafetensorsWriter:
        self._file = open(self._tmp, "wb")
        self._file.write(encode_header(self.layout, self.metadata))
        return self

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append `tensor` as the next tensor of the layout; name, dtype and shape must match it."""
        expected_name, spec = next(self._pending, (None, None))
        if name != expected_name:
            raise XmergeError(f"writer expected tensor {expected_name}, got {name}")
        if DTYPE_NAMES.get(tensor.dtype) != spec.dtype or tuple(tensor.shape) != spec.shape:
            raise XmergeError(f"tensor {name} is {tensor.dtype}{list(tensor.shape)}, header says {spec}")
        # safetensors is little-endian, as is every platform torch ships for
        self._file.write(tensor.contiguous().view(-1).view(torch.uint8).numpy().data)
        self._written += 1

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None and self._written != len(self.layout):
                raise XmergeError(f"{self.path}: only {self._written} of {len(self.layout)} tensors were written")
            if exc_type is None:
                self._file.flush()
                os.fsync(self._file.fileno())
        except BaseException:
            self._file.close()
            self._tmp.unlink(missing_ok=True)
            raise
        self._file.close()
        if exc_type is not None:
            self._tmp.unlink(missing_ok=True)
            return
        os.replace(self._tmp, self.path)
