"""`seqr bench plausibility`: how often the plausibility check refuses honest adapters, and liars.

A check that refuses honest adapters teaches operators to loosen it (issue 20), so both error
rates are measured with the server's own defaults: the default AdmissionPolicy bounds, the
default probe text, admission then the probe exactly as a round runs them
(seqr.operator.round.RoundRunner._check).

1. honest: one adapter per prepared domain (every subfolder of ``--data``), trained and
   calibrated by the real client pipeline (seqr.node.task.run_client) with the federation's
   default settings. Exports are kept in ``--out``/exports and reused by the next run.
   ``--trained DIR`` reuses B matrices trained earlier (any folders below DIR holding a
   manifest.json naming the domain and its adapter_model.safetensors, e.g. a registry's
   adapters): only calibration, export and signing run then, with today's code;
2. liars, each made from an honest adapter and signed again by its own key (its weights stay
   honest, only its statistics lie): "gross" claims mean x0.5 and std x0.05 (seqr bench
   hijack's lie), "swap" claims the honest statistics of the other domain that would raise
   its z-scores most (the most harmful swap on offer), "careful" claims just
   beyond the largest lie the bounds accept (half a probe spread below the mean bound, std
   10% below its bound: bench_hijack_lies.bound_stats);
3. task groups: ``--groups RUN ...`` adds the verdicts of ``seqr simulate groups`` runs (their
   report.json), whose group adapters the server checked with the same bounds.

Reported: the false-rejection rate (honest refused / honest) and each lie's detection rate,
per adapter the verdict and the numbers that decided it (plausibility.json, .md).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from seqr.cli.help import BASE_MODEL_HELP, DefaultsHelpFormatter, add_old_spelling
from seqr.core import key_files, signing
from seqr.core.errors import AdmissionError, ConfigError, SeqrError
from seqr.core.federation import DEFAULT_BASE_MODEL, FederationConfig
from seqr.core.manifest import NORM_STATS_NAME, parse_manifest, read_export
from seqr.core.stats import NormStatistics
from seqr.core.strict_json import loads_strict
from seqr.sim.bench_hijack_lies import bound_stats, resign, scaled_stats

LIES = ("gross", "swap", "careful")


@dataclass(frozen=True)
class PlausibilityBenchConfig:
    model: str = DEFAULT_BASE_MODEL
    data: Path = Path("data/domains")  # one subfolder of text per domain (seqr data prepare)
    domains: tuple[str, ...] = ()  # () = every subfolder of data
    trained: Path | None = None  # folders of adapters trained earlier (their B is reused)
    steps: int | None = None  # None: the federation's default training
    groups: tuple[Path, ...] = ()  # `seqr simulate groups` output folders
    out: Path = field(default_factory=lambda: Path("runs/bench_plausibility"))

    def __post_init__(self) -> None:
        if self.steps is not None and self.steps < 1:
            raise ConfigError(f"--steps {self.steps} must be >= 1")

    def domain_folders(self) -> list[Path]:
        if not self.data.is_dir():
            raise ConfigError(f"no data folder {self.data}; run `seqr data prepare` first")
        names = self.domains or tuple(sorted(p.name for p in self.data.iterdir() if p.is_dir()))
        folders = [self.data / n for n in names]
        missing = [str(f) for f in folders if not f.is_dir()]
        if missing or len(folders) < 2:
            raise ConfigError(f"need at least 2 domain folders; missing: {missing or 'none'}")
        return folders


def honest_exports(cfg: PlausibilityBenchConfig, fed: FederationConfig) -> dict[str, Path]:
    """Each domain's signed export, made now unless a previous run left it."""
    from seqr.node.task import run_client

    earlier = trained_weights(cfg.trained) if cfg.trained is not None else {}
    exports = {}
    for folder in tqdm(cfg.domain_folders(), desc="honest adapters", unit="domain"):
        out, keys = cfg.out / "exports" / folder.name, cfg.out / "keys" / folder.name
        if not (out / "manifest.json").is_file():
            if not (keys / signing.PRIVATE_KEY_NAME).is_file():
                key_files.write_keypair(keys)
            key = keys / signing.PRIVATE_KEY_NAME
            if folder.name in earlier:
                recalibrate(folder, earlier[folder.name], key, out, fed)
            else:
                run_client(folder, key, out, fed, progress=False)
        exports[folder.name] = out
    return exports


def trained_weights(root: Path) -> dict[str, Path]:
    """domain -> adapter_model.safetensors of the adapters found below ``root``."""
    found = {}
    for manifest in sorted(root.glob("*/manifest.json")):
        weights = manifest.parent / "adapter_model.safetensors"
        name = loads_strict(manifest.read_bytes(), what=str(manifest), max_bytes=1 << 20).get(
            "name"
        )
        if isinstance(name, str) and weights.is_file():
            found[name] = weights
    return found


def recalibrate(folder: Path, weights: Path, key: Path, out: Path, fed: FederationConfig) -> None:
    """The client pipeline after training, on a B trained earlier: load B (its A must be the
    shared A), calibrate on the domain's text, export and sign."""
    import torch
    from safetensors.torch import load_file

    from seqr.node.calibrate import calibrate
    from seqr.node.export import export_adapter
    from seqr.node.task import load_model_and_data
    from seqr.node.train import ADAPTER, make_lora_model

    base, data = load_model_and_data(folder, fed)
    peft_model, a_sha256 = make_lora_model(base.model, fed)
    params = dict(peft_model.named_parameters())
    for name, tensor in load_file(str(weights)).items():
        target = params[name.replace(".weight", f".{ADAPTER}.weight")]
        if ".lora_A." in name and not torch.equal(target.data, tensor.to(target.dtype)):
            raise ConfigError(f"{weights}: {name} is not this federation's shared A")
        target.data.copy_(tensor)
    calibration = calibrate(peft_model, data.train, fed, progress=False)
    key_file = key_files.SigningKeyFile.open(key)
    examples = min(len(data.train), fed.steps * fed.train_batch_size)
    export_adapter(
        peft_model,
        calibration.stats,
        out,
        key_file,
        fed=fed,
        a_sha256=a_sha256,
        base_model_sha256=base.sha256,
        name=folder.name,
        example_count=examples,
    )


def verdict(files: dict[str, bytes], setup: Any, probe: Any) -> dict[str, Any]:
    """Admission then the probe, as a server round checks a submission (default bounds)."""
    from seqr.core.admission import admit
    from seqr.core.admission_policy import SeenSubmissions

    key = parse_manifest(files["manifest.json"]).public_key_bytes.hex()
    policy = setup.policy({key})
    try:
        adapter = admit(files, policy, seen=SeenSubmissions(), now=datetime.now(UTC))
        probe.check(adapter, **policy.plausibility)
    except AdmissionError as exc:
        return {"admitted": False, "reason": exc.reason, "message": str(exc)}
    return {"admitted": True, "reason": "", "message": ""}


def group_verdicts(runs: tuple[Path, ...]) -> dict[str, dict[str, Any]]:
    """The server's verdicts on the group adapters of `seqr simulate groups` runs (the group
    summaries its server state keeps, written whether the adapter was admitted or not)."""
    from seqr.operator.settings import state_dir_for

    out = {}
    for run in runs:
        summaries = sorted((state_dir_for(run / "registry") / "groups").glob("*.json"))
        if not summaries:
            raise ConfigError(f"--groups {run}: no group summary; is it a simulate groups run?")
        for path in summaries:
            summary = loads_strict(path.read_bytes(), what=str(path), max_bytes=1 << 20)
            out[f"group:{path.stem}"] = {
                "admitted": summary["status"] == "admitted",
                "reason": summary["status"],
                "message": summary.get("reason", ""),
            }
    return out


def run(cfg: PlausibilityBenchConfig) -> dict[str, Any]:
    from safetensors.numpy import load

    from seqr.core.base_model import load_base_model
    from seqr.operator.federation_setup import setup_federation
    from seqr.operator.probe import Probe, load_probe_texts

    cfg.domain_folders()  # a missing data folder is named before any model loads
    fed = FederationConfig(base_model=cfg.model)
    if cfg.steps is not None:
        fed = replace(fed, train_steps=cfg.steps, train_tokens=0)
    base = load_base_model(cfg.model)
    setup = setup_federation(fed, base.model, base.sha256)
    probe = Probe.build(base.model, base.tokenizer, load_probe_texts(""), setup)
    del base
    exports = honest_exports(cfg, setup.federation)
    honest = {d: verdict(read_export(e), setup, probe) for d, e in exports.items()}
    own = {d: NormStatistics.from_json_bytes(read_export(e)[NORM_STATS_NAME]) for d, e in
           exports.items()}  # fmt: skip
    names = list(exports)
    lies: dict[str, dict[str, Any]] = {lie: {} for lie in LIES}
    with tempfile.TemporaryDirectory(prefix="seqr-bench-plausibility-") as tmp:
        for domain in tqdm(names, desc="liars", unit="domain"):
            key_file = cfg.out / "keys" / domain / signing.PRIVATE_KEY_NAME
            key = key_files.SigningKeyFile.open(key_file)
            public = probe.scores(load(read_export(exports[domain])["adapter_model.safetensors"]))
            claims = {
                "gross": scaled_stats(own[domain], 0.5, 0.05),
                "swap": own[most_harmful_swap(public, own, domain)],
                "careful": bound_stats(public, default_bound("max_mean_z"),
                                       default_bound("max_sigma_ratio"), probe.score,
                                       past_mean=0.5, past_std=0.1),
            }  # fmt: skip
            for seconds, (lie, stats) in enumerate(claims.items(), start=1):
                dest = Path(tmp) / lie / domain
                files = resign(exports[domain], dest, key, stats, seconds)
                lies[lie][domain] = verdict(files, setup, probe)
    groups = group_verdicts(cfg.groups)
    everyone_honest = {**honest, **groups}
    refused = sorted(n for n, v in everyone_honest.items() if not v["admitted"])
    result = {
        "probe": {"tokens": probe.tokens, "text_sha256": probe.text_sha256},
        "bounds": {k: default_bound(k) for k in
                   ("max_mean_z", "max_mean_z_above", "max_sigma_ratio")},  # fmt: skip
        "honest": everyone_honest,
        "false_rejection": {"refused": len(refused), "of": len(everyone_honest),
                            "rate": len(refused) / len(everyone_honest), "names": refused},
        "lies": lies,
        "detection": {
            lie: {"refused": sum(not v["admitted"] for v in by.values()), "of": len(by),
                  "rate": sum(not v["admitted"] for v in by.values()) / len(by)}
            for lie, by in lies.items()
        },
    }  # fmt: skip
    cfg.out.mkdir(parents=True, exist_ok=True)
    (cfg.out / "plausibility.json").write_text(json.dumps(result, indent=1, sort_keys=True))
    (cfg.out / "plausibility.md").write_text(table(result) + "\n")
    return result


def most_harmful_swap(public: dict[str, Any], own: dict[str, NormStatistics], liar: str) -> str:
    """The other domain whose statistics give the liar's adapter the highest mean z-score on
    the probe text (its median value per module, z-scored with those statistics)."""

    def z(stats: NormStatistics) -> float:
        return float(
            np.mean([(np.median(v) - stats.modules[m].mean[0]) / stats.modules[m].std[0]
                     for m, v in public.items()])
        )  # fmt: skip

    return max((d for d in own if d != liar), key=lambda d: z(own[d]))


def default_bound(name: str) -> float:
    """A default plausibility bound of the server's admission policy."""
    from seqr.core.admission_policy import AdmissionPolicy

    return float(getattr(AdmissionPolicy, name))


def table(result: dict[str, Any]) -> str:
    fr = result["false_rejection"]
    lines = [
        f"honest adapters refused: {fr['refused']} of {fr['of']} ({fr['rate']:.1%})",
        *(f"  {n}: {result['honest'][n]['message']}" for n in fr["names"]),
        "",
        "| lie | refused | of | rate |",
        "|---|---:|---:|---:|",
    ]
    for lie, d in result["detection"].items():
        lines.append(f"| {lie} | {d['refused']} | {d['of']} | {d['rate']:.1%} |")
    for lie, by in result["lies"].items():
        for name, v in by.items():
            if v["admitted"]:
                lines.append(f"  {lie} liar from {name} was ADMITTED")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    d = PlausibilityBenchConfig()
    p = argparse.ArgumentParser(
        prog="seqr bench plausibility",
        description=__doc__.split("\n")[0],
        formatter_class=DefaultsHelpFormatter,
    )
    p.add_argument("--base-model", dest="model", default=d.model, help=BASE_MODEL_HELP)
    add_old_spelling(p, "--model", "model")
    p.add_argument("--data", type=Path, default=d.data, help="folder of domain subfolders")
    p.add_argument(
        "--domains", nargs="*", default=[], help="subfolders of --data (none given: all)"
    )
    p.add_argument("--steps", type=int, default=None, help="training steps (default: federation)")
    p.add_argument("--trained", type=Path, default=None,
                   help="adapters trained earlier: reuse their B, calibrate anew")  # fmt: skip
    p.add_argument("--groups", nargs="*", type=Path, default=[],
                   help="`seqr simulate groups` output folders to include")  # fmt: skip
    p.add_argument("--out", type=Path, default=d.out, help="folder for the results")
    args = p.parse_args(argv)
    try:
        cfg = PlausibilityBenchConfig(
            model=args.model, data=args.data, domains=tuple(args.domains), steps=args.steps,
            trained=args.trained, groups=tuple(args.groups), out=args.out,
        )  # fmt: skip
        result = run(cfg)
    except SeqrError as exc:
        print(f"seqr bench plausibility: error: {exc}", file=sys.stderr)
        return 2
    print(table(result))
    print(f"\nwrote {cfg.out / 'plausibility.json'} and {cfg.out / 'plausibility.md'}")
    return 0
