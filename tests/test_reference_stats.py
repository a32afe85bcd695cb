"""Statistics on a shared public reference corpus equal the directly computed norms' moments."""

import numpy as np
import pytest
import torch
from _routed_lora import ADAPTERS, lora_linears, make_peft_model, token_ids

from seqr_core.model_routing import ModelRoutingConfig, RoutedModel, reference_statistics


@pytest.mark.parametrize("score", ["norm", "gain"])
def test_reference_statistics_are_the_moments_of_each_adapters_direct_values(score):
    model = make_peft_model(seed=1)
    batches = [token_ids(4, 10, seed=s) for s in (5, 6)]
    stats = reference_statistics(model, ADAPTERS, batches, score=score)
    inputs: dict[str, list[torch.Tensor]] = {}
    layers = lora_linears(model)
    hooks = [
        layer.register_forward_hook(
            lambda mod, args, out, name=name: inputs.setdefault(name, []).append(args[0])
        )
        for name, layer in layers.items()
    ]
    with torch.no_grad(), model.disable_adapter():
        for batch in batches:
            model(input_ids=batch)
    for hook in hooks:
        hook.remove()
    for name, layer in layers.items():
        x = torch.cat([t.reshape(-1, t.shape[-1]) for t in inputs[name]]).double()
        for adapter in ADAPTERS:
            a = layer.lora_A[adapter].weight.double()
            b = layer.lora_B[adapter].weight.double()
            norms = (x @ a.T @ b.T).norm(dim=-1)
            if score == "gain":
                norms = norms / (x @ a.T).norm(dim=-1)
            norms = norms.detach().numpy()
            moments = stats[adapter].modules[name]
            assert stats[adapter].score == score
            assert moments.count == len(norms) == 80
            np.testing.assert_allclose(moments.mean, [norms.mean()], rtol=1e-5)
            np.testing.assert_allclose(moments.std, [norms.std()], rtol=1e-4)


def test_reference_statistics_plug_into_the_routed_model():
    model = make_peft_model(seed=2)
    stats = reference_statistics(model, ADAPTERS, [token_ids(4, 12, seed=9)])
    routed = RoutedModel(model, ModelRoutingConfig(), adapters=ADAPTERS, stats=stats)
    decision = routed.route_sequences(token_ids(3, 12, seed=10))
    assert decision.indices.shape == (3,)
