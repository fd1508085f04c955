"""Reading and checking safetensors files without torch: header parsing, layout checks, NaN/inf scans."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

from xmerge.registry.errors import RegistryError

MAX_HEADER_BYTES = 100 << 20
SCAN_ELEMENTS = 1 << 22  # elements per chunk of the NaN/inf scan (bounded memory)
DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2,
               "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}

TensorSpec = dict[str, tuple[str, tuple[int, ...]]]  # name -> (dtype, shape)


def read_header(path: Path) -> tuple[dict, int]:
    """The parsed header (tensor entries + __metadata__) and the offset where tensor data starts."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise RegistryError(f"{path.name} is not a safetensors file (shorter than 8 bytes)")
        (n,) = struct.unpack("<Q", raw)
        if n > MAX_HEADER_BYTES or 8 + n > size:
            raise RegistryError(f"{path.name} is not a valid safetensors file (header length {n} is impossible)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise RegistryError(f"{path.name} has an unreadable safetensors header: {exc}") from None
    if not isinstance(header, dict):
        raise RegistryError(f"{path.name} has a safetensors header that is not a JSON object")
    return header, 8 + n


def tensor_spec(path: Path) -> TensorSpec:
    """name -> (dtype, shape) of every tensor, after checking that the file layout is consistent."""
    header, data_start = read_header(path)
    data_len = path.stat().st_size - data_start
    spec: TensorSpec = {}
    spans = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise RegistryError(f"{path.name}: tensor '{name}' has a malformed header entry") from None
        if dtype not in DTYPE_BYTES or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise RegistryError(f"{path.name}: tensor '{name}' has an unknown dtype or a bad shape")
        if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end <= data_len):
            raise RegistryError(f"{path.name}: tensor '{name}' points outside the file")
        if end - begin != int(np.prod(shape, dtype=np.int64)) * DTYPE_BYTES[dtype]:
            raise RegistryError(f"{path.name}: tensor '{name}' has {end - begin} bytes, its shape needs another size")
        spec[name] = (dtype, shape)
        spans.append((begin, end))
    spans.sort()
    if any(b[0] < a[1] for a, b in zip(spans, spans[1:])):
        raise RegistryError(f"{path.name}: tensors overlap in the data section")
    return spec


def non_finite_tensors(path: Path) -> list[str]:
    """Names of floating-point tensors that hold a NaN or an infinity (scanned in bounded chunks)."""
    header, data_start = read_header(path)
    bad = []
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=data_start) if path.stat().st_size > data_start \
        else np.zeros(0, np.uint8)
    for name, entry in header.items():
        if name == "__metadata__" or entry["dtype"] not in _BITS_TEST:
            continue
        begin, end = entry["data_offsets"]
        width = DTYPE_BYTES[entry["dtype"]]
        step = SCAN_ELEMENTS * width
        for start in range(begin, end, step):
            if _BITS_TEST[entry["dtype"]](data[start:min(end, start + step)]):
                bad.append(name)
                break
    return bad


def _float_test(np_dtype: str):
    return lambda raw: not np.isfinite(raw.view(np_dtype)).all()


def _exponent_all_ones(word: str, mask: int):
    # bfloat16 / fp8-e5m2 have no numpy dtype: NaN and inf are exactly the values whose exponent bits are all 1.
    return lambda raw: bool(((raw.view(word) & mask) == mask).any())


_BITS_TEST = {
    "F16": _float_test("<f2"),
    "F32": _float_test("<f4"),
    "F64": _float_test("<f8"),
    "BF16": _exponent_all_ones("<u2", 0x7F80),
    "F8_E5M2": _exponent_all_ones("u1", 0x7C),
    "F8_E4M3": lambda raw: bool(((raw & 0x7F) == 0x7F).any()),  # e4m3fn: no inf, NaN is S.1111.111
}
