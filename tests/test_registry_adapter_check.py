"""Weight checks shared by publisher and auditor: every float dtype, layouts, rank, pickles."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
from safetensors.numpy import save

from seqr.core.errors import FormatError, ShapeError, ValueCheckError
from seqr.registry.adapter_check import check_adapter_weights, describe_layout_difference
from seqr.registry.metadata import TensorSpec

A = "base_model.model.layers.0.q_proj.lora_A.weight"
B = "base_model.model.layers.0.q_proj.lora_B.weight"


def _bf16(values: np.ndarray) -> bytes:
    """safetensors bytes of one BF16 tensor (upper halves of float32), built by hand."""
    bits = (values.astype(np.float32).view(np.uint32) >> 16).astype("<u2")
    entry = {"dtype": "BF16", "shape": [bits.size], "data_offsets": [0, bits.nbytes]}
    header = json.dumps({"w": entry}).encode()
    header += b" " * (-len(header) % 8)
    return len(header).to_bytes(8, "little") + header + bits.tobytes()


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_weights_rejected_in_every_float_dtype(dtype: type, bad: float) -> None:
    tensors = {A: np.ones((2, 4), dtype=dtype), B: np.ones((4, 2), dtype=dtype)}
    assert check_adapter_weights(save(tensors), rank=2)[B] == TensorSpec(
        np.dtype(dtype).name.replace("float", "F"), (4, 2)
    )
    tensors[B][3, 1] = bad
    with pytest.raises(ValueCheckError, match=f"tensor '{B}' has 1 NaN or infinite"):
        check_adapter_weights(save(tensors))


def test_bfloat16_nan_found_from_its_bits() -> None:
    good = np.linspace(-3, 3, 8)
    assert check_adapter_weights(_bf16(good))["w"] == TensorSpec("BF16", (8,))
    good[5] = np.nan
    with pytest.raises(ValueCheckError, match="1 NaN or infinite value"):
        check_adapter_weights(_bf16(good))


def test_mixed_dtypes_are_checked_tensor_by_tensor() -> None:
    tensors = {A: np.ones((2, 4), dtype=np.float16), B: np.ones((4, 2), dtype=np.float32)}
    check_adapter_weights(save(tensors))
    tensors[A][0, 0] = np.inf
    with pytest.raises(ValueCheckError, match=A):
        check_adapter_weights(save(tensors))


def test_integer_tensors_and_empty_files_are_not_adapters() -> None:
    with pytest.raises(FormatError, match="dtype I32"):
        check_adapter_weights(save({A: np.ones((2, 4), dtype=np.int32)}))
    with pytest.raises(FormatError, match="no tensors"):
        check_adapter_weights(save({}))
    with pytest.raises(FormatError, match="too short"):
        check_adapter_weights(b"")


def test_pickle_is_named_and_never_loaded() -> None:
    with pytest.raises(FormatError, match="pickle"):
        check_adapter_weights(pickle.dumps({"weights": [1.0, 2.0]}))


def test_rank_and_spec_mismatches_name_the_tensor() -> None:
    data = save({A: np.ones((2, 4), np.float32), B: np.ones((4, 3), np.float32)})
    with pytest.raises(ShapeError, match=r"lora_B must be \[d_out, 2\]"):
        check_adapter_weights(data, rank=2)
    spec = {A: TensorSpec("F32", (2, 4)), B: TensorSpec("F32", (4, 2))}
    with pytest.raises(ShapeError, match=r"is F32 \[4, 3\], expected F32 \[4, 2\]"):
        check_adapter_weights(data, spec=spec)
    assert "missing" in describe_layout_difference({A: spec[A]}, spec)
    assert "unexpected" in describe_layout_difference({**spec, "x": spec[A]}, spec)
    assert describe_layout_difference(spec, spec) == ""
