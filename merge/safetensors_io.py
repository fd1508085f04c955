"""Streaming safetensors I/O: read any element range of a tensor, write a file tensor by tensor.

The format is an 8-byte little-endian header length, a JSON header (dtype, shape and byte
offsets of every tensor, plus optional `__metadata__`) padded with spaces to a multiple of 8,
then the raw little-endian bytes. A contiguous tensor's element range is a byte range, so a
merge can read a slice of one tensor from every input into a small reused buffer, and — since a
merge output has its inputs' layout, known up front — write the header first and append bytes as
they are produced. Neither side ever holds a whole model; safetensors' own `save_file` would.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from xmerge.errors import XmergeError

TORCH_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
DTYPE_NAMES = {dtype: name for name, dtype in TORCH_DTYPES.items()}
_MAX_HEADER_BYTES = 100_000_000


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of a safetensors file: safetensors dtype name ("BF16", ...) and shape."""

    dtype: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def __str__(self) -> str:
        return f"{self.dtype}{list(self.shape)}"


Layout = dict[str, TensorSpec]  # ordered as the tensors' bytes lie in the file


def _read_header(path: Path) -> tuple[dict, int]:
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise XmergeError(f"{path} is not a safetensors file (shorter than 8 bytes)")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > _MAX_HEADER_BYTES:
            raise XmergeError(f"{path} is not a safetensors file (header length {header_len})")
        try:
            return json.loads(f.read(header_len)), 8 + header_len
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise XmergeError(f"{path} is not a safetensors file (bad header: {exc})") from None


def read_layout(path: Path) -> tuple[Layout, dict[str, str]]:
    """(layout, __metadata__) of a safetensors file, from its header only."""
    header, _ = _read_header(path)
    metadata = header.pop("__metadata__", None) or {}
    entries = sorted(header.items(), key=lambda item: item[1]["data_offsets"][0])
    return {name: TensorSpec(e["dtype"], tuple(e["shape"])) for name, e in entries}, metadata


class SafetensorsReader:
    """Reads element ranges of float tensors of one file into caller-owned byte buffers (pread, no mmap)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        header, data_start = _read_header(self.path)
        header.pop("__metadata__", None)
        size = self.path.stat().st_size
        self._offsets: dict[str, tuple[torch.dtype, int]] = {}
        for name, entry in header.items():
            begin, end = entry["data_offsets"]
            dtype = TORCH_DTYPES.get(entry["dtype"])
            if dtype is None or end - begin != math.prod(entry["shape"]) * dtype.itemsize or data_start + end > size:
                raise XmergeError(f"tensor {name} of {self.path} has a corrupt or non-float header entry")
            self._offsets[name] = (dtype, data_start + begin)
        self._fd = os.open(self.path, os.O_RDONLY)

    def read(self, name: str, start: int, count: int, buffer: torch.Tensor) -> torch.Tensor:
        """Elements [start, start+count) of flattened tensor `name`, read into the uint8 `buffer`.

        Returns a (count,) view of `buffer` in the tensor's dtype, valid until the buffer is reused."""
        dtype, offset = self._offsets[name]
        nbytes = count * dtype.itemsize
        view = memoryview(buffer.numpy())[:nbytes]
        done = 0
        while done < nbytes:
            got = os.preadv(self._fd, [view[done:]], offset + start * dtype.itemsize + done)
            if got == 0:
                raise XmergeError(f"{self.path} ended inside tensor {name}")
            done += got
        return buffer[:nbytes].view(dtype)

    def close(self) -> None:
        os.close(self._fd)

    def __enter__(self) -> SafetensorsReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def encode_header(layout: Layout, metadata: dict[str, str]) -> bytes:
    """Length prefix + JSON header for tensors laid out back to back in `layout` order."""
    header: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, spec in layout.items():
        end = offset + spec.numel * TORCH_DTYPES[spec.dtype].itemsize
        header[name] = {"dtype": spec.dtype, "shape": list(spec.shape), "data_offsets": [offset, end]}
        offset = end
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


class StreamingSafetensorsWriter:
    """Write `layout`'s tensors, in order, to `path` (via a temp file renamed on success).

        with StreamingSafetensorsWriter(path, layout, metadata) as writer:
            for name in layout:
                writer.write(name, part_1); writer.write(name, part_2)  # flat parts, in order

    Each tensor may arrive whole or as consecutive flat parts of its elements."""

    def __init__(self, path: Path, layout: Layout, metadata: dict[str, str]):
        self.path = Path(path)
        self.layout = layout
        self.metadata = metadata
        self._tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        self._names = iter(layout)
        self._current: str | None = None
        self._remaining = 0  # elements of the current tensor still to come
        self._finished = 0

    def __enter__(self) -> StreamingSafetensorsWriter:
        self._file = open(self._tmp, "wb")
        self._file.write(encode_header(self.layout, self.metadata))
        return self

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append the next elements of tensor `name` (all of them, or the next flat part)."""
        if self._remaining == 0:
            self._current = next(self._names, None)
            self._remaining = self.layout[self._current].numel if self._current is not None else 0
        spec = self.layout.get(name)
        if name != self._current:
            raise XmergeError(f"writer expected tensor {self._current}, got {name}")
        if DTYPE_NAMES.get(tensor.dtype) != spec.dtype or tensor.numel() > self._remaining:
            raise XmergeError(
                f"tensor {name}: got {tensor.dtype} x {tensor.numel()} elements, "
                f"header says {spec} with {self._remaining} elements left"
            )
        # safetensors is little-endian, as is every platform torch ships for
        self._file.write(tensor.contiguous().view(-1).view(torch.uint8).numpy().data)
        self._remaining -= tensor.numel()
        self._finished += self._remaining == 0

    def __exit__(self, exc_type, exc, tb) -> None:
        complete = self._finished == len(self.layout) and self._remaining == 0
        try:
            if exc_type is None and not complete:
                raise XmergeError(f"{self.path}: only {self._finished} of {len(self.layout)} tensors were written")
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
