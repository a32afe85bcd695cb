"""`seqr route` and RegistryRouter on a small real registry (tests/_route_world.py): each
domain's text goes to its own adapter, the scores are the z-scores the registry's own files
give, mixed-adapter generation equals generating each row with its adapter alone, and a
registry that fails its audit (or changes after it) is refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from _route_world import DOMAINS, RouteWorld, domain_text, make_world
from safetensors.torch import load
from tiny import build_tiny_llama

from seqr.cli.route import main
from seqr.consumer.router import RegistryRouter, RouterConfig
from seqr.core import key_files, signing
from seqr.core.base_model import load_base_model
from seqr.core.errors import ConfigError, DataError, ModelError, RegistryError
from seqr.core.stats import NormStatistics
from seqr.operator.registry_ops import init_registry
from seqr.registry import audit_registry

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> RouteWorld:
    return make_world(tmp_path_factory.mktemp("route-world"))


def open_router(
    world: RouteWorld, registry: Path | None = None, **config: object
) -> RegistryRouter:
    return RegistryRouter.open(
        registry or world.registry,
        base_model=str(world.model_dir),
        config=RouterConfig(**config),  # type: ignore[arg-type]
    )


def held_out_texts() -> list[tuple[str, str]]:
    """(domain, text) pairs the adapters were not calibrated on, domains interleaved."""
    return [(d, domain_text(d, 3, seed)) for seed in (1, 2) for d in DOMAINS]


def test_route_picks_the_adapter_of_each_domain(world: RouteWorld) -> None:
    router = open_router(world, batch_size=4)  # batches mix domains and lengths
    pairs = held_out_texts()
    results = router.route([text for _, text in pairs])
    assert [r.adapter for r in results] == [domain for domain, _ in pairs]
    for r in results:
        assert r.runner_up in DOMAINS and r.runner_up != r.adapter
        assert r.margin == pytest.approx(r.scores[r.adapter] - r.scores[r.runner_up], abs=1e-5)
        assert r.margin > 0.05 and r.token_share is None and r.generated is None


@torch.no_grad()
def reference_scores(world: RouteWorld, text: str) -> dict[str, float]:
    """Mean over LoRA modules of the mean over tokens of (value - mean) / std, value =
    ||B A x|| or, for gain statistics, ||B A x|| / ||A x||, at the tokens the token rule
    counts (not the first; for gains not where ||A x|| <= 1e-4 ||x||): straight from the
    registry's files and a plain transformers model (no peft, no seqr routing code)."""
    verified = audit_registry(world.registry)
    tensors = load(verified.adapters[0].files["adapter_model.safetensors"])
    lora = {k.split(".lora_A.")[0] for k in tensors if ".lora_A." in k}  # peft module names
    base = load_base_model(str(world.model_dir))
    ids = base.tokenizer(text, return_tensors="pt")["input_ids"]
    inputs: dict[str, torch.Tensor] = {}
    handles = [
        module.register_forward_hook(lambda m, a, o, n=name: inputs.__setitem__(n, a[0][0]))
        for name, module in base.model.named_modules()
        if f"base_model.model.{name}" in lora
    ]
    base.model(input_ids=ids)
    for handle in handles:
        handle.remove()
    assert len(inputs) == len(lora) > 0
    scores = {}
    for adapter in verified.adapters:
        entry = adapter.entry
        tensors = load(adapter.files["adapter_model.safetensors"])
        stats = NormStatistics.from_json_bytes(adapter.files["norm_stats.json"])
        z = []
        for name, x in inputs.items():
            a = tensors[f"base_model.model.{name}.lora_A.weight"]
            b = tensors[f"base_model.model.{name}.lora_B.weight"]
            moments = stats.modules[name]
            x = x[1:]  # the first token's massive activation is not measured
            value = (x @ a.T @ b.T).norm(dim=-1)
            if stats.score == "gain":
                energy = (x @ a.T).norm(dim=-1)
                value = (value / energy)[energy > 1e-4 * x.norm(dim=-1)]
            z.append(((value - moments.mean[0]) / moments.std[0]).mean())
        scores[entry.name] = float(torch.stack(z).mean())
    return scores


def test_route_scores_are_the_z_scores_of_the_registry_files(world: RouteWorld) -> None:
    router = open_router(world)
    texts = [text for _, text in held_out_texts()[:3]]
    results = router.route(texts)  # padded batch; the reference runs each text alone
    for text, result in zip(texts, results, strict=True):
        expected = reference_scores(world, text)
        assert result.scores == pytest.approx(expected, abs=2e-4)
        assert result.adapter == max(expected, key=expected.__getitem__)


def test_reference_blended_and_query_calibrations_route_every_domain(
    world: RouteWorld, tmp_path: Path
) -> None:
    for domain in DOMAINS:  # public text of every kind, none of it an adapter's training data
        (tmp_path / f"{domain}.txt").write_text(domain_text(domain, 12, seed=7), encoding="utf-8")
    texts = [text for _, text in held_out_texts()]
    results = {
        calibration: open_router(world, calibration=calibration, reference=reference).route(texts)
        for calibration, reference in (
            ("own", None), ("reference", tmp_path), ("blend", tmp_path), ("queries", tmp_path)
        )
    }  # fmt: skip
    for own, ref, blend, queries in zip(*results.values(), strict=True):
        assert queries.scores != pytest.approx(ref.scores, abs=1e-3)  # sequence-level moments
        assert ref.scores != pytest.approx(own.scores, abs=1e-3)  # other statistics
        for name in own.scores:
            expected = (own.scores[name] + ref.scores[name]) / 2
            assert blend.scores[name] == pytest.approx(expected, abs=1e-4)
    for calibration in ("reference", "queries"):
        assert [r.adapter for r in results[calibration]] == [d for d, _ in held_out_texts()]


def test_soft_votes_standardised_over_the_query_pool_route_every_domain(
    world: RouteWorld, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for domain in DOMAINS:
        (tmp_path / f"{domain}.txt").write_text(domain_text(domain, 12, seed=7), encoding="utf-8")
    texts = [text for _, text in held_out_texts()]
    mean = open_router(world, calibration="queries", reference=tmp_path, aggregation="mean")
    router = open_router(world, calibration="queries", reference=tmp_path)  # the default
    assert router.config.aggregation == "soft_vote"
    votes = router.route(texts)
    assert [r.adapter for r in votes] == [d for d, _ in held_out_texts()]
    assert router.routed.vote_stats is not None  # measured on the same pool
    for m, v in zip(mean.route(texts), votes, strict=True):
        assert v.scores != pytest.approx(m.scores, abs=1e-3)
    inputs = tmp_path.parent / "inputs.txt"
    inputs.write_text("\n\n".join(t.replace("\n", " ") for t in texts) + "\n", "utf-8")
    args = ["--registry", str(world.registry), "--file", str(inputs), "--json",
            "--base-model", str(world.model_dir), "--aggregation", "soft-vote"]  # fmt: skip
    with pytest.raises(SystemExit):  # soft votes without the query pool: a usage error
        main(args)
    assert "--calibration queries" in capsys.readouterr().err
    # With the query pool soft votes are the default: the same choices without the flag.
    assert main([*args[:-2], "--calibration", "queries", "--reference", str(tmp_path)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [r["adapter"] for r in doc["results"]] == [r.adapter for r in votes]


def test_the_loss_check_gives_close_inputs_to_the_adapter_that_predicts_them_better(
    world: RouteWorld, tmp_path: Path
) -> None:
    from seqr.sim.lm_loss import next_token_losses

    for domain in DOMAINS:
        (tmp_path / f"{domain}.txt").write_text(domain_text(domain, 12, seed=7), encoding="utf-8")
    every = open_router(world, calibration="queries", reference=tmp_path, loss_check_margin=1e5)
    never = open_router(world, calibration="queries", reference=tmp_path, loss_check_margin=0)
    assert never.routed.config.loss_check_margin is None
    texts = [text for _, text in held_out_texts()]
    texts += [domain_text(a, 1, 30)[:50] + " " + domain_text(b, 1, 31)[:50]
              for a, b in zip(DOMAINS, DOMAINS[1:], strict=False)]  # fmt: skip
    changed = 0
    for text, plain, checked in zip(texts, never.route(texts), every.route(texts), strict=True):
        assert plain.loss_check is None and plain.runner_up is not None
        ids = every.tokenizer(text, return_tensors="pt")["input_ids"]
        model = every.routed.peft_model
        loss = {}
        for name in (plain.adapter, plain.runner_up):
            internal = every.routed.adapters[every.names.index(name)]
            logits = model(input_ids=ids, adapter_names=[internal]).logits
            loss[name] = float(next_token_losses(logits, ids)[0])
        best = min((plain.adapter, plain.runner_up), key=lambda n: (loss[n], n != plain.adapter))
        assert checked.adapter == best
        assert checked.loss_check == ("kept" if best == plain.adapter else "changed")
        assert checked.scores == pytest.approx(plain.scores)  # the same soft votes
        assert (checked.margin < 0) == (best != plain.adapter)
        changed += best != plain.adapter
    assert changed > 0  # the check moved at least one input
    with pytest.raises(ConfigError, match="loss_check_margin"):
        RouterConfig(loss_check_margin=-1.0)


def test_soft_votes_need_the_query_pool_and_are_its_default() -> None:
    with pytest.raises(ConfigError, match="with --calibration queries"):
        RouterConfig(aggregation="soft_vote")
    assert RouterConfig().aggregation == "mean"  # own statistics: no pool to standardise over
    queries = RouterConfig(calibration="queries", reference=Path("."))
    assert queries.aggregation == "soft_vote"
    per_token = RouterConfig(calibration="queries", reference=Path("."), mode="per_token")
    assert per_token.aggregation == "mean"
    with pytest.raises(ConfigError, match="must be mean or soft_vote"):
        RouterConfig(aggregation="median")  # type: ignore[arg-type]


def test_reference_calibration_needs_a_reference_folder() -> None:
    with pytest.raises(ConfigError, match="needs a reference folder"):
        RouterConfig(calibration="reference")
    with pytest.raises(ConfigError, match="takes no reference"):
        RouterConfig(reference=Path("public"))


def test_mixed_adapter_generation_equals_each_row_with_its_adapter_alone(
    world: RouteWorld,
) -> None:
    from peft import PeftModel

    router = open_router(world)
    pairs = held_out_texts()[:3]
    results = router.route_and_generate([text for _, text in pairs], max_new_tokens=6)
    assert {r.adapter for r in results} == set(DOMAINS)  # one batch, three adapters
    for (_, text), result in zip(pairs, results, strict=True):
        # Reference: the client's own export loaded by peft's standard loader, one row, no pad.
        base = load_base_model(str(world.model_dir))
        alone = PeftModel.from_pretrained(base.model, str(world.exports[result.adapter])).eval()
        ids = base.tokenizer(text, return_tensors="pt")["input_ids"]
        out = alone.generate(input_ids=ids, max_new_tokens=6, do_sample=False,
                             pad_token_id=base.tokenizer.pad_token_id)  # fmt: skip
        expected = base.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
        assert result.generated == expected
    assert router.generate([pairs[0][1]], max_new_tokens=6) == [results[0].generated]


def test_per_token_routing_reports_token_shares_and_generates(world: RouteWorld) -> None:
    router = open_router(world, mode="per_token")
    results = router.route_and_generate([text for _, text in held_out_texts()[:3]], 4)
    for r in results:
        assert r.token_share is not None and set(r.token_share) == set(DOMAINS)
        assert sum(r.token_share.values()) == pytest.approx(1.0)
        assert r.generated is not None and r.adapter in DOMAINS


def test_cli_routes_each_line_of_a_file_as_json(
    world: RouteWorld, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pairs = held_out_texts()[:3]
    inputs = tmp_path / "inputs.txt"
    inputs.write_text("\n\n".join(t.replace("\n", " ") for _, t in pairs) + "\n", "utf-8")
    code = main(["--registry", str(world.registry), "--file", str(inputs), "--generate", "3",
                 "--base-model", str(world.model_dir), "--json",
                 "--routing-pass", "bfloat16"])  # fmt: skip
    doc = json.loads(capsys.readouterr().out)
    assert code == 0 and doc["ok"] and doc["registry"]["version"] == 2
    assert [r["adapter"] for r in doc["results"]] == [d for d, _ in pairs]
    assert all(isinstance(r["generated"], str) and r["margin"] > 0 for r in doc["results"])


def test_cli_refuses_a_tampered_registry_and_keeps_the_trusted_state(
    world: RouteWorld, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    registry, state = tmp_path / "mirror", tmp_path / "state"
    shutil.copytree(world.registry, registry)
    args = ["--registry", str(registry), "--text", "12 34 56", "--trusted-state", str(state),
            "--base-model", str(world.model_dir)]  # fmt: skip
    assert main(args) == 0 and "digits" in capsys.readouterr().out
    trusted = {p: p.read_bytes() for p in state.rglob("*") if p.is_file()}
    # A mirror lowers the digits adapter's claimed mean: the routing-hijack lie.
    report = audit_registry(registry).report
    sha = next(e.adapter_sha256 for e in report.entries if e.name == "digits")
    stats_file = next((registry / "targets" / "adapters" / sha).glob("*.norm_stats.json"))
    stats_file.write_bytes(stats_file.read_bytes().replace(b'"mean":[', b'"mean":[-', 1))
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "REFUSED" in err and "norm_stats.json" in err and sha in err
    assert {p: p.read_bytes() for p in state.rglob("*") if p.is_file()} == trusted


def test_the_router_loads_the_bytes_the_audit_verified(world: RouteWorld, tmp_path: Path) -> None:
    # Files swapped on disk after the audit change nothing: the router never reads them again.
    registry = tmp_path / "mirror"
    shutil.copytree(world.registry, registry)
    verified = audit_registry(registry)
    for stored in (registry / "targets").rglob("*"):
        if stored.is_file():
            stored.write_bytes(b"swapped after the audit")
    router = RegistryRouter.from_verified(verified, base_model=str(world.model_dir))
    by_name = {a.name: a for a in router.adapters}
    for adapter in verified.adapters:
        assert by_name[adapter.entry.name].weights == adapter.files["adapter_model.safetensors"]


def test_a_base_model_other_than_the_adapters_one_is_refused(
    world: RouteWorld, tmp_path: Path
) -> None:
    other = build_tiny_llama(tmp_path / "other-llama", seed=1)
    with pytest.raises(ModelError, match="sha256.*--base-model"):
        RegistryRouter.open(world.registry, base_model=str(other))


def test_a_registry_without_adapters_is_refused(tmp_path: Path) -> None:
    key_files.write_keypair(tmp_path / "key")
    key = key_files.load_private_key(tmp_path / "key" / signing.PRIVATE_KEY_NAME)
    init_registry(tmp_path / "registry", [key])
    with pytest.raises(RegistryError, match="holds no adapters"):
        RegistryRouter.open(tmp_path / "registry")


@pytest.mark.parametrize(
    ("field", "value"),
    [("mode", "per_layer"), ("statistics", "global"), ("batch_size", 0),
     ("max_input_tokens", True), ("device", "gpu:x"), ("first_pass_dtype", "int8"),
     ("calibration", "mine")],
)  # fmt: skip
def test_router_config_names_the_bad_field(field: str, value: object) -> None:
    with pytest.raises(ConfigError, match=f"RouterConfig.{field}"):
        RouterConfig(**{field: value})  # type: ignore[arg-type]


def test_bad_inputs_are_refused_before_any_model_call(world: RouteWorld) -> None:
    router = open_router(world)
    with pytest.raises(DataError, match="input 1"):
        router.route(["fine", ""])
    with pytest.raises(DataError, match="no input"):
        router.route([])
    with pytest.raises(ConfigError, match="max_new_tokens"):
        router.generate(["fine"], max_new_tokens=0)


def test_cli_rejects_an_input_file_that_is_not_utf8(tmp_path: Path) -> None:
    bad = tmp_path / "inputs.txt"
    bad.write_bytes(b"caf\xe9\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["--registry", str(tmp_path), "--file", str(bad)])
    assert exit_info.value.code == 2
