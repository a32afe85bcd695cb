"""Statistics on a shared public reference corpus (per token) equal the directly computed
norms' moments, query statistics (per sequence) standardise each adapter's decision score;
blended statistics z-score as the mean of the own and reference z-scores."""

import numpy as np
import pytest
import torch
from _routed_lora import ADAPTERS, lora_linears, make_peft_model, token_ids

from seqr.core.errors import ShapeError
from seqr.core.model_routing import (
    ModelRoutingConfig,
    RoutedModel,
    blend_statistics,
    reference_statistics,
)
from seqr.core.model_routing.reference import decision_standardized
from seqr.core.stats import NormStatistics, RunningMoments


@pytest.mark.parametrize(
    ("score", "per_sequence"), [("norm", False), ("gain", False), ("gain", True)]
)
def test_reference_statistics_are_the_moments_of_each_adapters_direct_values(score, per_sequence):
    model = make_peft_model(seed=1)
    batches = [token_ids(4, 10, seed=s) for s in (5, 6)]
    stats = reference_statistics(model, ADAPTERS, batches, score=score, per_sequence=per_sequence)
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
    per_sequence_values = {}  # (module, adapter) -> each sequence's direct token mean
    for name, layer in layers.items():
        x = torch.cat([t.reshape(-1, t.shape[-1]) for t in inputs[name]]).double()
        for adapter in ADAPTERS:
            a = layer.lora_A[adapter].weight.double()
            b = layer.lora_B[adapter].weight.double()
            norms = (x @ a.T @ b.T).norm(dim=-1)
            if score == "gain":
                norms = norms / (x @ a.T).norm(dim=-1)
            # The token rule (seqr.core.measurement): not the first token of each sequence.
            norms = norms.reshape(8, 10)[:, 1:]
            if per_sequence:  # query statistics: moments of each sequence's token mean
                norms = norms.mean(dim=1)
            norms = norms.reshape(-1).detach().numpy()
            moments = stats[adapter].modules[name]
            assert stats[adapter].score == score
            assert moments.count == len(norms) == (8 if per_sequence else 8 * 9)
            if per_sequence:
                per_sequence_values[name, adapter] = norms
                continue
            np.testing.assert_allclose(moments.mean, [norms.mean()], rtol=1e-5)
            np.testing.assert_allclose(moments.std, [norms.std()], rtol=1e-4)
    for adapter in ADAPTERS if per_sequence else ():
        # Query statistics: each module's sequence-level z-score, then the adapter's decision
        # score (their mean over modules) standardised over the same sequences: one scale per
        # adapter on every module's sequence-level std, and the decision has mean 0, std 1.
        values = np.stack([per_sequence_values[name, adapter] for name in layers], axis=1)
        modules = [stats[adapter].modules[name] for name in layers]
        mean = np.array([m.mean[0] for m in modules])
        std = np.array([m.std[0] for m in modules])
        scale = std / values.std(axis=0)
        np.testing.assert_allclose(scale, scale[0], rtol=1e-4)
        decision = ((values - mean) / std).mean(axis=1)
        np.testing.assert_allclose([decision.mean(), decision.std()], [0.0, 1.0], atol=1e-4)


def test_reference_statistics_plug_into_the_routed_model():
    model = make_peft_model(seed=2)
    stats = reference_statistics(model, ADAPTERS, [token_ids(4, 12, seed=9)])
    routed = RoutedModel(model, ModelRoutingConfig(), adapters=ADAPTERS, stats=stats)
    decision = routed.route_sequences(token_ids(3, 12, seed=10))
    assert decision.indices.shape == (3,)


def _stats(mean, std, count=50, score="gain"):
    moments = RunningMoments(1, count, np.array([mean]), np.array([std**2 * count]))
    return NormStatistics({"layer.q_proj": moments}, score=score)


def test_blended_z_score_is_the_mean_of_the_own_and_reference_z_scores():
    own = {"a": _stats(2.0, 0.5), "b": _stats(1.0, 3.0)}
    ref = {"a": _stats(1.0, 2.0, count=80), "b": _stats(4.0, 0.25, count=80)}
    blend = blend_statistics(own, ref)
    for name in own:
        for g in (-1.0, 0.3, 2.0, 7.5):
            z = [(g - s.modules["layer.q_proj"].mean[0]) / s.modules["layer.q_proj"].std[0]
                 for s in (own[name], ref[name], blend[name])]  # fmt: skip
            assert z[2] == pytest.approx((z[0] + z[1]) / 2)
        assert blend[name].score == "gain"


def test_blend_refuses_statistics_of_different_adapters_or_scores():
    with pytest.raises(ShapeError, match="adapters"):
        blend_statistics({"a": _stats(1, 1)}, {"b": _stats(1, 1)})
    with pytest.raises(ShapeError, match="same score"):
        blend_statistics({"a": _stats(1, 1)}, {"a": _stats(1, 1, score="norm")})


def test_decision_standardized_gives_every_adapters_decision_unit_spread_over_the_pool():
    rng = np.random.default_rng(0)
    values = rng.normal(size=(50, 6, 3)) * [1.0, 2.0, 5.0] + [0.0, 1.0, -3.0]
    values[:, :, 2] += rng.normal(size=(50, 1)) * 4  # adapter 2's modules move together
    mean, std = values.mean(axis=0), values.std(axis=0)
    weights = rng.random(50)
    weights /= weights.sum()
    new_mean, new_std = decision_standardized(mean, std, values, weights)
    decision = ((values - new_mean) / new_std).mean(axis=1)  # (50, 3)
    center = weights @ decision
    np.testing.assert_allclose(center, 0.0, atol=1e-12)
    np.testing.assert_allclose(np.sqrt(weights @ (decision - center) ** 2), 1.0, rtol=1e-12)
    # A per-adapter affine change of the old decision score: the same ranking of sequences
    # for each adapter, and every module of an adapter rescaled alike.
    old = ((values - mean) / std).mean(axis=1)
    assert (np.argsort(old, axis=0) == np.argsort(decision, axis=0)).all()
    ratio = new_std / std
    np.testing.assert_allclose(ratio, ratio[:1].repeat(6, axis=0))
    assert ratio[0, 2] > ratio[0, 0]  # the correlated adapter's decisions spread the most
    constant = np.ones((4, 2, 1))  # a decision that never moves: no division by zero
    assert np.isfinite(decision_standardized(np.ones((2, 1)), np.ones((2, 1)), constant)[1]).all()
