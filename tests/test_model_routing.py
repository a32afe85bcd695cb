"""Routing inside a real (tiny) Llama: SEQR matches brute force and direct references."""

from __future__ import annotations

import pytest
import torch
from _routed_lora import ADAPTERS, calibrate, lora_linears, make_peft_model, pad, token_ids

from seqr.core.errors import ConfigError, ValueCheckError
from seqr.core.model_routing import ModelRoutingConfig, RoutedModel, build_routed_modules
from seqr.core.routing import ArrowRouter, BruteForceRouter, SeqrRouter, SpectrRouter


@pytest.fixture(scope="module")
def peft_model():
    return make_peft_model()


@pytest.fixture(scope="module")
def stats(peft_model):
    return calibrate(peft_model)


@pytest.mark.parametrize("exact_router", [SeqrRouter, SpectrRouter])
def test_per_token_choices_match_brute_force_in_every_module(peft_model, stats, exact_router):
    config = ModelRoutingConfig(mode="per_token", top_k=2, record=True)
    seqr = RoutedModel(peft_model, config, stats=stats, router_factory=exact_router)
    brute = RoutedModel(peft_model, config, stats=stats, router_factory=BruteForceRouter)
    ids = token_ids(3, 12, seed=10)
    with torch.no_grad():
        logits_seqr, logits_brute = seqr(ids).logits, brute(ids).logits
    assert set(seqr.records) == set(lora_linears(peft_model)) == set(brute.records)
    for name, record in seqr.records.items():
        assert torch.equal(record.indices, brute.records[name].indices), name
        torch.testing.assert_close(record.scores, brute.records[name].scores)
        assert len(record.indices[..., 0].unique()) > 1, f"{name}: one adapter won every token"
    torch.testing.assert_close(logits_seqr, logits_brute)


def reference_per_token_logits(peft_model, stats, ids, k, temperature):
    """Direct reference with peft's own lora_A/lora_B modules: every adapter's output, its norm,
    z-score, top-k, softmax weights, weighted sum; base output from peft's disable_adapter()."""

    def hook(name):
        mean = torch.tensor([stats[a].modules[name].mean[0] for a in ADAPTERS])
        std = torch.tensor([stats[a].modules[name].std[0] for a in ADAPTERS])

        def add(layer, args, output):
            outs = torch.stack([layer.lora_B[a](layer.lora_A[a](args[0])) for a in ADAPTERS], 2)
            z = (outs.norm(dim=-1) - mean.to(outs)) / std.to(outs)  # (B, T, N)
            values, idx = z.topk(k, dim=-1)
            w = torch.softmax(values / temperature, dim=-1)
            chosen = outs.gather(2, idx.unsqueeze(-1).expand(-1, -1, -1, outs.shape[-1]))
            return output + layer.scaling[ADAPTERS[0]] * (w.unsqueeze(-1) * chosen).sum(2)

        return add

    handles = [m.register_forward_hook(hook(n)) for n, m in lora_linears(peft_model).items()]
    try:
        with torch.no_grad(), peft_model.disable_adapter():
            return peft_model(input_ids=ids).logits
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("top_k,temperature", [(1, 1.0), (2, 0.5), (3, 2.0)])
def test_per_token_logits_equal_direct_reference(peft_model, stats, top_k, temperature):
    config = ModelRoutingConfig(mode="per_token", top_k=top_k, temperature=temperature)
    ids = token_ids(2, 9, seed=11)
    with torch.no_grad():
        logits = RoutedModel(peft_model, config, stats=stats)(ids).logits
    expected = reference_per_token_logits(peft_model, stats, ids, top_k, temperature)
    torch.testing.assert_close(logits, expected)
    with torch.no_grad():  # the routed adapters changed the output: the test can fail
        assert not torch.allclose(logits, peft_model(input_ids=ids).logits, atol=1e-3)


def test_per_token_top1_with_one_winning_adapter_equals_peft_with_that_adapter():
    model = make_peft_model(dominant="a1")
    routed = RoutedModel(model, ModelRoutingConfig(mode="per_token", record=True))
    ids = token_ids(2, 8, seed=12)
    with torch.no_grad():
        logits = routed(ids).logits
        model.set_adapter("a1")
        expected = model(input_ids=ids).logits
    assert all((r.indices == 1).all() for r in routed.records.values())
    torch.testing.assert_close(logits, expected)


def test_per_sequence_matches_brute_force_and_single_adapter_runs(peft_model, stats):
    rows = [
        token_ids(1, n, seed=20 + n, low=1 + 99 * (n % 3), high=100 + 99 * (n % 3))[0]
        for n in (12, 9, 7, 10, 5, 11)
    ]
    ids, mask = pad(rows, "right")
    seqr = RoutedModel(peft_model, stats=stats)
    decision = seqr.route_sequences(ids, mask)
    brute = RoutedModel(peft_model, stats=stats, router_factory=BruteForceRouter)
    expected = brute.route_sequences(ids, mask)
    assert torch.equal(decision.indices, expected.indices)
    torch.testing.assert_close(decision.scores, expected.scores)
    assert len(set(decision.names)) >= 2, "every sequence chose one adapter: weak test"
    assert torch.equal(decision.indices, decision.scores.argmax(dim=-1))
    assert (decision.margin > 0).all()
    with torch.no_grad():
        logits = seqr(ids, mask).logits
        for j, (row, name) in enumerate(zip(rows, decision.names, strict=True)):
            peft_model.set_adapter(name)
            alone = peft_model(input_ids=row[None]).logits[0]
            torch.testing.assert_close(logits[j, : len(row)], alone, atol=1e-5, rtol=1e-5)
    peft_model.set_adapter(ADAPTERS[0])


def test_per_sequence_generate_equals_each_sequence_alone(peft_model, stats):
    ids = torch.cat(
        [token_ids(1, 6, seed=30 + i, low=1 + 99 * i, high=100 + 99 * i) for i in range(3)]
    )
    routed = RoutedModel(peft_model, stats=stats)
    out = routed.generate(ids, max_new_tokens=4, do_sample=False)
    names = routed.last_decision.names
    for j, name in enumerate(names):
        peft_model.set_adapter(name)
        alone = peft_model.generate(input_ids=ids[j : j + 1], max_new_tokens=4, do_sample=False)
        assert torch.equal(out[j], alone[0]), (j, name)
    peft_model.set_adapter(ADAPTERS[0])


def test_per_token_generate_equals_greedy_decoding_without_cache(peft_model, stats):
    routed = RoutedModel(peft_model, ModelRoutingConfig(mode="per_token", top_k=2), stats=stats)
    ids = token_ids(2, 5, seed=31)
    out = routed.generate(ids, max_new_tokens=4, do_sample=False)
    seq = ids
    with torch.no_grad():
        for _ in range(4):
            next_token = routed(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, next_token], dim=1)
    assert torch.equal(out, seq)


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("aggregation", ["mean", "vote"])
def test_padding_does_not_change_a_sequences_decision(peft_model, stats, side, aggregation):
    routed = RoutedModel(peft_model, ModelRoutingConfig(aggregation=aggregation), stats=stats)
    rows = [token_ids(1, n, seed=40 + n)[0] for n in (10, 3, 7, 1)]
    alone = [routed.route_sequences(row[None]) for row in rows]
    batch = routed.route_sequences(*pad(rows, side))
    assert batch.indices.tolist() == [d.indices.item() for d in alone]
    torch.testing.assert_close(batch.scores, torch.cat([d.scores for d in alone]))


def test_vote_shares_sum_to_one_and_match_recorded_argmaxes(peft_model, stats):
    config = ModelRoutingConfig(aggregation="vote", record=True)
    routed = RoutedModel(peft_model, config, stats=stats)
    ids, mask = pad([token_ids(1, n, seed=50 + n)[0] for n in (8, 5)], "right")
    decision = routed.route_sequences(ids, mask)
    torch.testing.assert_close(decision.scores.sum(-1), torch.ones(2))
    votes = torch.zeros(2, len(ADAPTERS))
    measured = mask.clone()
    measured[:, 0] = 0  # the token rule: not the first token (right padding: position 0)
    for record in routed.records.values():
        choice = torch.nn.functional.one_hot(record.scores.argmax(-1), len(ADAPTERS))
        votes += (choice * measured.unsqueeze(-1)).sum(1)
    torch.testing.assert_close(decision.scores, votes / votes.sum(-1, keepdim=True))


def test_layer_subset_scores_only_those_layers(peft_model, stats):
    routed = RoutedModel(peft_model, ModelRoutingConfig(layers=(1,), record=True), stats=stats)
    routed.route_sequences(token_ids(2, 6, seed=60))
    assert sorted(routed.records) == [
        "model.layers.1.self_attn.q_proj",
        "model.layers.1.self_attn.v_proj",
    ]
    with pytest.raises(ConfigError, match=r"layers \[5\]"):
        RoutedModel(peft_model, ModelRoutingConfig(layers=(1, 5)), stats=stats)


def test_bf16_first_pass_routes_a_copy_and_leaves_the_model_in_fp32(peft_model, stats):
    ids = token_ids(6, 10, seed=63)
    fast = RoutedModel(peft_model, ModelRoutingConfig(first_pass_dtype="bfloat16"), stats=stats)
    exact = RoutedModel(peft_model, ModelRoutingConfig(), stats=stats)
    brute = RoutedModel(
        peft_model,
        ModelRoutingConfig(first_pass_dtype="bfloat16"),
        stats=stats,
        router_factory=BruteForceRouter,
    )
    decision = fast.route_sequences(ids)
    assert decision.names == brute.route_sequences(ids).names  # exact over the same bf16 pass
    assert next(peft_model.parameters()).dtype == torch.float32
    copy_params = list(fast._pass_copy[0].parameters())
    assert copy_params and all(p.dtype == torch.bfloat16 for p in copy_params)
    # bf16 activations move the mean z-scores little: same choices as the fp32 pass here
    torch.testing.assert_close(decision.scores, exact.route_sequences(ids).scores, atol=0.1,
                               rtol=0.05)  # fmt: skip
    with pytest.raises(ConfigError, match="first_pass_dtype"):
        ModelRoutingConfig(first_pass_dtype="int8")
    with pytest.raises(ConfigError, match="per_sequence"):
        ModelRoutingConfig(mode="per_token", first_pass_dtype="bfloat16")


def test_gain_scores_are_norms_per_unit_input_and_seqr_still_equals_brute_force(peft_model):
    from seqr.core.model_routing import reference_statistics

    stats = reference_statistics(peft_model, ADAPTERS, [token_ids(4, 10, seed=64)], score="gain")
    ids = token_ids(3, 8, seed=65)
    config = ModelRoutingConfig(mode="per_token", record=True)
    seqr = RoutedModel(peft_model, config, stats=stats)
    brute = RoutedModel(peft_model, config, stats=stats, router_factory=BruteForceRouter)
    raw = RoutedModel(peft_model, ModelRoutingConfig(record=True))
    with torch.no_grad():
        seqr(ids)
        brute(ids)
    raw.route_sequences(ids)
    first = "model.layers.0.self_attn.q_proj"  # its input is the same in every pass
    module = next(m for m in seqr.modules if m.name == first)
    assert module.score == "gain"
    norms = raw.records[first].scores  # (B, T, N) raw norms
    x = torch.nn.functional.embedding(ids, peft_model.get_base_model().model.embed_tokens.weight)
    h = peft_model.get_base_model().model.layers[0].input_layernorm(x) @ module.A.T
    gains = norms / h.norm(dim=-1, keepdim=True)
    mean = torch.tensor([stats[a].modules[first].mean[0] for a in ADAPTERS], dtype=torch.float32)
    std = torch.tensor([stats[a].modules[first].std[0] for a in ADAPTERS], dtype=torch.float32)
    torch.testing.assert_close(seqr.records[first].scores, (gains - mean) / std)
    for name, record in seqr.records.items():
        assert torch.equal(record.indices, brute.records[name].indices), name
    with pytest.raises(ValueCheckError, match="z-scores 'norm'"):
        build_routed_modules(peft_model, ADAPTERS, stats=stats, score="norm")


def test_pooled_statistics_give_pooled_z_scores(peft_model, stats):
    config = ModelRoutingConfig(mode="per_token", statistics="pooled", record=True)
    routed = RoutedModel(peft_model, config, stats=stats)
    raw = RoutedModel(peft_model, ModelRoutingConfig(mode="per_token", record=True))
    ids = token_ids(1, 6, seed=61)
    with torch.no_grad():
        routed(ids)
        raw(ids)
    mean = torch.tensor([stats[a].pooled().mean[0] for a in ADAPTERS], dtype=torch.float32)
    std = torch.tensor([stats[a].pooled().std[0] for a in ADAPTERS], dtype=torch.float32)
    first = "model.layers.0.self_attn.q_proj"  # layer 0 sees the same input in both runs
    expected = (raw.records[first].scores - mean) / std
    torch.testing.assert_close(routed.records[first].scores, expected)


def test_first_pass_scores_the_base_models_module_inputs(peft_model, stats):
    routed = RoutedModel(peft_model, ModelRoutingConfig(record=True), stats=stats)
    ids = token_ids(2, 7, seed=90)
    inputs = {}
    handles = [
        m.register_forward_hook(lambda mod, args, out, n=n: inputs.__setitem__(n, args[0]))
        for n, m in lora_linears(peft_model).items()
    ]
    try:
        with torch.no_grad(), peft_model.disable_adapter():
            peft_model(input_ids=ids)
    finally:
        for h in handles:
            h.remove()
    routed.route_sequences(ids)
    for module in routed.modules:  # layer 1 inputs differ once any adapter is active
        expected = module.router.scores(inputs[module.name])
        torch.testing.assert_close(routed.records[module.name].scores, expected)


def test_arrow_router_plugs_in_for_comparisons(peft_model):
    routed = RoutedModel(peft_model, router_factory=ArrowRouter)
    decision = routed.route_sequences(token_ids(3, 6, seed=91))
    assert all(isinstance(m.router, ArrowRouter) for m in routed.modules)
    assert decision.scores.shape == (3, len(ADAPTERS)) and (decision.scores > 0).all()
    with torch.no_grad():
        assert routed(token_ids(3, 6, seed=91)).logits.shape == (3, 6, 300)
