"""Checks on the weights of a registry entry: real safetensors, finite floats, agreed shapes.

The publisher runs these before signing a version and every auditor runs them again, so a
registry never lists a file a client cannot safely load. Order matters (cheapest and most
telling first): a pickle is named as a pickle (it would run code in torch.load, docs/THREATS.md),
then the safetensors layout is validated by seqr.core.safetensors_check (header cap, exact
offsets, no trailing bytes), then every float is checked finite straight from the validated
byte ranges (zero-copy numpy views: no re-serialisation, ~GB/s), then the tensor layout is
compared with the manifest's LoRA rank and the registry's signed tensor spec.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from seqr.core.errors import FormatError, ShapeError, ValueCheckError
from seqr.core.safetensors_check import looks_like_pickle, parse_safetensors_header
from seqr.registry.metadata import TensorSpec

__all__ = ["check_adapter_weights", "describe_layout_difference"]

MAX_HEADER_BYTES = 16 * 1024 * 1024  # bytes; a LoRA header (a few hundred tensors) is ~100 KB
_FLOATS: dict[str, np.dtype[Any]] = {
    "F16": np.dtype("<f2"),
    "F32": np.dtype("<f4"),
    "F64": np.dtype("<f8"),
}
# bfloat16 has no numpy dtype: exponent bits all ones (IEEE 754-2008 section 3.4) is inf/NaN.
_BF16_EXPONENT = np.uint16(0x7F80)


def _non_finite(raw: memoryview, dtype: str) -> int:
    """How many values in ``raw`` (little-endian ``dtype``) are NaN or infinite."""
    if dtype == "BF16":
        bits = np.frombuffer(raw, dtype=np.dtype("<u2"))
        return int(np.count_nonzero((bits & _BF16_EXPONENT) == _BF16_EXPONENT))
    values = np.frombuffer(raw, dtype=_FLOATS[dtype])
    finite = np.isfinite(values)
    return 0 if finite.all() else int(values.size - np.count_nonzero(finite))


def check_adapter_weights(
    data: bytes,
    *,
    rank: int | None = None,
    spec: Mapping[str, TensorSpec] | None = None,
) -> dict[str, TensorSpec]:
    """Validate adapter_model.safetensors bytes; return its layout (name -> dtype, shape).

    FormatError: a pickle or malformed safetensors, or a non-float tensor.
    ValueCheckError: NaN or infinite weights. ShapeError: a layout that does not match the
    LoRA ``rank`` (lora_A is r x d_in, lora_B is d_out x r, peft convention) or ``spec``.
    """
    if looks_like_pickle(data):
        raise FormatError(
            "adapter_model.safetensors is a pickle (torch.save) file, which runs code when "
            "loaded; only safetensors is accepted (peft save_pretrained writes it by default)"
        )
    header = parse_safetensors_header(data, max_header_bytes=MAX_HEADER_BYTES)
    if not header.tensors:
        raise FormatError("adapter_model.safetensors holds no tensors")
    view = memoryview(data)
    layout: dict[str, TensorSpec] = {}
    for name, info in header.tensors.items():
        if info.dtype not in _FLOATS and info.dtype != "BF16":
            raise FormatError(
                f"tensor {name!r} has dtype {info.dtype}; adapter weights must be one of "
                f"BF16, F16, F32, F64"
            )
        layout[name] = TensorSpec(info.dtype, info.shape)
    dtypes = {t.dtype for t in layout.values()}
    # One zero-copy pass over the whole buffer when every tensor has the same dtype (the
    # usual case; offsets were validated contiguous); per tensor to name the culprit.
    if len(dtypes) > 1 or _non_finite(view[header.data_start :], next(iter(dtypes))):
        for name, info in header.tensors.items():
            raw = view[header.data_start + info.begin : header.data_start + info.end]
            bad = _non_finite(raw, info.dtype)
            if bad:
                raise ValueCheckError(
                    f"tensor {name!r} has {bad} NaN or infinite value(s) of "
                    f"{(info.end - info.begin) * 8 // _bits(info.dtype)}; retrain or re-export the "
                    "adapter (check the learning rate and gradient clipping)"
                )
    if rank is not None:
        _check_rank(layout, rank)
    if spec is not None:
        problem = describe_layout_difference(layout, spec)
        if problem:
            raise ShapeError(f"adapter tensors do not match the registry's tensor spec: {problem}")
    return layout


def _bits(dtype: str) -> int:
    return 16 if dtype == "BF16" else _FLOATS[dtype].itemsize * 8


def _check_rank(layout: Mapping[str, TensorSpec], rank: int) -> None:
    for name, t in layout.items():
        shape = list(t.shape)
        if ".lora_A." in name and (len(shape) != 2 or shape[0] != rank):
            raise ShapeError(f"tensor {name!r} has shape {shape}; lora_A must be [{rank}, d_in]")
        if ".lora_B." in name and (len(shape) != 2 or shape[1] != rank):
            raise ShapeError(f"tensor {name!r} has shape {shape}; lora_B must be [d_out, {rank}]")


def describe_layout_difference(
    layout: Mapping[str, TensorSpec], expected: Mapping[str, TensorSpec]
) -> str:
    """ "" when equal, else the first few differences named (missing, extra, wrong shape)."""
    problems = []
    missing = sorted(expected.keys() - layout.keys())
    extra = sorted(layout.keys() - expected.keys())
    if missing:
        problems.append(f"missing {missing[:3]}{' ...' if len(missing) > 3 else ''}")
    if extra:
        problems.append(f"unexpected {extra[:3]}{' ...' if len(extra) > 3 else ''}")
    for name in sorted(layout.keys() & expected.keys()):
        got, want = layout[name], expected[name]
        if got != want:
            problems.append(
                f"{name!r} is {got.dtype} {list(got.shape)}, "
                f"expected {want.dtype} {list(want.shape)}"
            )
            if len(problems) >= 4:
                break
    return "; ".join(problems)
