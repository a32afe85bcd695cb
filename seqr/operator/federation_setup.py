"""What the server expects of every adapter, derived from the base model it loaded itself.

The server never trusts a client for the federation's facts: it hashes the base model
(seqr model hash), regenerates the shared frozen A from the public seed (shared_a.py) and
reads each LoRA target's shape from the model. From these come the admission policy
(expected tensors, the shared A bit for bit), the registry's federation pin and tensor spec,
and the module list the plausibility probe measures.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Any

import numpy as np
from torch import nn

from seqr.core.admission_policy import AdmissionPolicy
from seqr.core.errors import ConfigError
from seqr.core.federation import FederationConfig
from seqr.core.shared_a import generate_shared_a, lora_target_shapes, shared_a_sha256
from seqr.registry.metadata import FederationPin, TensorSpec

__all__ = ["LoraModule", "FederationSetup", "setup_federation", "peft_tensor_name"]


def peft_tensor_name(module: str, which: str) -> str:
    """peft's saved name of a LoRA tensor: ``base_model.model.<module>.lora_A.weight``."""
    return f"base_model.model.{module}.lora_{which}.weight"


@dataclass(frozen=True)
class LoraModule:
    """One LoRA target of the base model."""

    name: str  # the transformers module name, as in norm_stats.json
    d_in: int
    d_out: int

    @property
    def a_tensor(self) -> str:
        return peft_tensor_name(self.name, "A")

    @property
    def b_tensor(self) -> str:
        return peft_tensor_name(self.name, "B")


@dataclass(frozen=True)
class FederationSetup:
    """The federation with its hashes filled in, and everything derived from it."""

    federation: FederationConfig  # base_model_sha256 and a_sha256 set (what clients receive)
    modules: tuple[LoraModule, ...]  # sorted by name
    shared_a: Mapping[str, np.ndarray]  # module name -> (r, d_in) float32
    adapter_dtype: str  # safetensors dtype of every adapter tensor

    @property
    def pin(self) -> FederationPin:
        fed = self.federation
        return FederationPin(
            base_model_sha256=fed.base_model_sha256,
            a_sha256=fed.a_sha256,
            a_seed=fed.a_seed,
            rank=fed.lora_rank,
            target_modules=tuple(sorted(fed.lora_target_modules)),
        )

    @property
    def tensor_spec(self) -> dict[str, TensorSpec]:
        r, dtype = self.federation.lora_rank, self.adapter_dtype
        spec = {}
        for m in self.modules:
            spec[m.a_tensor] = TensorSpec(dtype, (r, m.d_in))
            spec[m.b_tensor] = TensorSpec(dtype, (m.d_out, r))
        return spec

    def policy(
        self, allowed_keys: Iterable[str], revoked_keys: Iterable[str] = (), **bounds: Any
    ) -> AdmissionPolicy:
        """The admission policy for these client keys (hex); ``bounds`` are policy fields
        such as max_mean_z, max_sigma_ratio, max_age."""
        fed = self.federation
        expected_a = {m.a_tensor: self._a_as_sent(m.name) for m in self.modules}
        return AdmissionPolicy(
            base_model_sha256=fed.base_model_sha256,
            a_seed=fed.a_seed,
            a_sha256=fed.a_sha256,
            rank=fed.lora_rank,
            alpha=float(fed.lora_alpha),
            stats_score=fed.calib_score,
            target_modules=tuple(fed.lora_target_modules),
            expected_tensors={n: (t.shape, t.dtype) for n, t in self.tensor_spec.items()},
            stats_modules=tuple(m.name for m in self.modules),
            allowed_keys=frozenset(allowed_keys),
            revoked_keys=frozenset(revoked_keys),
            expected_a=expected_a,
            **bounds,
        )

    def _a_as_sent(self, module: str) -> np.ndarray:
        # A client storing BF16 / F16 weights rounds the shared A; compare what it can send.
        a = self.shared_a[module]
        if self.adapter_dtype == "BF16":
            import torch

            return torch.from_numpy(a).to(torch.bfloat16).float().numpy()
        if self.adapter_dtype == "F16":
            return a.astype(np.float16).astype(np.float32)
        return a


def setup_federation(
    fed: FederationConfig, model: nn.Module, model_sha256: str, *, adapter_dtype: str = "F32"
) -> FederationSetup:
    """Fill in the federation's hashes from the loaded base model; ConfigError when a pinned
    hash in ``fed`` differs from what the model gives."""
    if fed.base_model_sha256 and fed.base_model_sha256 != model_sha256:
        raise ConfigError(
            f"federation base-model-sha256 = {fed.base_model_sha256} but the server's base "
            f"model {fed.base_model!r} hashes to {model_sha256}; load the federation's model"
        )
    shapes = lora_target_shapes(model, fed.lora_target_modules)
    a_sha = shared_a_sha256(fed.a_seed, shapes, fed.lora_rank)
    if fed.a_sha256 and fed.a_sha256 != a_sha:
        raise ConfigError(
            f"federation a-sha256 = {fed.a_sha256} but the shared A regenerated from a-seed "
            f"{fed.a_seed} on the server's base model hashes to {a_sha}"
        )
    linear = dict(model.named_modules())
    modules = tuple(
        LoraModule(name, d_in, int(linear[name].out_features))  # type: ignore[arg-type]
        for name, d_in in sorted(shapes.items())
    )
    shared = {
        m.name: generate_shared_a(fed.a_seed, m.name, fed.lora_rank, m.d_in).numpy()
        for m in modules
    }
    return FederationSetup(
        federation=replace(fed, base_model_sha256=model_sha256, a_sha256=a_sha),
        modules=modules,
        shared_a=MappingProxyType(shared),
        adapter_dtype=adapter_dtype,
    )
