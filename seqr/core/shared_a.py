"""The shared frozen LoRA A, regenerated bit for bit by every party from a public seed.

SEQR (arXiv 2509.18093) needs one A per LoRA module shared by all adapters, so that
||B_i A x|| = ||R_i (A x)||; FFA-LoRA (Sun et al., ICLR 2024) freezes a random A and trains B.
A is never sent: each party regenerates it and compares ``shared_a_sha256``.

Generation (format "seqr/shared-a/v1"), chosen to be identical on every machine:
  key   = sha256(b"seqr/shared-a/v1\\0" + str(seed) + b"\\0" + module_name)   (UTF-8)
  bits  = PCG64(SeedSequence(int.from_bytes(key, "big"))).random_raw(r * d_in)   uint64
  u     = (bits >> 11) * 2**-53                  float64 in [0, 1)
  A     = float32((2u - 1) / sqrt(d_in))          row-major, shape (r, d_in)
Only the bit generator's raw stream is used (numpy guarantees it stable across versions; the
distribution methods are not). The bound 1/sqrt(d_in) is peft's default lora_A init:
kaiming_uniform_(a=sqrt(5)) gives bound = sqrt(6 / ((1 + 5) d_in)) = 1/sqrt(d_in).
Module names are the base model's (``model.layers.0.self_attn.q_proj``), not peft's wrapped ones.
"""

from __future__ import annotations

import hashlib
import math
import struct
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from seqr.core.errors import ShapeError, ValueCheckError

FORMAT = "seqr/shared-a/v1"


def generate_shared_a(seed: int, module_name: str, r: int, d_in: int) -> torch.Tensor:
    """The (r, d_in) float32 shared A of one module; same bits on every machine."""
    if not 0 <= seed < 2**63:
        raise ValueCheckError(f"seed {seed} must be in [0, 2**63)")
    if r < 1 or d_in < 1:
        raise ShapeError(f"A of {module_name!r} needs r >= 1 and d_in >= 1, got r={r} d_in={d_in}")
    key = hashlib.sha256(
        FORMAT.encode() + b"\0" + str(seed).encode() + b"\0" + module_name.encode("utf-8")
    ).digest()
    bits = np.random.PCG64(np.random.SeedSequence(int.from_bytes(key, "big"))).random_raw(r * d_in)
    u = (np.asarray(bits, dtype=np.uint64) >> np.uint64(11)).astype(np.float64) * 2.0**-53
    a = ((2.0 * u - 1.0) * (1.0 / math.sqrt(d_in))).astype(np.float32).reshape(r, d_in)
    return torch.from_numpy(a)


def shared_a_sha256(seed: int, shapes: Mapping[str, int], r: int) -> str:
    """Hash of every module's A: sorted names; per module name, NUL, <u32 r, u32 d_in>, LE bytes."""
    if not shapes:
        raise ValueCheckError("no LoRA modules: cannot hash an empty set of shared A matrices")
    h = hashlib.sha256(FORMAT.encode() + b"\0")
    for name in sorted(shapes):
        d_in = shapes[name]
        a = generate_shared_a(seed, name, r, d_in)
        h.update(name.encode("utf-8") + b"\0" + struct.pack("<II", r, d_in))
        h.update(a.numpy().astype("<f4", copy=False).tobytes())
    return h.hexdigest()


def _matches(name: str, targets: Sequence[str]) -> bool:
    # peft's rule for a list of target_modules: the full name, or a suffix after a dot.
    return any(name == t or name.endswith("." + t) for t in targets)


def lora_target_shapes(model: nn.Module, target_modules: Sequence[str]) -> dict[str, int]:
    """Base-model module name -> d_in of every nn.Linear a LoRA on ``target_modules`` wraps."""
    shapes = {
        name: module.in_features
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and _matches(name, target_modules)
    }
    if not shapes:
        raise ShapeError(f"no nn.Linear module of the model matches targets {list(target_modules)}")
    return shapes


def lora_layers(peft_model: Any, adapter_name: str) -> dict[str, Any]:
    """Base-model module name -> peft LoRA layer holding ``adapter_name``."""
    from peft.tuners.lora import LoraLayer

    base = peft_model.base_model.model if hasattr(peft_model, "base_model") else peft_model
    layers = {
        name: module
        for name, module in base.named_modules()
        if isinstance(module, LoraLayer) and adapter_name in module.lora_A
    }
    if not layers:
        raise ShapeError(f"the model has no LoRA layer for adapter {adapter_name!r}")
    return layers


def peft_a_shapes(peft_model: Any, adapter_name: str) -> dict[str, int]:
    """Module name -> d_in of each LoRA layer of the adapter (what shared_a_sha256 hashes)."""
    return {
        name: int(layer.lora_A[adapter_name].weight.shape[1])
        for name, layer in lora_layers(peft_model, adapter_name).items()
    }


def freeze_shared_a(peft_model: Any, adapter_name: str) -> None:
    """Freeze every lora_A of the adapter. Call AFTER set_adapter: it re-enables A's grad."""
    for layer in lora_layers(peft_model, adapter_name).values():
        layer.lora_A[adapter_name].weight.requires_grad_(False)


def install_shared_a(peft_model: Any, adapter_name: str, seed: int) -> str:
    """Overwrite the adapter's lora_A weights with the shared A, freeze them; return the hash."""
    layers = lora_layers(peft_model, adapter_name)
    shapes: dict[str, int] = {}
    r = None
    with torch.no_grad():
        for name, layer in layers.items():
            weight = layer.lora_A[adapter_name].weight
            r_here, d_in = int(weight.shape[0]), int(weight.shape[1])
            if r is not None and r_here != r:
                raise ShapeError(f"module {name} has LoRA rank {r_here}, others {r}")
            r = r_here
            weight.copy_(generate_shared_a(seed, name, r_here, d_in).to(weight.dtype))
            shapes[name] = d_in
    freeze_shared_a(peft_model, adapter_name)
    if r is None:  # unreachable: lora_layers raises when there is no layer
        raise ShapeError(f"the model has no LoRA layer for adapter {adapter_name!r}")
    return shared_a_sha256(seed, shapes, r)


def check_shared_a(peft_model: Any, adapter_name: str, seed: int) -> list[str]:
    """Names of modules whose lora_A differs from the regenerated shared A (empty = all equal)."""
    bad = []
    for name, layer in lora_layers(peft_model, adapter_name).items():
        weight = layer.lora_A[adapter_name].weight.detach().float().cpu()
        expected = generate_shared_a(seed, name, int(weight.shape[0]), int(weight.shape[1]))
        if not torch.equal(weight, expected):
            bad.append(name)
    return bad


LORA_A_SUFFIX = ".lora_A.weight"
PEFT_PREFIX = "base_model.model."


def module_of_lora_a(tensor_name: str) -> str | None:
    """Base-model module name of a peft ``lora_A`` tensor name, or None for other tensors.

    peft saves ``base_model.model.<module>.lora_A.weight`` (as seqr.registry.contributions
    names lora_B), and shared A is generated per ``<module>``.
    """
    if not tensor_name.endswith(LORA_A_SUFFIX):
        return None
    module = tensor_name[: -len(LORA_A_SUFFIX)]
    return module[len(PEFT_PREFIX) :] if module.startswith(PEFT_PREFIX) else module


def rounded_like(a: np.ndarray, dtype: str) -> np.ndarray:
    """The float32 shared A as a client storing safetensors ``dtype`` (F32, F16, BF16, F64)
    sends it, widened back to float32: what an exact comparison must expect."""
    if dtype == "BF16":  # round to nearest even on the upper 16 bits, as torch does
        return torch.from_numpy(np.ascontiguousarray(a)).to(torch.bfloat16).float().numpy()
    if dtype == "F16":
        return a.astype(np.float16).astype(np.float32)
    return a.astype(np.float32)


def shared_a_mismatches(
    tensors: Mapping[str, np.ndarray], seed: int, dtypes: Mapping[str, str] | None = None
) -> list[str]:
    """Names of the ``lora_A`` tensors that are not the federation's shared A of ``seed``.

    Pure, and needs no model: each module's A is regenerated from the public seed with the
    tensor's own shape (r, d_in) and compared bit for bit after rounding to the dtype the
    file stores (``dtypes``: tensor name -> safetensors dtype; default F32). A tensor of
    another rank than 2 is a mismatch. Used by the registry's audit and by routers, which
    must never mix adapters whose A differ (SEQR's ||B_i A x|| = ||R_i (A x)|| needs ONE A).
    """
    bad = []
    for name in sorted(tensors):
        module = module_of_lora_a(name)
        if module is None:
            continue
        value = np.asarray(tensors[name])
        if value.ndim != 2 or min(value.shape) < 1:
            bad.append(name)
            continue
        r, d_in = (int(d) for d in value.shape)
        expected = rounded_like(generate_shared_a(seed, module, r, d_in).numpy(),
                                (dtypes or {}).get(name, "F32"))  # fmt: skip
        if not np.array_equal(value.astype(np.float32), expected):
            bad.append(name)
    return bad


def shared_a_mismatches_in_file(weights: bytes, seed: int) -> list[str]:
    """``shared_a_mismatches`` over the bytes of adapter_model.safetensors (its header says
    each tensor's dtype); FormatError when the file is not valid safetensors."""
    from seqr.core.safetensors_check import load_float_tensors, parse_safetensors_header

    header = parse_safetensors_header(weights)
    tensors = load_float_tensors(weights, header)
    dtypes = {name: info.dtype for name, info in header.tensors.items()}
    return shared_a_mismatches(tensors, seed, dtypes)
