"""`seqr bench training`: this client's LoRA-FA training speed next to a plain peft loop.

Both loops run in one process on the same base model (two copies), the same batches in the
same order and the same LoRA shape, and their steps are INTERLEAVED: after each step of ours
(seqr.node.train.train_adapter, the real client code path, via its on_step hook) one step of the
plain loop runs. Machines here are shared and noisy; interleaving makes any slowdown hit both
alike. The plain loop is the textbook peft loop: get_peft_model, AdamW over every trainable
tensor (A and B), ``model(input_ids, labels)``, backward, step. Ours trains only B (A frozen,
shared) and clips gradients. Reported: tokens/s of each over the steps after warm-up, by wall
time and by process CPU time, their ratio (target: ours >= plain), and the fp32 adapter size.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import sysconfig
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from seqr.cli.help import BASE_MODEL_HELP, CACHE_DIR_HELP, DefaultsHelpFormatter, add_old_spelling
from seqr.core.errors import ConfigError, SeqrError
from seqr.core.federation import DEFAULT_BASE_MODEL, FederationConfig

STDLIB_FILES = ("textwrap.py", "string.py", "bisect.py", "heapq.py", "colorsys.py", "shlex.py")


@dataclass(frozen=True)
class TrainingBenchConfig:
    model: str = DEFAULT_BASE_MODEL
    data: Path | None = None  # default: a few Python stdlib sources
    steps: int = 8  # per loop, warm-up included
    warmup: int = 2  # steps not timed
    batch_size: int = 8
    seq_len: int = 128
    threads: int = 0  # torch threads; 0 = torch's default
    cache_dir: Path | None = None

    def __post_init__(self) -> None:
        for key in ("steps", "batch_size", "seq_len"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key} must be >= 1, got {getattr(self, key)}")
        if self.threads < 0:
            raise ConfigError(f"threads must be >= 0, got {self.threads}")
        if not 0 <= self.warmup < self.steps:
            raise ConfigError(f"warmup must be in [0, steps), got {self.warmup} of {self.steps}")


class _Clock:
    """Wall and CPU time of alternating intervals, labelled by who ran them."""

    def __init__(self) -> None:
        self.times: dict[str, list[tuple[float, float]]] = {"ours": [], "plain": []}
        self.mark = (time.perf_counter(), time.process_time())

    def lap(self, who: str) -> None:
        now = (time.perf_counter(), time.process_time())
        self.times[who].append((now[0] - self.mark[0], now[1] - self.mark[1]))
        self.mark = now

    def rate(self, who: str, warmup: int, tokens_per_step: int) -> tuple[float, float]:
        timed = self.times[who][warmup:]
        wall, cpu = sum(t[0] for t in timed), sum(t[1] for t in timed)
        return len(timed) * tokens_per_step / wall, len(timed) * tokens_per_step / cpu


def _plain_loop(cfg: TrainingBenchConfig, fed: FederationConfig, chunks: Any) -> Any:
    """The textbook peft loop, one step per call."""
    import torch
    from peft import LoraConfig, get_peft_model

    from seqr.core.base_model import load_base_model
    from seqr.node.train import batch_indices

    base = load_base_model(cfg.model, cache_dir=cfg.cache_dir)
    lora = LoraConfig(
        r=fed.lora_rank,
        lora_alpha=fed.lora_alpha,
        lora_dropout=0.0,
        target_modules=list(fed.lora_target_modules),
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(base.model, lora)
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=fed.train_lr
    )
    model.train()

    def step(index: int) -> None:
        idx = batch_indices(index, len(chunks), cfg.batch_size, fed.data_seed)
        batch = torch.from_numpy(chunks[idx])
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    return step


def run(cfg: TrainingBenchConfig) -> dict[str, Any]:
    """Measure both loops, interleaved; return the numbers that main() prints."""
    import numpy as np
    import torch

    from seqr.core.base_model import load_base_model
    from seqr.core.textdata import load_text_data
    from seqr.node.train import make_lora_model, train_adapter

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    fed = FederationConfig(
        base_model=cfg.model,
        train_steps=cfg.steps,
        train_batch_size=cfg.batch_size,
        train_seq_len=cfg.seq_len,
    )
    with tempfile.TemporaryDirectory(prefix="seqr-bench-") as tmp:
        data = cfg.data
        if data is None:
            data = Path(tmp) / "stdlib"
            data.mkdir()
            for name in STDLIB_FILES:
                shutil.copyfile(Path(sysconfig.get_paths()["stdlib"]) / name, data / name)
        base = load_base_model(cfg.model, cache_dir=cfg.cache_dir)
        chunks = load_text_data(
            data, base.tokenizer, seq_len=cfg.seq_len, heldout_fraction=0.0, seed=0
        ).train
        plain_step = _plain_loop(cfg, fed, chunks)
        model, a_sha = make_lora_model(base.model, fed)
        clock = _Clock()

        def interleave(step: int, loss: float) -> None:
            clock.lap("ours")
            plain_step(step)
            clock.lap("plain")

        train_adapter(model, chunks, fed, a_sha256=a_sha, progress=True, on_step=interleave)
        adapter = Path(tmp) / "adapter"
        model.save_pretrained(adapter, safe_serialization=True, save_embedding_layers=False)
        adapter_bytes = (adapter / "adapter_model.safetensors").stat().st_size
    per_step = cfg.batch_size * cfg.seq_len
    paired = list(zip(clock.times["ours"], clock.times["plain"], strict=True))[cfg.warmup :]
    ours_wall, ours_cpu = clock.rate("ours", cfg.warmup, per_step)
    plain_wall, plain_cpu = clock.rate("plain", cfg.warmup, per_step)
    return {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
        "torch_threads": torch.get_num_threads(),
        "chunks": len(chunks),
        "tokens_per_second_wall": {"ours": ours_wall, "plain_peft": plain_wall},
        "tokens_per_cpu_second": {"ours": ours_cpu, "plain_peft": plain_cpu},
        "step_seconds_wall": {k: [round(t[0], 4) for t in v] for k, v in clock.times.items()},
        "ratio_ours_over_plain": ours_wall / plain_wall,
        # Robust to load spikes: each ours step against the plain step right after it.
        "median_paired_ratio": float(np.median([p[0] / o[0] for o, p in paired])),
        "ratio_ours_over_plain_cpu": ours_cpu / plain_cpu,
        "target_met": ours_wall >= plain_wall,
        "adapter_fp32_bytes": adapter_bytes,
        "adapter_fp32_mb": adapter_bytes / 1e6,
    }


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="seqr bench training", description=__doc__, formatter_class=DefaultsHelpFormatter
    )
    defaults = TrainingBenchConfig()
    parser.add_argument("--base-model", dest="model", default=defaults.model, help=BASE_MODEL_HELP)
    add_old_spelling(parser, "--model", "model")
    parser.add_argument("--data", type=Path, help="text folder (default: some stdlib sources)")
    helps = {
        "steps": "training steps per loop, warm-up included",
        "warmup": "steps at the start that are not timed",
        "batch_size": "sequences per step",
        "seq_len": "tokens per sequence",
        "threads": "torch threads (0: torch's default)",
    }
    for key, text in helps.items():
        flag = "--" + key.replace("_", "-")
        parser.add_argument(flag, type=int, default=getattr(defaults, key), help=text)
    parser.add_argument("--cache-dir", type=Path, help=CACHE_DIR_HELP)
    parser.add_argument(
        "--out", type=Path, metavar="FILE", help="also write the results to this JSON file"
    )
    args = parser.parse_args(argv)
    try:
        cfg = TrainingBenchConfig(
            model=args.model,
            data=args.data,
            steps=args.steps,
            warmup=args.warmup,
            batch_size=args.batch_size,
            seq_len=args.seq_len,
            threads=args.threads,
            cache_dir=args.cache_dir,
        )
        result = run(cfg)
    except SeqrError as exc:
        print(f"seqr bench training: error: {exc}", file=sys.stderr)
        return 2
    wall, cpu = result["tokens_per_second_wall"], result["tokens_per_cpu_second"]
    print(
        f"model {cfg.model}, batch {cfg.batch_size} x {cfg.seq_len} tokens, "
        f"{cfg.steps - cfg.warmup} timed steps each (interleaved), "
        f"{result['torch_threads']} torch threads"
    )
    print(f"{'':26}{'tokens/s':>10}{'tokens/CPU-s':>14}")
    print(f"  ours (LoRA-FA, B only)  {wall['ours']:10.1f}{cpu['ours']:14.1f}")
    print(f"  plain peft loop (A + B) {wall['plain_peft']:10.1f}{cpu['plain_peft']:14.1f}")
    verdict = "met" if result["target_met"] else "NOT met"
    print(
        f"  ratio ours / plain      {result['ratio_ours_over_plain']:10.3f}"
        f"{result['ratio_ours_over_plain_cpu']:14.3f}   (target >= 1 by wall time: {verdict})"
    )
    print(f"  median paired step ratio {result['median_paired_ratio']:9.3f}   (plain / ours time)")
    fed_default = FederationConfig()
    shape = f"r={fed_default.lora_rank} on {','.join(fed_default.lora_target_modules)}"
    print(f"  fp32 adapter file       {result['adapter_fp32_mb']:10.3f} MB ({shape})")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
    return 0
