"""Strict parsing of received safetensors bytes, before any loader sees them.

Format (huggingface/safetensors README, "Format"): 8 bytes little-endian u64 N, then N bytes
of UTF-8 JSON header beginning with ``{`` (may be padded with trailing spaces), then the data
buffer. Each header entry is ``name: {dtype, shape, data_offsets: [begin, end]}`` relative to
the buffer; an optional ``__metadata__`` maps str to str. Checked here, as the reference
implementation does: the header length is capped, offsets are contiguous from 0 with no holes
or overlaps, every entry's byte size is prod(shape) * itemsize, and the buffer ends exactly at
the last offset (no trailing bytes, where a second payload could hide). Only then is the file
handed to the library's own parser (``safetensors.deserialize``), a second, independent check.

Pickle files (``torch.save``: a zip or a raw pickle stream) are named as such, so the
rejection says what the file really was.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np
import safetensors

from seqr.core.errors import FormatError
from seqr.core.strict_json import loads_strict

__all__ = [
    "DTYPE_SIZES",
    "TensorInfo",
    "SafetensorsHeader",
    "looks_like_pickle",
    "parse_safetensors_header",
    "load_float_tensors",
]

MAX_HEADER_BYTES = 100 * 1000 * 1000  # bytes; the reference implementation's own cap
MAX_TENSORS = 100_000  # entries in one header
METADATA_KEY = "__metadata__"
# dtype -> bytes per element (safetensors Dtype enum; sub-byte float types are not accepted).
DTYPE_SIZES = MappingProxyType(
    {
        "BOOL": 1,
        "U8": 1,
        "I8": 1,
        "F8_E5M2": 1,
        "F8_E4M3": 1,
        "I16": 2,
        "U16": 2,
        "F16": 2,
        "BF16": 2,
        "I32": 4,
        "U32": 4,
        "F32": 4,
        "I64": 8,
        "U64": 8,
        "F64": 8,
    }
)
# Float dtypes we decode into numpy (BF16 widened to float32 bit-exactly).
_FLOAT_DTYPES = {"F16": "<f2", "F32": "<f4", "F64": "<f8", "BF16": "<u2"}
_HEADER_ENTRY_KEYS = {"dtype", "shape", "data_offsets"}


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    begin: int  # offset into the data buffer (after the header)
    end: int


@dataclass(frozen=True)
class SafetensorsHeader:
    tensors: Mapping[str, TensorInfo]
    metadata: Mapping[str, str]
    data_start: int  # absolute offset of the data buffer: 8 + header length


def looks_like_pickle(data: bytes) -> bool:
    """True for a torch.save zip archive or a pickle stream (protocol 2-5 opcode PROTO).

    A pickle runs code when loaded; it must never reach torch.load or pickle.loads.
    """
    if data[:4] == b"PK\x03\x04":  # torch.save since 1.6: zip holding data.pkl
        return True
    # Protocol >= 2 starts with PROTO (0x80) and its version byte (pickle.py, opcodes).
    return len(data) >= 2 and data[0] == 0x80 and 2 <= data[1] <= 5


def parse_safetensors_header(
    data: bytes, *, max_header_bytes: int = MAX_HEADER_BYTES
) -> SafetensorsHeader:
    """Validate the layout of a safetensors file (header and offsets) without loading tensors."""
    if len(data) < 8:
        raise FormatError(f"safetensors file is {len(data)} bytes, too short for its 8-byte header")
    (n,) = struct.unpack("<Q", data[:8])
    if n > max_header_bytes:
        raise FormatError(
            f"safetensors header claims {n} bytes, over the limit of {max_header_bytes}"
        )
    if 8 + n > len(data):
        raise FormatError(f"safetensors header claims {n} bytes but the file has {len(data) - 8}")
    raw = data[8 : 8 + n]
    if not raw.startswith(b"{"):
        raise FormatError("safetensors header must be a JSON object starting with '{'")
    header = loads_strict(raw, what="safetensors header", max_bytes=max_header_bytes)
    if not isinstance(header, dict):
        raise FormatError("safetensors header must be a JSON object")
    metadata = _parse_metadata(header.pop(METADATA_KEY, {}))
    if len(header) > MAX_TENSORS:
        raise FormatError(f"safetensors header lists {len(header)} tensors, over {MAX_TENSORS}")
    tensors = {name: _parse_entry(name, entry) for name, entry in header.items()}
    _check_offsets(tensors, buffer_len=len(data) - 8 - n)
    return SafetensorsHeader(
        tensors=MappingProxyType(tensors),
        metadata=MappingProxyType(metadata),
        data_start=8 + n,
    )


def load_float_tensors(data: bytes, header: SafetensorsHeader) -> dict[str, np.ndarray]:
    """Load every tensor of an already-validated file as a numpy float array.

    Uses the safetensors library's parser (``safetensors.deserialize``) and checks it agrees
    with ``header``; F16/F32/F64 keep their dtype, BF16 becomes float32 (exact). Any other
    dtype is a FormatError: adapter weights are floats.
    """
    for name, info in header.tensors.items():
        if info.dtype not in _FLOAT_DTYPES:
            raise FormatError(
                f"tensor {name!r} has dtype {info.dtype}; adapter weights must be "
                f"one of {sorted(_FLOAT_DTYPES)}"
            )
    try:
        views = safetensors.deserialize(bytes(data))
    except safetensors.SafetensorError as exc:
        raise FormatError(f"safetensors library refused the file: {exc}") from None
    out: dict[str, np.ndarray] = {}
    for name, view in views:
        seen = header.tensors.get(name)
        if seen is None or view["dtype"] != seen.dtype or tuple(view["shape"]) != seen.shape:
            raise FormatError(f"safetensors library and header disagree on tensor {name!r}")
        array = np.frombuffer(view["data"], dtype=_FLOAT_DTYPES[seen.dtype]).reshape(seen.shape)
        if seen.dtype == "BF16":  # bfloat16 is the upper half of a float32
            array = (array.astype(np.uint32) << np.uint32(16)).view(np.float32)
        out[name] = array
    if set(out) != set(header.tensors):
        raise FormatError("safetensors library and header disagree on the tensor names")
    return out


def _parse_metadata(metadata: object) -> dict[str, str]:
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise FormatError(f"safetensors {METADATA_KEY} must map strings to strings")
    return metadata


def _parse_entry(name: str, entry: object) -> TensorInfo:
    if not name:
        raise FormatError("safetensors header has a tensor with an empty name")
    if not isinstance(entry, dict) or set(entry) != _HEADER_ENTRY_KEYS:
        raise FormatError(
            f"tensor {name!r}: header entry must have exactly dtype, shape, data_offsets"
        )
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in DTYPE_SIZES:
        raise FormatError(f"tensor {name!r}: unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(_is_uint(d) for d in shape):
        raise FormatError(f"tensor {name!r}: shape {shape!r:.80} must be non-negative integers")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_uint(o) for o in offsets)
        or offsets[0] > offsets[1]
    ):
        raise FormatError(f"tensor {name!r}: data_offsets {offsets!r:.80} must be [begin <= end]")
    nbytes = math.prod(shape) * DTYPE_SIZES[dtype]
    if offsets[1] - offsets[0] != nbytes:
        raise FormatError(
            f"tensor {name!r}: {dtype} {shape} needs {nbytes} bytes but data_offsets "
            f"span {offsets[1] - offsets[0]}"
        )
    return TensorInfo(dtype=dtype, shape=tuple(shape), begin=offsets[0], end=offsets[1])


def _check_offsets(tensors: Mapping[str, TensorInfo], *, buffer_len: int) -> None:
    # Contiguous from 0, no holes, no overlaps, ends exactly at the end of the file.
    position = 0
    for name, info in sorted(tensors.items(), key=lambda item: (item[1].begin, item[1].end)):
        if info.begin != position:
            kind = "overlaps the previous tensor" if info.begin < position else "leaves a hole"
            raise FormatError(
                f"tensor {name!r} starts at byte {info.begin}, expected {position}: it {kind}"
            )
        position = info.end
    if position != buffer_len:
        raise FormatError(
            f"safetensors data is {buffer_len} bytes but the tensors cover {position}: "
            f"{buffer_len - position} trailing bytes"
            if buffer_len > position
            else f"safetensors tensors end at byte {position}, past the data ({buffer_len} bytes)"
        )


def _is_uint(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
