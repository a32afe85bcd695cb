"""The synthetic adapter library of the benches: N LoRA adapters on one base model, sharing
the seeded A (seqr.core.shared_a), each owning a token range of the vocabulary (B and
statistics from that range), so that routing really mixes adapters in a batch.

The base model is SmolLM2-135M-Instruct when it is installed, else a tiny Llama; or any model
folder; or a config.json, built with seeded random weights (full-size shapes where weights
cannot travel, e.g. to a GPU machine).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import Any, Protocol

import torch

from seqr.core.errors import ModelError
from seqr.core.model_routing import ModelRoutingConfig, RoutedModel
from seqr.core.stats import NormStatistics

SMOLLM2 = "SmolLM2-135M-Instruct"


class LibrarySpec(Protocol):
    """What a bench's config says about its synthetic library (read-only fields)."""

    @property
    def base_model(self) -> str | None: ...
    @property
    def adapters(self) -> int: ...
    @property
    def rank(self) -> int: ...
    @property
    def batch(self) -> int: ...
    @property
    def prompt_tokens(self) -> int: ...
    @property
    def seed(self) -> int: ...
    @property
    def device(self) -> str: ...


@dataclass
class Workload:
    routed: RoutedModel
    input_ids: torch.Tensor  # (batch, prompt_tokens), left-padded
    attention_mask: torch.Tensor
    pad_token_id: int
    model: str
    source: str  # "registry" or "synthetic"

    @cached_property
    def routed_bf16(self) -> RoutedModel:
        """The same router with its first pass on a bf16 copy of the model."""
        config = replace(self.routed.config, first_pass_dtype="bfloat16")
        r = self.routed
        return RoutedModel(r.peft_model, config, adapters=r.adapters, stats=r.stats)


def _tiny_llama(seed: int) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=1024, pad_token_id=0)  # fmt: skip
    return LlamaForCausalLM(config).eval()


def base_model_for(cfg: LibrarySpec) -> tuple[Any, str]:
    """(model, its name in reports) for ``cfg.base_model`` (see the module docstring)."""
    from seqr.core.base_model import load_base_model

    name = cfg.base_model
    if name in (None, SMOLLM2):
        try:
            return load_base_model(SMOLLM2).model, SMOLLM2
        except ModelError as exc:
            if name == SMOLLM2:
                raise
            print(f"SmolLM2 unavailable ({exc}); using a tiny random Llama")
    if name in (None, "tiny"):
        return _tiny_llama(cfg.seed), "tiny-llama"
    if Path(str(name)).is_file():  # a config.json: that architecture, random weights
        return _random_model(Path(str(name)), cfg.seed), f"random weights, {Path(str(name)).name}"
    return load_base_model(str(name)).model, str(name)


def _random_model(config_file: Path, seed: int) -> Any:
    """A model of the architecture in ``config_file`` with seeded random weights: full-size
    shapes for timing and numerics where the weights cannot travel (e.g. to a GPU machine)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    config = AutoConfig.from_pretrained(config_file)
    return AutoModelForCausalLM.from_config(config).eval()


def token_range(vocab: int, i: int, n: int) -> tuple[int, int]:
    width = (vocab - 1) // n
    return 1 + i * width, 1 + (i + 1) * width


@torch.no_grad()
def _module_inputs(peft_model: Any, layers: dict[str, Any], ids: torch.Tensor) -> dict[str, Any]:
    """Each LoRA module's input rows (M, d_in) on the base model (adapters off)."""
    seen: dict[str, torch.Tensor] = {}
    handles = [
        layer.register_forward_hook(
            lambda m, args, out, n=n: seen.__setitem__(n, args[0].reshape(-1, args[0].shape[-1]))
        )
        for n, layer in layers.items()
    ]
    try:
        with peft_model.disable_adapter():
            peft_model(input_ids=ids, logits_to_keep=1)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def synthetic_workload(cfg: LibrarySpec) -> Workload:
    """N LoRA adapters sharing the seeded A, each owning a token range of the vocabulary: per
    module its B spans the directions of h = A x whose energy its range has most above the
    other ranges' (so routing really mixes adapters in a batch); statistics calibrated on the
    adapter's own range."""
    from peft import LoraConfig, get_peft_model

    from seqr.core.shared_a import install_shared_a, lora_layers

    model, name = base_model_for(cfg)
    names = [f"a{i}" for i in range(cfg.adapters)]
    lora = LoraConfig(r=cfg.rank, lora_alpha=2 * cfg.rank, target_modules=["q_proj", "v_proj"],
                      lora_dropout=0.0, bias="none")  # fmt: skip
    peft_model: Any = get_peft_model(model, lora, adapter_name=names[0])
    for adapter in names[1:]:
        peft_model.add_adapter(adapter, lora)
    for adapter in names:
        install_shared_a(peft_model, adapter, cfg.seed)
    peft_model = peft_model.to(cfg.device).eval()
    vocab = int(peft_model.get_base_model().config.vocab_size)
    g = torch.Generator().manual_seed(cfg.seed)
    own = []  # each adapter's calibration prompts, from its own token range
    for i in range(cfg.adapters):
        low, high = token_range(vocab, i, cfg.adapters)
        own.append(torch.randint(low, high, (4, cfg.prompt_tokens), generator=g).to(cfg.device))
    layers = lora_layers(peft_model, names[0])
    inputs = [_module_inputs(peft_model, layers, ids) for ids in own]
    with torch.no_grad():
        for module, layer in layers.items():
            a = layer.lora_A[names[0]].weight  # (r, d_in), shared
            moments = [(x @ a.T).T @ (x @ a.T) / len(x) for x in (d[module] for d in inputs)]
            total = sum(moments)
            for i, adapter in enumerate(names):
                others = (total - moments[i]) / (cfg.adapters - 1)
                vectors = torch.linalg.eigh(moments[i] - others).eigenvectors  # ascending
                b = torch.zeros_like(layer.lora_B[adapter].weight)  # (d_out, r)
                k = max(1, cfg.rank // 2)
                b[:k] = 0.05 * vectors[:, -k:].T  # top-k directions of this adapter's range
                layer.lora_B[adapter].weight.copy_(b)
    probe = RoutedModel(peft_model, ModelRoutingConfig(record=True), adapters=names)
    stats = {}
    for i, adapter in enumerate(names):
        probe.route_sequences(own[i])
        stats[adapter] = NormStatistics()
        for module_name, record in probe.records.items():
            stats[adapter].update(module_name, record.scores[..., i].reshape(-1).double().cpu())
    routed = RoutedModel(peft_model, ModelRoutingConfig(), adapters=names, stats=stats)
    # Bench prompts: row j from adapter j's range, lengths varying (left padding in the batch).
    ids = torch.zeros(cfg.batch, cfg.prompt_tokens, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for j in range(cfg.batch):
        low, high = token_range(vocab, j % cfg.adapters, cfg.adapters)
        length = cfg.prompt_tokens - (j % 4) * cfg.prompt_tokens // 8
        ids[j, -length:] = torch.randint(low, high, (length,), generator=g)
        mask[j, -length:] = 1
    return Workload(routed, ids.to(cfg.device), mask.to(cfg.device), 0, name, "synthetic")
