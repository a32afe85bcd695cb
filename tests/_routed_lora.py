"""A tiny Llama with peft LoRA adapters sharing one A per module, for the model-routing tests.

Each adapter's B is drawn at a different scale in each module, so different adapters win in
different modules and sequences, and a wrong choice changes the logits.
"""

from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import Linear
from transformers import LlamaConfig, LlamaForCausalLM

from seqr.core.model_routing import ModelRoutingConfig, RoutedModel
from seqr.core.stats import NormStatistics

ADAPTERS = ("a0", "a1", "a2")
VOCAB = 300


def lora_linears(peft_model) -> dict[str, Linear]:
    model = peft_model.base_model.model
    return {n: m for n, m in model.named_modules() if isinstance(m, Linear)}


def make_peft_model(*, seed: int = 0, dominant: str | None = None, ranks=(4, 4, 4)):
    """Tiny Llama (hidden 64, 2 layers) with LoRA on q/v; all adapters share lora_A."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=0,
    )
    peft_model = None
    for name, r in zip(ADAPTERS, ranks, strict=True):
        lora = LoraConfig(r=r, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
        if peft_model is None:
            peft_model = get_peft_model(LlamaForCausalLM(config), lora, adapter_name=name)
        else:
            peft_model.add_adapter(name, lora)
    with torch.no_grad():
        for m, layer in enumerate(lora_linears(peft_model).values()):
            for i, name in enumerate(ADAPTERS):
                if layer.lora_A[name].weight.shape == layer.lora_A[ADAPTERS[0]].weight.shape:
                    layer.lora_A[name].weight.copy_(layer.lora_A[ADAPTERS[0]].weight)
                scale = (1.0 + 0.5 * ((i + m) % len(ADAPTERS))) * (20.0 if name == dominant else 1)
                layer.lora_B[name].weight.normal_(std=0.3 * scale)
    return peft_model.eval()


def token_ids(rows: int, length: int, seed: int, low: int = 1, high: int = VOCAB) -> torch.Tensor:
    return torch.randint(low, high, (rows, length), generator=torch.Generator().manual_seed(seed))


def calibrate(peft_model) -> dict[str, NormStatistics]:
    """Each adapter's statistics on its 'own' data (its own token range), unscaled norms."""
    probe = RoutedModel(peft_model, ModelRoutingConfig(record=True))
    stats = {}
    for i, name in enumerate(ADAPTERS):
        probe.route_sequences(token_ids(4, 16, seed=i, low=1 + 99 * i, high=100 + 99 * i))
        stats[name] = NormStatistics()
        for module, record in probe.records.items():
            stats[name].update(module, record.scores[..., i].reshape(-1))
    return stats


def pad(rows: list[torch.Tensor], side: str) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for j, row in enumerate(rows):
        cut = slice(0, len(row)) if side == "right" else slice(width - len(row), width)
        ids[j, cut], mask[j, cut] = row, 1
    return ids, mask


def module_token_scores(model, modules, batch):
    """Every routed module's token scores on ``batch`` straight from its router
    (module.scores: z-scores when it holds statistics) and the tokens its token rule measures:
    [((B, T, N), (B, T) bool)] in ``modules`` order, from one base-model pass."""
    current = {}

    def hook_for(module):
        def hook(layer, args, kwargs, output):
            x = args[0] if args else kwargs["x"]
            flat = x.reshape(-1, x.shape[-1])
            h = module.project(flat)
            keep = module.measured(x, h.reshape(*x.shape[:-1], -1), None)
            current[module.name] = (module.scores(flat, h).reshape(*x.shape[:-1], -1), keep)

        return hook

    handles = [m.layer.register_forward_hook(hook_for(m), with_kwargs=True) for m in modules]
    try:
        with torch.no_grad():
            model(input_ids=batch, adapter_names=["__base__"] * len(batch), logits_to_keep=1)
    finally:
        for handle in handles:
            handle.remove()
    return [current[m.name] for m in modules]
