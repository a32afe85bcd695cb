"""The simulation's evaluation on a tiny Llama: one pass scores every method, SEQR equals brute
force, settings are chosen on validation only, and the report is written with its plots."""

import json

import torch
from _routed_lora import ADAPTERS, calibrate, make_peft_model, token_ids
from transformers import LlamaConfig, LlamaForCausalLM

from seqr.core.model_routing import ModelRoutingConfig, RoutedModel
from seqr.sim.evaluate import SEQR_CALIBRATIONS, EvalConfig, evaluate, split_heldout
from seqr.sim.library import AdapterLibrary, add_uniform_merge
from seqr.sim.report import write_report


def heldout_by_domain(n=8):
    # Each domain's text lives in its own token range, as in _routed_lora.calibrate.
    return {
        name: token_ids(n, 12, seed=10 + i, low=1 + 99 * i, high=100 + 99 * i).numpy()
        for i, name in enumerate(ADAPTERS)
    }


def tiny_library():
    model = make_peft_model(seed=0)
    return AdapterLibrary(model, ADAPTERS, calibrate(model))


def test_evaluation_reports_every_method_and_seqr_equals_brute_force(tmp_path):
    library = tiny_library()
    cfg = EvalConfig(max_sequences_per_domain=8, batch_size=4, peft_arrow=False)
    reference = token_ids(6, 12, seed=99).numpy()  # "public" text: all token ranges
    result = evaluate(library, heldout_by_domain(), cfg, reference=reference)
    methods = result["methods"]
    assert all(methods[m]["heldout_loss"] > 0 for m in SEQR_CALIBRATIONS)
    val_best = {m: max(methods[m]["validation_accuracy"].values()) for m in SEQR_CALIBRATIONS}
    assert val_best[result["seqr_selected"]] == max(val_best.values())
    for name in (
        "seqr",
        "seqr_public",
        "seqr_blend",
        "seqr_queries",
        "seqr_raw",
        "spectr",
        "brute_force",
        "arrow",
        "random",
    ):
        assert 0.0 <= methods[name]["routing_accuracy"] <= 1.0
        assert sum(map(sum, methods[name]["confusion"])) == result["test_sequences"] == 12
    assert result["agreement_seqr_brute_force"] == 1.0
    assert result["agreement_seqr_brute_force_per_token"] == 1.0
    assert result["agreement_selected_brute_force"] == 1.0
    assert methods["seqr"]["confusion"] == methods["brute_force"]["confusion"]
    for name in ("oracle", "base", "uniform_merge", "seqr", "seqr_per_token"):
        assert methods[name]["heldout_loss"] > 0
    write_report({"evaluation": result}, tmp_path, [])
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["evaluation"]["agreement_seqr_brute_force"] == 1.0
    assert "| seqr |" in (tmp_path / "report.md").read_text()
    met = {t["target"]: t["met"] for t in report["targets"]}
    assert met[f"SEQR ({result['seqr_selected']}) choices identical to brute force (share)"] is True
    assert met["wall time <= 3600 s"] is None  # no run section: not measured, not "met"
    for plot in ("confusion_seqr.png", "accuracy.png", "loss.png"):
        assert (tmp_path / plot).stat().st_size > 5_000


def test_recalibrated_brute_force_equals_brute_force_built_with_those_statistics():
    from seqr import BruteForceRouter
    from seqr.core.model_routing import build_routed_modules, reference_statistics
    from seqr.sim.eval_scores import collect_method_scores
    from seqr.sim.evaluate import recalibrate

    library = tiny_library()
    model = library.peft_model
    batches = list(torch.split(token_ids(8, 12, seed=5), 4))
    score = library.stats[ADAPTERS[0]].score
    queries = reference_statistics(model, ADAPTERS, batches, score=score, per_sequence=True)
    methods = {
        label: build_routed_modules(model, ADAPTERS, stats=stats, router_factory=BruteForceRouter)
        for label, stats in (("own", library.stats), ("queries", queries))
    }
    scores = collect_method_scores(model, methods, batches)
    own, direct = (scores[label].sequence_modules() for label in ("own", "queries"))
    assert not torch.allclose(own, direct)  # the two calibrations really differ
    recalibrated = recalibrate(own, methods["own"], methods["queries"])
    torch.testing.assert_close(recalibrated.float(), direct, rtol=1e-4, atol=1e-4)


def test_sequence_decisions_match_the_routed_model_on_all_layers():
    library = tiny_library()
    heldout = heldout_by_domain(4)
    result = evaluate(library, heldout, EvalConfig(max_sequences_per_domain=4, peft_arrow=False))
    data = split_heldout(heldout, ADAPTERS, EvalConfig(max_sequences_per_domain=4))
    routed = RoutedModel(
        library.peft_model, ModelRoutingConfig(), adapters=ADAPTERS, stats=library.stats
    )
    decision = routed.route_sequences(data.ids[data.is_test])
    expected = torch.zeros(3, 3, dtype=torch.long)
    for label, choice in zip(data.labels[data.is_test], decision.indices, strict=True):
        expected[label, choice] += 1
    if result["methods"]["seqr"]["aggregation"].endswith("all layers"):
        assert result["methods"]["seqr"]["confusion"] == expected.tolist()


def test_uniform_merge_is_the_mean_of_b_over_the_shared_a():
    library = tiny_library()
    name = add_uniform_merge(library)
    layer = next(
        m for m in library.peft_model.modules() if hasattr(m, "lora_B") and name in m.lora_B
    )
    mean_b = torch.stack([layer.lora_B[a].weight for a in ADAPTERS]).mean(0)
    torch.testing.assert_close(layer.lora_B[name].weight, mean_b)
    torch.testing.assert_close(layer.lora_A[name].weight, layer.lora_A[ADAPTERS[0]].weight)


def test_peft_arrow_anchor_loads_the_same_exports(tmp_path):
    from seqr.sim.evaluate import peft_arrow_model, peft_arrow_scorers

    library = tiny_library()
    paths = []
    for name in ADAPTERS:
        library.peft_model.save_pretrained(tmp_path, selected_adapters=[name])
        paths.append(str(tmp_path / name))

    def make_base():
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                             max_position_embeddings=128, pad_token_id=0)  # fmt: skip
        return LlamaForCausalLM(config)

    scorers = peft_arrow_scorers(peft_arrow_model(make_base, paths))
    assert len(scorers) == 4  # q and v in two layers
    x = torch.randn(5, 64)
    assert next(iter(scorers.values()))(x).shape == (5, 3)


def test_pair_losses_equal_each_plans_own_mixed_batch_losses():
    from seqr.sim.evaluate import pair_losses, sequence_losses

    library = tiny_library()
    model = library.peft_model
    ids = torch.cat([torch.as_tensor(v[:2]) for v in heldout_by_domain(2).values()])
    plans = [[ADAPTERS[i % 3] for i in range(len(ids))], ["__base__"] * len(ids)]
    cache = pair_losses(model, ids, plans, batch_size=4)
    assert len(cache) == 2 * len(ids)  # each (sequence, adapter) pair once

    def forward(batch, names):
        return model(input_ids=batch, adapter_names=names)

    for names in plans:
        direct = sequence_losses(forward, ids, names, batch_size=4)
        cached = torch.tensor([cache[row, name] for row, name in enumerate(names)])
        torch.testing.assert_close(cached, direct.float(), rtol=1e-5, atol=1e-5)
