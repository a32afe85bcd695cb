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
