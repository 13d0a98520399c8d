"""Read and check a safetensors header without trusting it.

Layout: 8 bytes little-endian header length N, N bytes of JSON
``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``, then the
data buffer. We check the cap on N before reading it, then that every tensor's byte range lies
inside the file, matches its dtype and shape, and that the ranges tile the buffer exactly (a
truncated upload fails here, before any tensor is read).
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

from loraserve.errors import InvalidArgument
from registry_svc.names import WEIGHTS_FILE

DTYPE_SIZES = {
    "F16": 2,
    "BF16": 2,
    "F32": 4,
    "F64": 8,
    "I8": 1,
    "U8": 1,
    "I16": 2,
    "I32": 4,
    "I64": 8,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "U16": 2,
    "U32": 4,
    "U64": 8,
}
ALLOWED_DTYPES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32"}
MAX_TENSORS = 100_000


@dataclass(slots=True, frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


def _bad(why: str) -> InvalidArgument:
    return InvalidArgument.field(WEIGHTS_FILE, why)


@dataclass(slots=True, frozen=True)
class SafetensorsHeader:
    tensors: dict[str, TensorInfo]
    data_offset: int  # where the data section starts (tensor offsets are relative to it)


def read_header(path: Path, *, max_header_bytes: int) -> SafetensorsHeader:
    """The tensors of a safetensors file, checked for consistency with the file's size."""
    size = path.stat().st_size
    if size < 8:
        raise _bad(f"is not a safetensors file: {size} bytes, shorter than the 8-byte header")
    with path.open("rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > max_header_bytes:
            raise _bad(
                f"safetensors header of {n} bytes is over the cap of {max_header_bytes} bytes "
                "(or this is not a safetensors file)"
            )
        if n > size - 8:
            raise _bad(
                f"is truncated: the header claims {n} bytes but the file has {size - 8} after "
                "the length field"
            )
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise _bad("is not a safetensors file: the header is not JSON") from None
    if not isinstance(header, dict):
        raise _bad("is not a safetensors file: the header is not a JSON object")
    header.pop("__metadata__", None)
    if len(header) > MAX_TENSORS:
        raise _bad(f"has more than {MAX_TENSORS} tensors")
    buffer_len = size - 8 - n
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        tensors[name] = _tensor(name, entry, buffer_len)
    covered = 0
    for info in sorted(tensors.values(), key=lambda t: t.begin):
        if info.begin != covered:
            raise _bad(f"tensor data is not contiguous at byte {covered} (overlap or gap)")
        covered = info.end
    if covered != buffer_len:
        raise _bad(
            f"is truncated or padded: tensors cover {covered} bytes, data section has {buffer_len}"
        )
    return SafetensorsHeader(tensors=tensors, data_offset=8 + n)


def _tensor(name: str, entry: object, buffer_len: int) -> TensorInfo:
    if not isinstance(entry, dict):
        raise _bad(f"tensor {name[:128]!r}: header entry is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in DTYPE_SIZES:
        raise _bad(f"tensor {name[:128]!r}: unknown dtype {dtype!r}")
    if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
        raise _bad(f"tensor {name[:128]!r}: bad shape {shape!r}")
    if not (
        isinstance(offsets, list)
        and len(offsets) == 2
        and all(isinstance(o, int) for o in offsets)
        and 0 <= offsets[0] <= offsets[1]
    ):
        raise _bad(f"tensor {name[:128]!r}: bad data_offsets {offsets!r}")
    begin, end = offsets
    if end > buffer_len:
        raise _bad(
            f"is truncated: tensor {name[:128]!r} ends at byte {end} of a {buffer_len}-byte "
            "data section"
        )
    if end - begin != math.prod(shape) * DTYPE_SIZES[dtype]:
        raise _bad(f"tensor {name[:128]!r}: byte range does not match dtype and shape")
    return TensorInfo(dtype=dtype, shape=tuple(shape), begin=begin, end=end)
