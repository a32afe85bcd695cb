"""Held-out loss without holding the full logits: the same numbers as the model's own logits."""

import pytest
import torch
from _routed_lora import ADAPTERS, make_peft_model, token_ids

from seqr.core.errors import ConfigError
from seqr.sim import lm_loss
from seqr.sim.lm_loss import BASE, causal_lm_losses, next_token_losses, only_adapter


def test_blockwise_head_losses_equal_full_logits_losses(monkeypatch):
    model = make_peft_model(seed=0)
    ids = token_ids(5, 16, seed=1)  # 75 predicted positions: blocks of 8 leave a partial one
    monkeypatch.setattr(lm_loss, "LOSS_POSITIONS", 8)
    for name in (BASE, *ADAPTERS):
        direct = next_token_losses(model(input_ids=ids, adapter_names=[name] * 5).logits, ids)
        with only_adapter(model, name):
            blockwise = causal_lm_losses(model, ids)
        assert blockwise.dtype == torch.float64 and blockwise.shape == (5,)
        torch.testing.assert_close(blockwise, direct, rtol=1e-6, atol=1e-6)


def test_next_token_losses_equal_cross_entropy():
    logits = torch.randn(3, 7, 50, generator=torch.Generator().manual_seed(0))
    ids = token_ids(3, 7, seed=2, high=50)
    expected = torch.nn.functional.cross_entropy(
        logits[:, :-1].double().reshape(-1, 50), ids[:, 1:].reshape(-1), reduction="none"
    )
    torch.testing.assert_close(next_token_losses(logits, ids), expected.view(3, 6).mean(dim=1))


def test_only_adapter_restores_the_active_adapter_even_after_an_error():
    model = make_peft_model(seed=0)
    model.set_adapter(ADAPTERS[1])
    with pytest.raises(RuntimeError), only_adapter(model, ADAPTERS[2]):
        assert model.active_adapter == ADAPTERS[2]
        raise RuntimeError("a failed forward")
    assert model.active_adapter == ADAPTERS[1]
    with only_adapter(model, BASE):
        assert all(layer.disable_adapters for layer in lora_layers(model))  # none applies
    assert model.active_adapter == ADAPTERS[1]
    assert not any(layer.disable_adapters for layer in lora_layers(model))


def lora_layers(model):
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def test_a_model_whose_logits_are_more_than_its_head_is_refused():
    model = make_peft_model(seed=0)
    model.get_base_model().config.final_logit_softcapping = 30.0
    with pytest.raises(ConfigError, match="final_logit_softcapping"):
        causal_lm_losses(model, token_ids(1, 4, seed=0))
