"""`seqr simulate scale`: many clients at once (tiny model, small data), timed and measured.

Each client holds a few different Python stdlib modules as its private "domain". The run is
the same `seqr simulate` path (real SuperLink, `flwr run`, admission, registry, audit,
evaluation); the report adds wall time and peak memory per client process.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from seqr.cli.help import DefaultsHelpFormatter
from seqr.core.errors import DataError
from seqr.sim.tiny_world import STDLIB, build_tiny_llama


def stdlib_domains(dest: Path, clients: int, files_per_client: int = 2) -> Path:
    """``clients`` folders, each with its own stdlib modules (sorted, so runs are repeatable)."""
    skip = {"site-packages", "test", "tests", "idle_test", "__pycache__"}
    sources = sorted(
        p
        for p in STDLIB.rglob("*.py")
        if 4_000 < p.stat().st_size < 200_000 and not skip & set(p.relative_to(STDLIB).parts)
    )
    need = clients * files_per_client
    if len(sources) < need:
        raise DataError(
            f"this Python has {len(sources)} suitable stdlib files, enough for "
            f"{len(sources) // files_per_client} clients; ask for fewer with --clients"
        )
    for i in range(clients):
        folder = dest / f"client_{i:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        for src in sources[i * files_per_client : (i + 1) * files_per_client]:
            shutil.copyfile(src, folder / "_".join(src.relative_to(STDLIB).parts))
    return dest


def main(argv: list[str] | None = None) -> int:
    from seqr.core.errors import SeqrError
    from seqr.sim.simulate import SimulateConfig, positive_int, run

    parser = argparse.ArgumentParser(
        prog="seqr simulate scale", description=__doc__, formatter_class=DefaultsHelpFormatter
    )
    # Routing needs 2 adapters; the stdlib has a few hundred suitable files (2 per client).
    parser.add_argument(
        "--clients", type=positive_int(2, 1000), default=100, help="simulated clients"
    )
    parser.add_argument("--out", type=Path, default=Path("runs/scale"), help="run folder")
    parser.add_argument(
        "--steps", type=positive_int(1, 10_000), default=2, help="training steps per client"
    )
    args = parser.parse_args(argv)
    if args.out.exists():
        print(f"seqr simulate scale: {args.out} exists; choose a new --out", file=sys.stderr)
        return 2
    start = time.perf_counter()
    try:
        data = stdlib_domains(args.out / "data", args.clients)
        model = build_tiny_llama(args.out / "tiny-llama")
        cfg = SimulateConfig(
            data=data,
            out=args.out / "run",
            domains=tuple(sorted(p.name for p in data.iterdir())),
            base_model=str(model),
            train_steps=args.steps,
            train_seq_len=32,
            train_batch_size=4,
            eval_sequences_per_domain=4,
            timing_ns=(4, 16, 64),
        )
        report = run(cfg)
    except SeqrError as exc:
        print(f"seqr simulate scale: {exc}", file=sys.stderr)
        return 2
    summary = {
        "clients": args.clients,
        "admitted": report["audit"]["entries"],
        "wall_seconds": round(time.perf_counter() - start, 1),
        **{k: v for k, v in report["run"].items() if k.startswith(("peak_", "federation_"))},
    }
    (args.out / "scale.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    return 0
