"""The simulation's evaluation on a tiny Llama: one pass scores every method, SEQR equals brute
force, settings are chosen on validation only, and the report is written with its plots."""

import json

import numpy as np
import pytest
import torch
from _routed_lora import ADAPTERS, calibrate, make_peft_model, module_token_scores, token_ids
from transformers import LlamaConfig, LlamaForCausalLM

from seqr.core.errors import DataError
from seqr.core.model_routing import ModelRoutingConfig, RoutedModel
from seqr.sim.claims import claim_split
from seqr.sim.evaluate import (
    DEFAULT_CALIBRATION,
    DEFAULT_LAYERS,
    DEFAULT_METHOD,
    SEQR_VARIANTS,
    SOFT_VOTES,
    EvalConfig,
    evaluate,
    split_heldout,
)
from seqr.sim.library import AdapterLibrary, add_uniform_merge
from seqr.sim.report import write_report
from seqr.sim.score_dump import load_scores
from seqr.sim.significance import wilson_interval


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
    cfg = EvalConfig(max_sequences_per_domain=8, batch_size=4, peft_arrow=False,
                     per_token_losses=True, merge_baseline=True)  # fmt: skip
    reference = token_ids(6, 12, seed=99).numpy()  # "public" text: all token ranges
    result = evaluate(library, heldout_by_domain(), cfg, reference=reference)
    methods = result["methods"]
    assert all(methods[m]["heldout_loss"] > 0 for m in SEQR_VARIANTS)
    # Fixed defaults, never re-chosen on this run's validation split (issue 19).
    assert result["seqr_default"] == DEFAULT_METHOD
    assert all(methods[m]["layers"] == DEFAULT_LAYERS for m in SEQR_VARIANTS)
    others = [m for m in SEQR_VARIANTS if m != DEFAULT_METHOD]
    val = {m: methods[m]["validation_accuracy"][DEFAULT_LAYERS] for m in others}
    assert val[result["seqr_best_alternative"]] == max(val.values())
    for name in (*SEQR_VARIANTS, "seqr_raw", "spectr", "brute_force", "arrow", "random"):
        m = methods[name]
        assert 0.0 <= m["routing_accuracy"] <= 1.0
        assert sum(map(sum, m["confusion"])) == result["test_sequences"] == m["total"] == 12
        assert m["correct"] == round(m["routing_accuracy"] * 12)
        low, high = m["ci95"]
        assert low <= m["routing_accuracy"] <= high and high - low > 0.2  # 12 sequences: wide
        assert sum(d["total"] for d in m["per_domain"].values()) == 12
        assert sum(d["correct"] for d in m["per_domain"].values()) == m["correct"]
    assert result["test_sequences_per_domain"] == {a: 4 for a in ADAPTERS}
    assert result["agreement_seqr_brute_force"] == 1.0
    assert result["agreement_seqr_brute_force_per_token"] == 1.0
    assert result["agreement_default_brute_force"] == 1.0
    assert methods["seqr"]["confusion"] == methods["brute_force"]["confusion"]
    for name in ("oracle", "base", "uniform_merge", "seqr", "seqr_per_token"):
        assert methods[name]["heldout_loss"] > 0
        per_domain = methods[name]["heldout_loss_per_domain"]
        assert sorted(per_domain) == sorted(ADAPTERS)
        assert abs(sum(per_domain.values()) / 3 - methods[name]["heldout_loss"]) < 1e-5
    # A mistake's loss is the chosen adapter's where the oracle's is its own domain's: the
    # routed loss differs from the oracle's by the mistakes alone.
    for name in (*SEQR_VARIANTS, "arrow"):
        m, mistakes = methods[name], methods[name]["mistake_losses"]
        assert mistakes["rows"] == m["total"] - m["correct"]
        assert 0 <= mistakes["chosen_lower"] <= mistakes["rows"]
        if mistakes["rows"]:
            gap = mistakes["rows"] * (mistakes["chosen_loss"] - mistakes["labelled_loss"]) / 12
            assert m["heldout_loss"] - methods["oracle"]["heldout_loss"] == pytest.approx(gap)
    pairs = {(t["first"], t["second"]) for t in result["significance"]}
    # The default against the best alternative, what it replaced (soft votes alone, the mean
    # of z-scores), and ARROW.
    seconds = {result["seqr_best_alternative"], SOFT_VOTES, DEFAULT_CALIBRATION, "arrow"}
    assert pairs == {(DEFAULT_METHOD, second) for second in seconds}
    for test in result["significance"]:
        assert 0.0 <= test["p_value"] <= 1.0
    # Every mistake of the default is listed once, as its confusion matrix counts it.
    default, wrong = methods[result["seqr_default"]], result["misrouted"]
    assert len(wrong) == default["total"] - default["correct"]
    for w in wrong:
        i, j = ADAPTERS.index(w["domain"]), ADAPTERS.index(w["chosen"])
        assert i != j and default["confusion"][i][j] >= 1
        assert w["chunk"] % 2 == 1 and 0 <= w["chunk"] < 8  # test rows are the odd chunks
    write_report({"evaluation": result}, tmp_path, [])
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["evaluation"]["agreement_seqr_brute_force"] == 1.0
    md = (tmp_path / "report.md").read_text()
    assert "| seqr |" in md
    unclaimed = result["default_by_claim"]["unclaimed"]["total"]
    assert f"{unclaimed} of {result['test_sequences']} test sequences" in md
    assert {"confusion_seqr.png", "accuracy.png", "accuracy_per_domain.png",
            "loss_per_domain.png"} <= set(report["plots"])  # fmt: skip
    for plot in report["plots"]:
        assert (tmp_path / plot).stat().st_size > 5_000


def _direct_sequence_scores(model, routed_modules, batches):
    """(S, M, N) z-scores of routers built with statistics, scored directly and averaged over
    the tokens the routers' token rule measures (module.measured, as per-sequence routing)."""
    out = []
    for batch in batches:
        per_module = []
        for scores, keep in module_token_scores(model, routed_modules, batch):
            keep = keep.unsqueeze(-1)
            per_module.append((scores * keep).sum(1) / keep.sum(1))
        out.append(torch.stack(per_module, 1))
    return torch.cat(out)


def test_shared_pass_equals_routers_built_with_each_calibration():
    """One raw pass, z-scored afterwards, gives what a router built with each calibration's
    statistics scores directly; the statistics equal reference_statistics' own."""
    from seqr import BruteForceRouter, SpectrRouter
    from seqr.core.model_routing import (
        blend_statistics,
        build_routed_modules,
        reference_statistics,
    )
    from seqr.sim.eval_scores import score_heldout

    library = tiny_library()
    model, stats = library.peft_model, library.stats
    reference = list(torch.split(token_ids(6, 12, seed=99), 4))
    validation = list(torch.split(token_ids(8, 12, seed=5), 4))
    test = list(torch.split(token_ids(8, 12, seed=6), 4))
    scores = score_heldout(model, ADAPTERS, stats, validation=validation, test=test,
                           reference=reference)  # fmt: skip
    score = stats[ADAPTERS[0]].score
    ref = reference_statistics(model, ADAPTERS, reference, score=score)
    queries = reference_statistics(model, ADAPTERS, validation, score=score, per_sequence=True)
    expected = {"seqr": stats, "seqr_public": ref, "seqr_blend": blend_statistics(stats, ref),
                "seqr_queries": queries}  # fmt: skip
    assert sorted(scores.calibrations) == sorted([*expected, "seqr_queries_per_module"])
    everything = [*validation, *test]
    for label, label_stats in expected.items():
        direct = _direct_sequence_scores(
            model, build_routed_modules(model, ADAPTERS, stats=label_stats), everything
        )
        shared = scores.calibrations[label].z(scores.module_means["seqr"])
        torch.testing.assert_close(shared.float(), direct, rtol=1e-4, atol=1e-4)
    brute = _direct_sequence_scores(
        model,
        build_routed_modules(model, ADAPTERS, stats=stats, router_factory=BruteForceRouter),
        test,  # brute force checks SEQR on the test rows only
    )
    raw_norms = _direct_sequence_scores(model, build_routed_modules(model, ADAPTERS), everything)
    torch.testing.assert_close(scores.module_means["seqr_raw"], raw_norms, rtol=1e-4, atol=1e-5)
    # SpectR's score is the same raw norm (so the report takes it from seqr_raw).
    spectr = _direct_sequence_scores(
        model, build_routed_modules(model, ADAPTERS, router_factory=SpectrRouter), everything
    )
    torch.testing.assert_close(scores.module_means["seqr_raw"], spectr, rtol=1e-4, atol=1e-5)
    # The mean over modules is what per-sequence routing decides on (collect_scores).
    from seqr.core.model_routing.collect import base_pass, collect_scores

    routed = build_routed_modules(model, ADAPTERS, stats=stats)
    batch = torch.cat(test)
    sums = collect_scores(base_pass(model), routed, batch, torch.ones_like(batch))
    routed_mean = sums.score_sum / len(sums.modules_seen)
    shared_own = scores.calibrations["seqr"].z(scores.module_means["seqr"])[-8:].mean(1)
    torch.testing.assert_close(shared_own.float(), routed_mean, rtol=1e-4, atol=1e-4)
    own_brute = scores.calibrations["seqr"].z(scores.module_means["brute_force"])
    torch.testing.assert_close(own_brute.float(), brute, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(
        scores.calibrations["seqr"].z(scores.module_means["seqr"]),
        scores.calibrations["seqr_queries"].z(scores.module_means["seqr"]),
    )  # the calibrations really differ
    assert scores.token_means["seqr"].shape == (8, 12, 3)  # test rows only
    # The base model's held-out loss, from the same forward: what a pass of its own gives.
    from seqr.sim.lm_loss import next_token_losses

    ids = torch.cat(test)
    logits = model(input_ids=ids, adapter_names=["__base__"] * len(ids)).logits
    torch.testing.assert_close(scores.base_loss, next_token_losses(logits, ids))


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
    # The uniform merge's loss costs a pass of its own: only when asked (merge_baseline).
    assert (
        "heldout_loss" in result["methods"]["oracle"] and "uniform_merge" not in result["methods"]
    )


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
    from seqr.sim.peft_arrow import peft_arrow_model, peft_arrow_scorers

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
    from seqr.sim.eval_losses import pair_losses
    from seqr.sim.lm_loss import next_token_losses

    library = tiny_library()
    model = library.peft_model
    ids = torch.cat([torch.as_tensor(v[:2]) for v in heldout_by_domain(2).values()])
    plans = [[ADAPTERS[i % 3] for i in range(len(ids))], ["__base__"] * len(ids)]
    cache = pair_losses(model, ids, plans, batch_size=4)
    assert len(cache) == 2 * len(ids)  # each (sequence, adapter) pair once

    for names in plans:  # peft's mixed-batch path, full logits: an independent computation
        direct = next_token_losses(model(input_ids=ids, adapter_names=names).logits, ids)
        cached = torch.tensor([cache[row, name] for row, name in enumerate(names)]).double()
        torch.testing.assert_close(cached, direct, rtol=1e-6, atol=1e-6)


def test_the_loss_check_scores_close_pairs_by_each_adapters_own_loss_on_the_row():
    from seqr.sim.eval_loss_check import loss_checked
    from seqr.sim.lm_loss import next_token_losses

    library = tiny_library()
    model = library.peft_model
    ids = torch.cat([torch.as_tensor(v[:2]) for v in heldout_by_domain(2).values()])  # 6 rows
    scores = torch.tensor([[2.0, 1.5, 0.0], [0.0, 3.0, 0.0], [0.1, 0.0, 0.2],
                           [0.0, 5.0, 4.9], [4.0, 0.0, 0.0], [0.0, 0.0, 0.5]])  # fmt: skip
    is_test = torch.tensor([False, True, True, False, True, True])
    out = loss_checked(model, ADAPTERS, ids, scores, scores[is_test], is_test, batch_size=4)
    assert out.close.tolist() == [True, False, True, True, False, True]
    for row, (first, second) in {0: (0, 1), 2: (2, 0), 3: (1, 2), 5: (2, 0)}.items():
        # peft's mixed-batch path, full logits: an independent computation of each loss
        direct = [
            float(next_token_losses(model(input_ids=ids[row : row + 1],
                                          adapter_names=[ADAPTERS[a]]).logits, ids[row : row + 1]))
            for a in (first, second)
        ]  # fmt: skip
        assert out.pair_loss[row].tolist() == pytest.approx(direct, rel=1e-5)
        assert out.choice[row] == (second if direct[1] < direct[0] else first)
    assert out.choice[1] == 1 and out.choice[4] == 0 and out.pair_loss[[1, 4]].isnan().all()
    # brute force's ranking, the same as SEQR's, gets the same check
    assert out.brute_choice.tolist() == out.choice[is_test].tolist()


def test_mistake_losses_count_only_rows_routed_away_from_their_domain():
    from seqr.sim.eval_losses import mistake_losses

    chosen, labelled = ["a", "b", "b", "c"], ["a", "a", "b", "b"]
    out = mistake_losses(chosen, labelled, [1.0, 2.0, 3.0, 1.5], [1.0, 2.5, 3.0, 1.0])
    # rows 1 and 3 are mistakes; on row 1 the chosen adapter's loss is the lower one
    assert out == {"rows": 2, "chosen_lower": 1, "chosen_loss": 1.75, "labelled_loss": 1.75}
    none = mistake_losses(["a"], ["a"], [1.0], [1.0])
    assert none == {"rows": 0, "chosen_lower": 0, "chosen_loss": None, "labelled_loss": None}


def test_score_dump_reproduces_every_reported_accuracy(tmp_path):
    library = tiny_library()
    path = tmp_path / "scores.npz"
    cfg = EvalConfig(max_sequences_per_domain=8, batch_size=4, peft_arrow=False, losses=False,
                     scores_path=path)  # fmt: skip
    reference = token_ids(6, 12, seed=99).numpy()
    result = evaluate(library, heldout_by_domain(), cfg, reference=reference)
    dump = load_scores(path)
    assert dump.adapters == tuple(ADAPTERS) and int(dump.is_test.sum()) == 12
    for method in (*SEQR_VARIANTS, "arrow"):
        reported = result["methods"][method]
        assert dump.accuracy(method) == reported["routing_accuracy"]
        assert dump.accuracy(method, test=False) == reported["validation_accuracy"][DEFAULT_LAYERS]
    wrong = dump.decisions(DEFAULT_METHOD) != dump.labels
    listed = {(w["domain"], w["chunk"]) for w in result["misrouted"]}
    assert listed == {(ADAPTERS[dump.labels[i]], int(dump.chunks[i]))
                      for i in np.flatnonzero(wrong & dump.is_test)}  # fmt: skip


def test_claim_split_counts_the_rows_no_adapter_scores_above_its_traffic_mean(tmp_path):
    library = tiny_library()
    path = tmp_path / "scores.npz"
    cfg = EvalConfig(max_sequences_per_domain=8, batch_size=4, peft_arrow=False, losses=False,
                     scores_path=path)  # fmt: skip
    result = evaluate(library, heldout_by_domain(), cfg)
    split = result["default_by_claim"]
    # Recomputed from the dump in numpy: each test row's decision scores, its vote shares
    # standardised over the validation rows, split the default's choices.
    dump = load_scores(path)
    test = dump.is_test
    votes = dump.votes
    standardised = (votes - votes[~test].mean(axis=0)) / votes[~test].std(axis=0)
    top = standardised[test].max(axis=1)
    right = dump.decisions(DEFAULT_METHOD)[test] == dump.labels[test]
    for group, rows in (("claimed", top >= 0), ("unclaimed", top < 0)):
        assert split[group]["total"] == int(rows.sum())
        assert split[group]["correct"] == int(right[rows].sum())
    assert split["claimed"]["total"] + split["unclaimed"]["total"] == 12
    assert split["claimed"]["correct"] + split["unclaimed"]["correct"] == round(
        result["methods"][DEFAULT_METHOD]["routing_accuracy"] * 12
    )
    # Each tiny domain's text sits in its own token range: its adapter claims it.
    assert split["claimed"]["total"] > 0


def test_claim_split_of_an_empty_group_has_no_accuracy():
    scores = torch.tensor([[1.0, -2.0], [0.5, 0.0], [-0.1, 3.0]])
    split = claim_split(scores, torch.tensor([0, 0, 1]), torch.tensor([0, 1, 1]))
    assert split["claimed"] == {"share": 1.0, "correct": 2, "total": 3, "accuracy": 2 / 3,
                                "ci95": list(wilson_interval(2, 3))}  # fmt: skip
    assert split["unclaimed"]["total"] == 0 and split["unclaimed"]["accuracy"] is None


def test_a_score_dump_holding_pickled_objects_is_refused_not_unpickled(tmp_path):
    # Attack: a crafted scores.npz whose arrays are pickles (code runs on unpickling).
    path = tmp_path / "scores.npz"
    np.savez(path, adapters=np.array([object()], dtype=object))
    before = path.read_bytes()
    with pytest.raises(DataError, match="not a score dump"):
        load_scores(path)
    assert path.read_bytes() == before


def test_a_single_array_file_is_refused_as_a_score_dump(tmp_path):
    path = tmp_path / "scores.npy"
    np.save(path, np.zeros(3))
    with pytest.raises(DataError, match="not a score dump.*one array"):
        load_scores(path)


def test_a_score_dump_with_mismatched_shapes_is_refused(tmp_path):
    path = tmp_path / "scores.npz"
    rows = np.zeros(4, dtype=np.int64)
    np.savez(path, adapters=np.array(["a", "b"]), module_names=np.array(["m"]),
             module_layers=np.zeros(1), labels=rows, is_test=rows.astype(bool), chunks=rows,
             **{"raw.seqr": np.zeros((3, 1, 2)), "mean.seqr": np.zeros((1, 2)),
                "std.seqr": np.ones((1, 2))})  # fmt: skip
    with pytest.raises(DataError, match=r"raw\.seqr.*do not match \(4, 1, 2\)"):
        load_scores(path)


def test_a_score_dump_without_votes_says_how_to_get_the_defaults_decisions(tmp_path):
    path = tmp_path / "scores.npz"
    rows = np.array([0, 1, 0, 1])
    np.savez(path, adapters=np.array(["a", "b"]), module_names=np.array(["m"]),
             module_layers=np.zeros(1), labels=rows, is_test=rows.astype(bool), chunks=rows,
             **{"raw.seqr": np.zeros((4, 1, 2)), "mean.seqr": np.zeros((1, 2)),
                "std.seqr": np.ones((1, 2))})  # fmt: skip
    dump = load_scores(path)  # written before the votes were kept: the rest still reads
    assert dump.votes is None and dump.decisions("seqr").tolist() == [0, 0, 0, 0]
    with pytest.raises(DataError, match="no soft token votes.*--dump-scores"):
        dump.decisions(DEFAULT_METHOD)
