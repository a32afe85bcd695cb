"""The client side of `seqr simulate`: audit the published registry, then evaluate routing.

A client refuses a registry that fails its audit, so the audit (pinned to the root the
operator printed) comes first; the adapters evaluated are exactly the audited entries.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from seqr.core.errors import DataError
from seqr.sim.federation_run import FederationResult


def heldout_chunks(
    domains: list[Path], tokenizer: Any, fed: Any, count: int | None = None
) -> dict[str, np.ndarray]:
    """Each domain's first ``count`` held-out chunks (None: all), split exactly as its client
    split them."""
    return {d.name: first_chunks(d, tokenizer, fed, count, heldout=True) for d in domains}


def reference_chunks(
    data: Path, clients: list[Path], tokenizer: Any, fed: Any, per_domain: int = 16
) -> np.ndarray | None:
    """Public reference text: the first ``per_domain`` training chunks of every domain folder
    in --data that no client holds (split as a client would split that folder)."""
    held = {c.resolve() for c in clients}
    others = sorted(p for p in data.iterdir() if p.is_dir() and p.resolve() not in held
                    and not p.name.startswith("."))  # fmt: skip
    parts = [first_chunks(p, tokenizer, fed, per_domain, heldout=False) for p in others]
    return np.concatenate(parts) if parts else None


def first_chunks(
    folder: Path, tokenizer: Any, fed: Any, count: int | None, *, heldout: bool
) -> np.ndarray:
    """The folder's first ``count`` held-out (or training) chunks, tokenizing only as many
    files as needed (None: every file).

    Files are tokenized one by one and joined with EOS (seqr.core.textdata), so the chunks of
    the first k files are the first chunks of the whole folder, and whether a chunk is held out
    depends on its content only: the result equals load_text_data(folder).heldout[:count]
    (or .train[:count]).
    """
    from seqr.core.textdata import as_chunks, file_token_ids, heldout_mask, read_text_folder

    files = read_text_folder(folder)
    ids: list[int] = []
    for k, file_ids in enumerate(file_token_ids(files, tokenizer), start=1):
        ids.extend(file_ids)
        last = k == len(files)
        if not last and (count is None or len(ids) < fed.train_seq_len):
            continue
        # Every chunk of a prefix lies inside it (the tail shorter than a chunk is dropped).
        chunks = as_chunks(ids, fed.train_seq_len)
        mask = heldout_mask(chunks, fed.train_heldout_fraction, fed.data_seed)
        part = chunks[mask] if heldout else chunks[~mask]
        if last or (count is not None and len(part) >= count):
            if len(part) == 0 and not heldout:
                raise DataError(f"folder {folder.name} holds no training chunk: add text to it")
            return part[:count]
    raise DataError(f"folder {folder.name} holds no text file: add text to it")


def text_start(text: str, length: int = 160) -> str:
    """A chunk's first ``length`` characters on one line (whitespace runs become one space),
    to show in the report beside a routing mistake."""
    line = " ".join(text.split())
    return line if len(line) <= length else line[: length - 1] + "…"


def routing_timing(ns: tuple[int, ...], d_in: int, r: int) -> list[dict[str, Any]]:
    """Routing time against N at the real model's module shape (one LoRA module)."""
    from seqr.sim.bench_routing import RoutingBenchConfig, bench_point

    cfg = RoutingBenchConfig(ns=ns, d_ins=(d_in,), ranks=(r,), tokens=256, repeats=2)
    return [row for n in ns for row in bench_point(n, d_in, r, cfg)]


def evaluate_registry(
    cfg: Any,
    result: FederationResult,
    domains: list[Path],
    stage: Callable[[str, int], Callable[[int], None]] | None = None,
) -> dict[str, Any]:
    """Audit the registry as a client does, then evaluate its adapters on held-out text.

    Only admitted adapters are evaluated (a client that failed or was refused has none); at
    least two are needed to route. ``stage(name, total)`` is told each stage as it starts.
    """
    from seqr.core.base_model import load_base_model
    from seqr.registry.audit import AuditConfig, audit_registry
    from seqr.sim.evaluate import EvalConfig, evaluate
    from seqr.sim.library import exports_from_audit, load_library, lora_shape

    def begin(name: str, total: int = 0) -> Callable[[int], None]:
        return stage(name, total) if stage is not None else (lambda done: None)

    fed = result.federation
    begin("audit the published registry")
    verified = audit_registry(
        result.registry,
        result.work / "trusted_state",
        config=AuditConfig(expected_root_sha256=result.root_sha256),
    )
    report = verified.report
    exports = exports_from_audit(verified, result.work / "adapters")  # named after the domains
    not_admitted = sorted({d.name for d in domains} - set(exports))
    if len(exports) < 2:
        raise DataError(
            f"only {len(exports)} of {len(domains)} clients were admitted ({sorted(exports)}); "
            f"routing needs at least 2. Not admitted: {', '.join(not_admitted)} (see the "
            "client lines above and status.json for each reason)"
        )
    begin("load the base model and the admitted adapters")
    base = load_base_model(fed.base_model, expected_sha256=fed.base_model_sha256)
    heldout = heldout_chunks([d for d in domains if d.name in exports], base.tokenizer, fed,
                             cfg.eval_sequences_per_domain)  # fmt: skip
    library = load_library(base.model, exports)
    evaluation = evaluate(
        library,
        heldout,
        EvalConfig(
            max_sequences_per_domain=cfg.eval_sequences_per_domain,
            per_token_losses=cfg.per_token_losses,
            merge_baseline=cfg.merge_baseline,
            scores_path=cfg.out / "scores.npz" if cfg.dump_scores else None,
        ),
        make_base=lambda: load_base_model(fed.base_model).model,
        export_paths=[str(p) for p in exports.values()],
        reference=reference_chunks(
            cfg.data, domains, base.tokenizer, fed, cfg.reference_chunks_per_domain
        ),
        stage=lambda name, total: begin(name, total),
    )
    for wrong in evaluation["misrouted"]:
        ids = heldout[wrong["domain"]][wrong["chunk"]]
        wrong["text"] = text_start(base.tokenizer.decode(ids.tolist()))
    r, d_in = lora_shape(library)
    begin("routing time against the number of adapters")
    timing = routing_timing(cfg.timing_ns, d_in, r)
    return {
        "evaluation": evaluation,
        "audit": {
            "version": report.version,
            "entries": len(report.entries),
            "tree_size": report.tree_size,
            "seconds": report.seconds,
        },  # fmt: skip
        "not_admitted": not_admitted,
        "timing_rows": timing,
    }
