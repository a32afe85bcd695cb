"""Routing inside a model refuses what it cannot route exactly, naming the module or field."""

from __future__ import annotations

import pytest
import torch
from _routed_lora import calibrate, lora_linears, make_peft_model, token_ids

from seqr.core.errors import ConfigError, ShapeError, ValueCheckError
from seqr.core.model_routing import ModelRoutingConfig, RoutedModel, topk_weights
from seqr.core.stats import NormStatistics


@pytest.fixture(scope="module")
def peft_model():
    return make_peft_model()


@pytest.fixture(scope="module")
def stats(peft_model):
    return calibrate(peft_model)


def test_different_lora_a_rejected_naming_the_module():
    model = make_peft_model()
    bad = "model.layers.1.self_attn.v_proj"
    with torch.no_grad():
        lora_linears(model)[bad].lora_A["a2"].weight.add_(1e-3)
    with pytest.raises(ValueCheckError, match=rf"{bad}.*lora_A of 'a2' differs"):
        RoutedModel(model)


def test_different_lora_rank_rejected_as_shape_error():
    model = make_peft_model(ranks=(4, 8, 4))
    with pytest.raises(ShapeError, match=r"model.layers.0.self_attn.q_proj: lora_A of 'a1'"):
        RoutedModel(model)


@pytest.mark.parametrize("weighting", ["softmax", "uniform"])
def test_topk_weights_sum_to_one_and_k_above_n_rejected(weighting):
    scores = torch.randn(50, 3, generator=torch.Generator().manual_seed(70))
    for k in (1, 2, 3):
        indices, weights = topk_weights(scores, k, weighting, temperature=0.7)
        torch.testing.assert_close(weights.sum(-1), torch.ones(50))
        assert torch.equal(indices[:, 0], scores.argmax(-1))
    with pytest.raises(ShapeError, match=r"top_k must be an integer in \[1, N = 3\]"):
        topk_weights(scores, 4, weighting)


def test_top_k_above_adapter_count_rejected(peft_model):
    with pytest.raises(ShapeError, match="top_k is 4 but only 3 adapters"):
        RoutedModel(peft_model, ModelRoutingConfig(mode="per_token", top_k=4))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"mode": "per_layer"}, "mode must be one of"),
        ({"top_k": 0}, "top_k must be an integer >= 1"),
        ({"top_k": 2}, "per_sequence routing runs one adapter"),
        ({"mode": "per_token", "temperature": 0.0}, "temperature must be a finite number > 0"),
        ({"weighting": "max"}, "weighting must be one of"),
        ({"aggregation": "median"}, "aggregation must be one of"),
        ({"statistics": "global"}, "statistics must be one of"),
        ({"layers": (0, 0)}, "layers holds duplicates"),
        ({"mode": "per_token", "layers": (0,)}, "layers selects which modules vote"),
    ],
)
def test_bad_config_rejected_naming_the_field(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        ModelRoutingConfig(**kwargs)


def test_statistics_without_a_module_rejected_naming_it(peft_model, stats):
    partial = dict(stats)
    partial["a1"] = NormStatistics(
        {k: v for k, v in stats["a1"].modules.items() if "layers.1.self_attn.q" not in k}
    )
    with pytest.raises(ValueCheckError, match=r"'a1' have no module 'model.layers.1.self_attn"):
        RoutedModel(peft_model, stats=partial)
    with pytest.raises(ValueCheckError, match="no statistics for adapter 'a2'"):
        RoutedModel(peft_model, stats={"a0": stats["a0"], "a1": stats["a1"]})


def test_training_mode_and_caller_adapter_names_rejected(peft_model):
    routed = RoutedModel(peft_model)
    ids = token_ids(1, 4, seed=80)
    with pytest.raises(ConfigError, match="adapter_names is chosen by the router"):
        routed(ids, adapter_names=["a0"])
    peft_model.train()
    try:
        with pytest.raises(ConfigError, match=r"call model.eval\(\) first"):
            routed(ids)
    finally:
        peft_model.eval()
