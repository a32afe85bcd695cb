"""The server's plausibility probe: each adapter's own norms on PUBLIC probe text.

SEQR routes by z = (||B A x|| - mu) / sigma (arXiv 2509.18093); mu and sigma come from the
client's private data, so a liar can claim a small mu and a tiny sigma and win inputs that are
not its own (routing hijack, docs/THREATS.md). A is shared and B is submitted, so the server can
recompute the adapter's norms on public text and bound what it may claim
(seqr.core.stats_plausibility.check_stats_plausible).

Convention (as seqr/node/calibrate.py and seqr.core.model_routing): for every LoRA module, x is
that module's input while the BASE model runs (adapters off), and the score is
||lora_B.weight @ lora_A.weight @ x||_2 per token (or its gain, per unit ||A x||), without
peft's alpha / r scaling, at the tokens the token rule counts: one measurement,
seqr.core.measurement, so the probe gives the numbers a node's calibration would give on the
same text.

Cost: the base model runs ONCE over the probe text when the probe is built; hooks keep only
h = A x per module and measured token (SEQR's projection, r numbers instead of d_in), so
checking an adapter is one (T, r(r+1)/2) x (r(r+1)/2, 1) product per module. Admission has
already checked that the adapter's lora_A equals the shared A bit for bit
(``AdmissionPolicy.expected_a``), which makes ||B h|| exactly its ||B A x||.
"""

from __future__ import annotations

import hashlib
import logging
import sysconfig
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import torch

from seqr.core.admission import AdmittedAdapter, check_stats_plausible
from seqr.core.errors import AdmissionError, DataError, ShapeError, ValueCheckError
from seqr.core.measurement import adapter_router, measured_tokens, project, token_scores
from seqr.core.stats import NormStatistics, ScoreKind
from seqr.core.textdata import TextFile, read_text_file, read_text_folder, tokenize_chunks
from seqr.operator.federation_setup import FederationSetup

__all__ = ["Probe", "load_probe_texts", "probe_chunks", "BUILTIN_PROBE_FILES"]

log = logging.getLogger("seqr.server.probe")

# Default public probe text: CPython standard-library sources (code, docstrings, comments in
# English prose), present on every Python install. Pass probe-text for a corpus closer to
# the federation's domains.
BUILTIN_PROBE_FILES = (
    "argparse.py", "calendar.py", "difflib.py", "fractions.py", "gettext.py", "shlex.py",
    "statistics.py", "textwrap.py", "this.py", "turtle.py", "wave.py", "zipfile.py",
)  # fmt: skip


def load_probe_texts(spec: str) -> list[TextFile]:
    """The probe text: ``""`` for the built-in sources, else a text file or a folder."""
    if not spec:
        stdlib = Path(sysconfig.get_paths()["stdlib"])
        paths = [stdlib / name for name in BUILTIN_PROBE_FILES if (stdlib / name).is_file()]
        if not paths:
            raise DataError(f"no built-in probe file found in {stdlib}; set probe-text")
        return [TextFile(Path(p.name), p.read_text(encoding="utf-8")) for p in paths]
    path = Path(spec).expanduser()
    if path.is_dir():
        return read_text_folder(path)
    try:  # the same careful read as data folders (no FIFO, device or symlink opened)
        return [read_text_file(path)]
    except DataError as exc:
        raise DataError(f"cannot read probe text {path}: {exc}") from None


def probe_chunks(
    texts: Sequence[TextFile], tokenizer: Any, seq_len: int, max_tokens: int
) -> np.ndarray:
    """(N, seq_len) token chunks, evenly spaced over the text so every file contributes."""
    chunks = tokenize_chunks(texts, tokenizer, seq_len)
    n = max(1, min(len(chunks), max_tokens // seq_len))
    picked = chunks[np.unique(np.linspace(0, len(chunks) - 1, n).round().astype(np.int64))]
    if picked.size < 2:
        raise DataError(f"the probe text gives {picked.size} token(s); it needs at least 2")
    return picked


@dataclass(frozen=True)
class Probe:
    """Cached projections h = A x of the measured probe tokens, per LoRA module."""

    projections: Mapping[str, torch.Tensor]  # module -> (T_m, r) float32, measured tokens only
    sequences: Mapping[str, np.ndarray]  # module -> (T_m,) int64: the probe chunk of each token
    b_tensors: Mapping[str, str]  # module -> its lora_B tensor name in adapter_model
    score: ScoreKind  # what it measures: the federation's calib_score ("gain" or "norm")
    chunks: int  # probe sequences (N)
    tokens: int  # tokens read, N x L; the token rule measures a few fewer per module
    text_sha256: str  # names the exact probe token chunks (report it to clients)

    @classmethod
    def build(
        cls,
        model: Any,
        tokenizer: Any,
        texts: Sequence[TextFile],
        setup: FederationSetup,
        *,
        max_tokens: int = 4096,
        batch_size: int = 8,
    ) -> Probe:
        """Run the base model once over the probe text and keep h = A x for every module."""
        picked = probe_chunks(texts, tokenizer, setup.federation.train_seq_len, max_tokens)
        return cls.from_chunks(model, picked, setup, batch_size=batch_size)

    @classmethod
    def from_chunks(
        cls, model: Any, picked: np.ndarray, setup: FederationSetup, *, batch_size: int = 8
    ) -> Probe:
        """The same over given (N, L) token chunks: exactly what a node's calibration would
        measure on them (seqr.node.calibrate), token for token, in row-major order."""
        digest = hashlib.sha256(picked.astype("<i8").tobytes()).hexdigest()
        score = setup.federation.calib_score
        layers = dict(model.named_modules())
        parts: dict[str, list[torch.Tensor]] = {m.name: [] for m in setup.modules}
        rows: dict[str, list[torch.Tensor]] = {m.name: [] for m in setup.modules}
        a = {m.name: torch.from_numpy(np.array(setup.shared_a[m.name])) for m in setup.modules}
        done = [0]  # chunks before the current batch

        def hook_for(name: str) -> Any:
            def hook(module: Any, args: tuple[Any, ...], output: Any) -> None:
                x = args[0].detach()  # (batch, L, d_in)
                h = project(x, a[name])
                keep = measured_tokens(x, h, None, score)  # the token rule, as calibration
                parts[name].append(h[keep])
                index = torch.arange(x.shape[0]).unsqueeze(1).expand(keep.shape)
                rows[name].append(index[keep] + done[0])

            return hook

        handles = [layers[m.name].register_forward_hook(hook_for(m.name)) for m in setup.modules]
        # Only module inputs matter: run the decoder stack, not the LM head (as calibrate.py).
        runner = model.get_decoder() if hasattr(model, "get_decoder") else model
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                for i in range(0, len(picked), batch_size):
                    batch = torch.from_numpy(picked[i : i + batch_size])
                    done[0] = i
                    runner(input_ids=batch, use_cache=False)
        finally:
            for handle in handles:
                handle.remove()
            model.train(was_training)
        log.info("probe: %d tokens x %d modules (text %s)", picked.size, len(parts), digest[:16])
        return cls(
            projections=MappingProxyType({n: torch.cat(p) for n, p in parts.items()}),
            sequences=MappingProxyType({n: torch.cat(r).numpy() for n, r in rows.items()}),
            b_tensors=MappingProxyType({m.name: m.b_tensor for m in setup.modules}),
            score=score,
            chunks=int(len(picked)),
            tokens=int(picked.size),
            text_sha256=digest,
        )

    def scores(self, tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """module -> (T_m,) values of one adapter at the measured probe tokens: norms ||B A x||
        or gains (``self.score``, the kind its statistics must claim).

        Measured as calibration and routers measure them (seqr.core.measurement): in float32,
        through SeqrRouter's own Gram-matrix scoring on the cached h = A x, so a B whose B^T B
        or scores overflow in float32 shows here, at admission, as AdmissionError("non_finite")."""
        out = {}
        for module, h in self.projections.items():
            name = self.b_tensors[module]
            if name not in tensors:
                raise ShapeError(f"adapter has no tensor {name!r} (module {module})")
            b = torch.from_numpy(np.asarray(tensors[name], dtype=np.float32))  # (d_out, r)
            if b.ndim != 2 or b.shape[1] != h.shape[1]:
                raise ShapeError(
                    f"{name} has shape {tuple(b.shape)}; expected (d_out, {h.shape[1]})"
                )
            try:
                values = token_scores(adapter_router(b), h, self.score)[:, 0]
            except ValueCheckError:  # B itself not finite (admission checks it first)
                values = torch.full((h.shape[0],), float("nan"))
            if not torch.isfinite(values).all():
                raise AdmissionError(
                    "non_finite",
                    f"the adapter's scores on the probe text overflow float32, the dtype "
                    f"routers compute in (module {module}, tensor {name}); its B is too large",
                )
            out[module] = values.double().numpy()
        return out

    def sequence_means(self, values: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """module -> (N,) each probe chunk's mean over its measured tokens (what a
        per-sequence router averages)."""
        out = {}
        for module, v in values.items():
            rows = self.sequences[module]
            counts = np.bincount(rows, minlength=self.chunks)
            out[module] = np.bincount(rows, weights=v, minlength=self.chunks) / counts
        return out

    def check(self, adapter: AdmittedAdapter, **bounds: float) -> None:
        """AdmissionError("implausible_stats", ...) when the claimed statistics would hijack
        routing, or ("non_finite", ...) when the adapter cannot be scored in float32;
        ``bounds`` are check_stats_plausible's (AdmissionPolicy.plausibility)."""
        self.check_claim(adapter.stats, adapter.tensors, **bounds)

    def check_claim(
        self, stats: NormStatistics, tensors: Mapping[str, np.ndarray], **bounds: float
    ) -> None:
        """The same for statistics and B tensors not (yet) in an export: a task group's
        merged statistics and averaged B (seqr.operator.group_loop)."""
        if stats.score != self.score:  # admission refuses it first (stats_score)
            raise AdmissionError(
                "bad_stats",
                f"the statistics measure {stats.score!r} but this federation's probe "
                f"measures {self.score!r} (calib-score); recalibrate with calib-score "
                f"{self.score!r}",
            )
        values = self.scores(tensors)
        try:
            check_stats_plausible(stats, values, **bounds)
        except ValueCheckError as exc:
            # The probe text varies, so values that do not vary mean B is (nearly) zero on a
            # module: then no positive mean the client claims can be its own.
            raise AdmissionError(
                "implausible_stats",
                f"the adapter's probe values cannot support its statistics: {exc}",
            ) from None
