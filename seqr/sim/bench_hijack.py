"""`seqr bench hijack`: a planted adapter with falsified statistics, with and without checks.

SEQR routes by z = (||B A x|| - mu) / sigma (arXiv 2509.18093); an adapter that claims a
small mu and a tiny sigma gets a large z on every input and wins inputs that are not its own
(routing hijack, docs/THREATS.md). This benchmark measures it on real text and real adapters:

1. honest clients train, calibrate and sign adapters with the real client pipeline
   (seqr.node.task.run_client), one per domain; a liar trains one on its own domain too, then
   re-signs it with statistics scaled down (``mean_factor``, ``std_factor``);
2. registry "no checks": every export is staged straight into a registry (the registry's own
   format checks only); registry "checked": the server's round (admission + plausibility
   probe, seqr/operator/round.py) decides, with verdicts and reasons;
3. routing: each honest domain's held-out sequences are routed per sequence (RoutedModel,
   mean of per-module z-scores) over the adapters a registry holds; reported per scenario:
   the share of honest sequences the liar captures, and routing accuracy (own domain's
   adapter chosen). A "bound" liar claims the largest lie the check still accepts (the
   residual risk the bounds leave);
4. query statistics (seqr serve's default) ignore every claim; measured for the liar's
   adapter and for a rank-1 B crafted from the public probe text alone (crafted_b), which
   claims nothing and wins where its score's upper tail beats the right adapter's.

Scores are computed once with every adapter loaded; a scenario takes the argmax over its own
adapters' columns (exact for mean aggregation: an adapter's score does not depend on others).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from seqr.cli.help import BASE_MODEL_HELP, DefaultsHelpFormatter, add_old_spelling
from seqr.core import key_files, signing
from seqr.core.admission_policy import AdmissionPolicy
from seqr.core.errors import ConfigError, SeqrError
from seqr.core.federation import FederationConfig
from seqr.core.manifest import NORM_STATS_NAME, read_export
from seqr.core.model_routing.reference import pool_statistics
from seqr.core.stats import NormStatistics
from seqr.sim.bench_hijack_lies import (
    bound_stats,
    bound_sweep,
    crafted_b,
    resign,
    scaled_stats,
    sequence_scores,
)
from seqr.sim.bench_hijack_report import plot, table

LIAR, BOUND, CRAFTED = "liar", "bound-liar", "crafted-rank-1"


@dataclass(frozen=True)
class HijackBenchConfig:
    model: str = "SmolLM2-135M-Instruct"
    data: Path = Path("data/domains")  # one subfolder of text per domain (seqr data prepare)
    honest: tuple[str, ...] = ("python_code", "shakespeare", "licences", "gcide_medicine")
    liar: str = "fortunes_en"  # the domain the liar's adapter is trained on
    max_files: int = 1  # text files read per domain (sorted), to bound the run time
    rank: int = 8
    steps: int = 20
    batch_size: int = 4
    seq_len: int = 64
    lr: float = 2e-3
    calib_sequences: int = 32
    eval_sequences: int = 24  # held-out sequences per honest domain
    mean_factor: float = 0.5  # the lie: claimed mean = factor x honest mean
    std_factor: float = 0.05  # claimed std = factor x honest std
    probe_text: str = ""  # server probe text ("" = the server's built-in default)
    probe_tokens: int = 4096
    max_mean_z: float = AdmissionPolicy.max_mean_z
    max_sigma_ratio: float = AdmissionPolicy.max_sigma_ratio
    out: Path = field(default_factory=lambda: Path("runs/bench_hijack"))

    def __post_init__(self) -> None:
        if not self.honest or self.liar in self.honest or len(set(self.honest)) != len(self.honest):
            raise ConfigError(f"honest domains {self.honest} must be distinct, without {self.liar}")
        for name in ("max_files", "steps", "eval_sequences", "calib_sequences"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} = {getattr(self, name)} must be >= 1")
        if not (self.mean_factor > 0 and self.std_factor > 0):
            raise ConfigError("mean_factor and std_factor must be > 0")

    def federation(self) -> FederationConfig:
        return FederationConfig(
            base_model=self.model,
            lora_rank=self.rank,
            lora_alpha=2 * self.rank,
            train_steps=self.steps,
            train_batch_size=self.batch_size,
            train_seq_len=self.seq_len,
            train_lr=self.lr,
            calib_max_sequences=self.calib_sequences,
            train_heldout_fraction=0.2,
        )


def train_exports(cfg: HijackBenchConfig, fed: FederationConfig, work: Path) -> dict[str, Path]:
    """Each domain's signed export (honest clients and the liar), by domain name."""
    from seqr.node.task import run_client

    exports = {}
    for domain in tqdm([*cfg.honest, cfg.liar], desc="train clients", unit="client"):
        source = cfg.data / domain
        files = sorted(p for p in source.iterdir() if p.is_file() and not p.name.startswith("."))
        if not files:
            raise ConfigError(f"domain folder {source} holds no files; run seqr data prepare")
        data = work / "data" / domain
        data.mkdir(parents=True)
        for path in files[: cfg.max_files]:
            shutil.copyfile(path, data / path.name)
        key_files.write_keypair(work / "keys" / domain)
        key = work / "keys" / domain / signing.PRIVATE_KEY_NAME
        run_client(data, key, work / "exports" / domain, fed, name=domain, progress=False)
        exports[domain] = work / "exports" / domain
    return exports


def admit_all(
    cfg: HijackBenchConfig, subs: dict[str, dict[str, bytes]], setup: Any, probe: Any, work: Path
) -> dict[str, Any]:
    """Registry "no checks" (staged as they are) and "checked" (the server's round)."""
    from seqr.operator.registry_ops import init_registry, open_publisher
    from seqr.operator.round import ReplayStore, RoundRunner, Submission

    key = signing.generate_private_key()
    for name in ("unchecked", "checked"):
        init_registry(work / name, [key], setup=setup)
    with open_publisher(work / "unchecked", [key], setup, auto_enrol=True) as publisher:
        for name, files in subs.items():
            if name != BOUND:  # the same weights as the liar's: one of them is enough
                publisher.stage_adapter(files)
        unchecked = publisher.publish()
    order = list(subs)
    with open_publisher(work / "checked", [key], setup, auto_enrol=True) as publisher:
        runner = RoundRunner(
            publisher,
            setup,
            probe,
            ReplayStore(work / "checked-state"),
            max_mean_z=cfg.max_mean_z,
            max_sigma_ratio=cfg.max_sigma_ratio,
        )
        result = runner.run(
            [Submission(i, files) for i, files in enumerate(subs.values())], now=datetime.now(UTC)
        )
    verdicts = {order[v.node_id]: v for v in result.verdicts}
    return {"unchecked_entries": unchecked.entries, "verdicts": verdicts}


def route_scores(
    cfg: HijackBenchConfig,
    setup: Any,
    exports: dict[str, Path],
    stats: dict[str, NormStatistics],
) -> tuple[np.ndarray, np.ndarray, list[str], Any]:
    """Mean z-scores per held-out sequence from RoutedModel: (scores (S, N), true domain
    index (S,), adapter names, a Probe over the same sequences for the bound sweep)."""
    import torch
    from peft import PeftModel

    from seqr.core.base_model import load_base_model
    from seqr.core.model_routing import ModelRoutingConfig, RoutedModel
    from seqr.core.textdata import load_text_data
    from seqr.operator.probe import Probe

    base = load_base_model(cfg.model)
    parts, truth = [], []
    for i, domain in enumerate(cfg.honest):
        data = load_text_data(
            cfg.out / "work" / "data" / domain,
            base.tokenizer,
            seq_len=setup.federation.train_seq_len,
            heldout_fraction=setup.federation.train_heldout_fraction,
            seed=setup.federation.data_seed,
        )
        chunks = (data.heldout if len(data.heldout) else data.train)[: cfg.eval_sequences]
        parts.append(chunks)
        truth.extend([i] * len(chunks))
    chunks = np.concatenate(parts)
    eval_probe = Probe.from_chunks(base.model, chunks, setup)  # before peft wraps the model
    names = list(exports)
    model = PeftModel.from_pretrained(base.model, str(exports[names[0]]), adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(str(exports[name]), adapter_name=name)
    model.eval()
    routed = RoutedModel(model, ModelRoutingConfig(), adapters=names, stats=stats)
    rows = []
    for j in tqdm(range(0, len(chunks), 8), desc="route held-out", unit="batch"):
        decision = routed.route_sequences(torch.from_numpy(chunks[j : j + 8]))
        rows.append(decision.scores.double().numpy())
    return np.concatenate(rows), np.asarray(truth), names, eval_probe


def query_scores(per_sequence: list[Mapping[str, np.ndarray]]) -> np.ndarray:
    """(S, N) decision scores by query statistics: each adapter's per-module moments over the
    routed sequences themselves, then its decision score standardised over them too (as seqr
    serve's pool does, without its decay and caps: every domain here has as many sequences)."""
    cols = []
    for norms in per_sequence:
        values = np.stack(list(norms.values()), axis=1)[..., None]  # (S, M, 1)
        mean, std = pool_statistics(values)
        cols.append(((values - mean) / std).mean(axis=1)[:, 0])
    return np.stack(cols, axis=1)


def scenario(
    scores: np.ndarray,
    truth: np.ndarray,
    names: list[str],
    used: list[str],
    honest: tuple[str, ...],
) -> dict[str, Any]:
    cols = [names.index(n) for n in used]
    picked = [used[k] for k in scores[:, cols].argmax(axis=1)]
    liars = [n for n in used if n not in honest]
    per_domain = {
        d: float(np.mean([picked[s] in liars for s in np.flatnonzero(truth == i)]))
        for i, d in enumerate(honest)
    }
    return {
        "adapters": used,
        "capture_share": float(np.mean([p in liars for p in picked])),
        "accuracy": float(np.mean([p == honest[t] for p, t in zip(picked, truth, strict=True)])),
        "capture_by_domain": per_domain,
    }


def run(cfg: HijackBenchConfig) -> dict[str, Any]:
    from seqr.core.base_model import load_base_model
    from seqr.operator.federation_setup import setup_federation
    from seqr.operator.probe import Probe, load_probe_texts

    work = cfg.out / "work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    base = load_base_model(cfg.model)
    setup = setup_federation(cfg.federation(), base.model, base.sha256)
    texts = load_probe_texts(cfg.probe_text)
    probe = Probe.build(base.model, base.tokenizer, texts, setup, max_tokens=cfg.probe_tokens)
    del base
    exports = train_exports(cfg, setup.federation, work)
    subs = {d: read_export(exports[d]) for d in cfg.honest}
    key = key_files.SigningKeyFile.open(work / "keys" / cfg.liar / signing.PRIVATE_KEY_NAME)
    own = NormStatistics.from_json_bytes(read_export(exports[cfg.liar])[NORM_STATS_NAME])
    lie = scaled_stats(own, cfg.mean_factor, cfg.std_factor)
    score = setup.federation.calib_score  # what statistics (and so the probe values) measure
    subs[LIAR] = resign(exports[cfg.liar], work / "exports" / LIAR, key, lie, 1)
    liar_public = probe.scores(_tensors(subs[LIAR]))
    bound = bound_stats(liar_public, cfg.max_mean_z, cfg.max_sigma_ratio, score)
    subs[BOUND] = resign(exports[cfg.liar], work / "exports" / BOUND, key, bound, 2)
    admission = admit_all(cfg, subs, setup, probe, work)
    verdicts = admission["verdicts"]
    stats = {n: NormStatistics.from_json_bytes(f[NORM_STATS_NAME]) for n, f in subs.items()}
    folders = {d: exports[d] for d in cfg.honest}
    folders.update({LIAR: work / "exports" / LIAR, BOUND: work / "exports" / BOUND})
    scores, truth, names, eval_probe = route_scores(cfg, setup, folders, stats)
    honest = list(cfg.honest)
    checked = [n for n in [*honest, LIAR] if verdicts[n].admitted]
    scenarios = {
        "honest only": scenario(scores, truth, names, honest, cfg.honest),
        "liar, no checks": scenario(scores, truth, names, [*honest, LIAR], cfg.honest),
        "liar, with checks": scenario(scores, truth, names, checked, cfg.honest),
        "bound liar (largest accepted lie)": scenario(
            scores, truth, names, [*honest, BOUND], cfg.honest
        ),
    }
    # The sweep computes the bound liar's scores from its own; check it against RoutedModel.
    per_seq = eval_probe.sequence_means(eval_probe.scores(_tensors(subs[LIAR])))
    # Query statistics (seqr serve's default) ignore every claim: the liar's weights only.
    queried = [*honest, LIAR]
    raw = [eval_probe.sequence_means(eval_probe.scores(_tensors(subs[n]))) for n in queried]
    scenarios["liar, query statistics (any claim)"] = scenario(
        query_scores(raw), truth, queried, queried, cfg.honest
    )
    # Weights alone (docs/THREATS.md, routing hijack): a rank-1 B aimed at the public probe.
    crafted = crafted_b(probe.projections, probe.b_tensors, _tensors(subs[honest[0]]))
    raw_crafted = eval_probe.sequence_means(eval_probe.scores(crafted))
    with_crafted = [*honest, CRAFTED]
    scenarios["crafted rank-1 B, query statistics"] = scenario(
        query_scores([*raw[:-1], raw_crafted]), truth, with_crafted, with_crafted, cfg.honest
    )
    parity = float(np.abs(sequence_scores(per_seq, bound) - scores[:, names.index(BOUND)]).max())
    honest_best = scores[:, [names.index(d) for d in honest]].max(axis=1)
    sweep = bound_sweep(
        liar_public,
        per_seq,
        honest_best,
        {d: (stats[d], probe.scores(_tensors(subs[d]))) for d in honest},
    )
    result = {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
        "probe": {"tokens": probe.tokens, "text_sha256": probe.text_sha256},
        "verdicts": {
            n: {"status": v.status, "reason": v.reason, "message": v.message}
            for n, v in verdicts.items()
        },
        "unchecked_registry_entries": admission["unchecked_entries"],
        "scenarios": scenarios,
        "bound_sweep": sweep,
        "sweep_score_parity_max_abs": parity,
        "sequences": int(len(truth)),
    }
    cfg.out.mkdir(parents=True, exist_ok=True)
    (cfg.out / "hijack.json").write_text(json.dumps(result, indent=1, sort_keys=True))
    plot(scenarios, cfg.out / "hijack.png")
    return result


def _tensors(files: dict[str, bytes]) -> dict[str, np.ndarray]:
    from safetensors.numpy import load

    return load(files["adapter_model.safetensors"])


def main(argv: list[str] | None = None) -> int:
    d = HijackBenchConfig()
    p = argparse.ArgumentParser(
        prog="seqr bench hijack",
        description=__doc__.split("\n")[0],
        formatter_class=DefaultsHelpFormatter,
    )
    p.add_argument("--base-model", dest="model", default=d.model, help=BASE_MODEL_HELP)
    add_old_spelling(p, "--model", "model")
    p.add_argument("--data", type=Path, default=d.data, help="folder of domain subfolders")
    p.add_argument("--honest", nargs="+", default=list(d.honest), help="honest domains")
    p.add_argument("--liar", default=d.liar, help="domain the planted adapter trains on")
    helps: dict[str, tuple[type, str]] = {
        "max_files": (int, "text files read per domain (sorted)"),
        "steps": (int, "training steps per adapter"),
        "eval_sequences": (int, "held-out sequences per honest domain"),
        "calib_sequences": (int, "sequences each adapter calibrates its statistics on"),
        "seq_len": (int, "tokens per sequence"),
        "batch_size": (int, "sequences per training step"),
        "rank": (int, "LoRA rank"),
        "probe_tokens": (int, "tokens of the server's probe text"),
        "mean_factor": (float, "the lie: claimed mean = factor x honest mean"),
        "std_factor": (float, "the lie: claimed std = factor x honest std"),
        "lr": (float, "learning rate"),
        "max_mean_z": (float, "admission bound on the probe's mean z-score"),
        "max_sigma_ratio": (float, "admission bound on the probe's sigma ratio"),
    }
    for name, (kind, text) in helps.items():
        p.add_argument(
            "--" + name.replace("_", "-"), type=kind, default=getattr(d, name), help=text
        )
    p.add_argument(
        "--probe-text",
        default=d.probe_text,
        help="probe text file or folder (empty: the server's built-in probe)",
    )
    p.add_argument("--out", type=Path, default=d.out, help="folder for the results")
    args = vars(p.parse_args(argv))
    args["honest"] = tuple(args["honest"])
    try:
        cfg = replace(d, **args)
        result = run(cfg)
    except SeqrError as exc:
        print(f"seqr bench hijack: error: {exc}", file=sys.stderr)
        return 2
    print(table(result))
    print(f"\nwrote {cfg.out / 'hijack.json'} and {cfg.out / 'hijack.png'}")
    return 0
