"""Held-out loss without holding the full logits: the same numbers as the model's own logits."""

import pytest
import torch
from _routed_lora import ADAPTERS, make_peft_model, token_ids

from seqr.core.errors import ConfigError
from seqr.sim import lm_loss
from seqr.sim.lm_loss import BASE, causal_lm_losses, merged_adapter, next_token_losses


def test_merged_adapter_blockwise_losses_equal_the_lora_forwards_full_logits(monkeypatch):
    model = make_peft_model(seed=0)
    ids = token_ids(5, 16, seed=1)  # 75 predicted positions: blocks of 8 leave a partial one
    monkeypatch.setattr(lm_loss, "LOSS_POSITIONS", 8)
    for name in (BASE, *ADAPTERS):
        direct = next_token_losses(model(input_ids=ids, adapter_names=[name] * 5).logits, ids)
        with merged_adapter(model, name):
            blockwise = causal_lm_losses(model, ids)
        assert blockwise.dtype == torch.float64 and blockwise.shape == (5,)
        torch.testing.assert_close(blockwise, direct, rtol=1e-5, atol=1e-5)
    assert len({float(v) for v in losses_by_adapter(model, ids)}) == 4  # adapters differ


def test_next_token_losses_equal_cross_entropy():
    logits = torch.randn(3, 7, 50, generator=torch.Generator().manual_seed(0))
    ids = token_ids(3, 7, seed=2, high=50)
    expected = torch.nn.functional.cross_entropy(
        logits[:, :-1].double().reshape(-1, 50), ids[:, 1:].reshape(-1), reduction="none"
    )
    torch.testing.assert_close(next_token_losses(logits, ids), expected.view(3, 6).mean(dim=1))


def losses_by_adapter(model, ids):
    out = []
    for name in (BASE, *ADAPTERS):
        with merged_adapter(model, name):
            out.append(causal_lm_losses(model, ids)[0])
    return out


def test_merged_adapter_restores_the_exact_base_weights_even_after_an_error():
    model = make_peft_model(seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError), merged_adapter(model, ADAPTERS[2]):
        assert all(layer.disable_adapters for layer in lora_layers(model))  # merged instead
        changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
        assert changed and all("base_layer" in k for k in changed)
        raise RuntimeError("a failed forward")
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())  # bit for bit
    assert not any(layer.disable_adapters for layer in lora_layers(model))
    with pytest.raises(ConfigError, match="no adapter named 'nope'"), merged_adapter(model, "nope"):
        pass


def lora_layers(model):
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def test_a_model_whose_logits_are_more_than_its_head_is_refused():
    model = make_peft_model(seed=0)
    model.get_base_model().config.final_logit_softcapping = 30.0
    with pytest.raises(ConfigError, match="final_logit_softcapping"):
        causal_lm_losses(model, token_ids(1, 4, seed=0))
