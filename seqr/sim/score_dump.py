"""The shared pass's per-sequence scores as one file (`seqr simulate --dump-scores`).

A routing variant (another calibration, module weights, a layer subset) changes only how
these scores are z-scored and combined, so it can be tried offline on the very numbers a
report came from, in seconds, instead of a new evaluation (docs/RESULTS.md lists variants
scored this way). Soft token votes are not a function of these means; their vote shares under
the query statistics are kept as they are (``votes``), and the loss check's losses
(``check_losses``), so the default's decisions are too.
``scores.npz`` holds plain numeric and fixed-width string arrays only:
``np.load(..., allow_pickle=False)`` reads it, so no bytes are ever unpickled.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from seqr.core.atomic_write import write_atomic
from seqr.core.errors import DataError
from seqr.core.model_routing.loss_check import checked_choice, shortlist
from seqr.core.model_routing.soft_votes import vote_statistics
from seqr.sim.eval_scores import HeldOutScores

# Raw per-sequence module scores kept: SEQR's (in the calibration's kind, to be z-scored by
# any of the calibrations) and both ARROWs' (the baseline a variant must beat).
DUMPED_METHODS = ("seqr", "arrow", "peft_arrow")
_ROW_ARRAYS = ("labels", "is_test", "chunks")


@dataclass(frozen=True)
class ScoreDump:
    """Rows are the held-out sequences, validation first, then test (evaluate's order)."""

    adapters: tuple[str, ...]
    module_names: tuple[str, ...]
    module_layers: np.ndarray  # (M,) decoder layer of each module, -1 where it has none
    labels: np.ndarray  # (S,) index of each row's true domain's adapter
    is_test: np.ndarray  # (S,) bool; the rest is validation
    chunks: np.ndarray  # (S,) each row's index among its domain's held-out chunks
    raw: dict[str, np.ndarray]  # method -> (S, M, N) token-mean raw score of each module
    calibrations: dict[str, tuple[np.ndarray, np.ndarray]]  # label -> (mean, std), (M, N)
    votes: np.ndarray | None = None  # (S, N) soft token vote shares (seqr_soft_votes)
    # (S, 2) each row's loss under its first and second adapter where the loss check ran
    # (seqr_loss_checked), NaN elsewhere
    check_losses: np.ndarray | None = None

    def module_scores(self, method: str) -> np.ndarray:
        """(S, M, N) what ``method`` decides on: a calibration label ("seqr", "seqr_queries",
        ...) z-scores SEQR's raw scores with its statistics; "arrow" / "peft_arrow" use their
        own."""
        if method in self.calibrations:
            mean, std = self.calibrations[method]
            return (self.raw["seqr"].astype(np.float64) - mean) / std
        if method in self.raw:
            return self.raw[method]
        known = sorted({*self.calibrations, *self.raw})
        raise DataError(f"no scores for method {method!r} in this dump; have {known}")

    def decisions(self, method: str) -> np.ndarray:
        """(S,) adapter each row is routed to: all layers, the mean over modules, as the
        report's methods decide; soft votes standardised over the validation rows."""
        from seqr.sim.evaluate import LOSS_CHECKED, SOFT_VOTES, decide  # the report's rules

        if method in (SOFT_VOTES, LOSS_CHECKED):
            kept = self.votes if method == SOFT_VOTES else self.check_losses
            if self.votes is None or kept is None:
                raise DataError(
                    f"this dump has no {'soft token votes' if self.votes is None else 'loss check'}"
                    " (written before they were kept): write it again with --evaluate-only "
                    "--dump-scores"
                )
            votes = torch.from_numpy(self.votes)
            mean, std = vote_statistics(votes[~torch.from_numpy(self.is_test)])
            standardised = (votes - mean) / std
            if method == SOFT_VOTES:
                return standardised.argmax(dim=-1).numpy()
            losses = torch.from_numpy(self.check_losses)
            short = shortlist(standardised)
            return checked_choice(short, losses[:, 0], losses[:, 1]).numpy()
        scores = torch.from_numpy(self.module_scores(method))
        return decide(scores, torch.ones(scores.shape[1], dtype=torch.bool)).numpy()

    def accuracy(self, method: str, *, test: bool = True) -> float:
        rows = self.is_test if test else ~self.is_test
        return float((self.decisions(method)[rows] == self.labels[rows]).mean())


def save_scores(
    path: Path,
    scores: HeldOutScores,
    adapters: tuple[str, ...],
    labels: torch.Tensor,
    is_test: torch.Tensor,
    chunks: torch.Tensor,
    votes: torch.Tensor | None = None,
    check_losses: torch.Tensor | None = None,
) -> None:
    """Write the dump atomically (a reader sees the old file or the whole new one)."""
    arrays: dict[str, np.ndarray] = {
        "adapters": np.array(adapters, dtype=str),
        "module_names": np.array(scores.module_names, dtype=str),
        "module_layers": np.array([-1 if i is None else i for i in scores.module_layers]),
        "labels": labels.numpy(),
        "is_test": is_test.numpy(),
        "chunks": chunks.numpy(),
    }
    for method in DUMPED_METHODS:
        if method in scores.module_means:
            arrays[f"raw.{method}"] = scores.module_means[method].numpy()
    for label, calibration in scores.calibrations.items():
        arrays[f"mean.{label}"] = calibration.mean.numpy()
        arrays[f"std.{label}"] = calibration.std.numpy()
    if votes is not None:
        arrays["votes"] = votes.numpy()
    if check_losses is not None:
        arrays["check_losses"] = check_losses.numpy()
    buffer = io.BytesIO()
    np.savez(buffer, allow_pickle=False, **arrays)
    write_atomic(path, buffer.getvalue())


def load_scores(path: Path) -> ScoreDump:
    """Read a dump written by save_scores; DataError says what is missing or inconsistent."""
    not_a_dump = f"{path} is not a score dump of `seqr simulate --dump-scores`"
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):  # one .npy array, not a dump
            raise DataError(f"{not_a_dump} (it holds one array)")
        with loaded as npz:
            arrays = {key: npz[key] for key in npz.files}
    except (OSError, ValueError) as exc:
        raise DataError(f"{not_a_dump} ({exc})") from None
    missing = [k for k in ("adapters", "module_names", "module_layers", *_ROW_ARRAYS,
                           "raw.seqr", "mean.seqr", "std.seqr") if k not in arrays]  # fmt: skip
    if missing:
        raise DataError(f"{path} lacks {missing}: write it again with --dump-scores")
    dump = ScoreDump(
        adapters=tuple(str(a) for a in arrays["adapters"]),
        module_names=tuple(str(m) for m in arrays["module_names"]),
        module_layers=arrays["module_layers"],
        labels=arrays["labels"],
        is_test=arrays["is_test"].astype(bool),
        chunks=arrays["chunks"],
        raw={k.removeprefix("raw."): v for k, v in arrays.items() if k.startswith("raw.")},
        calibrations={
            label: (arrays[f"mean.{label}"], arrays[f"std.{label}"])
            for label in (k.removeprefix("mean.") for k in arrays if k.startswith("mean."))
            if f"std.{label}" in arrays
        },
        votes=arrays.get("votes"),
        check_losses=arrays.get("check_losses"),
    )
    shape = (len(dump.labels), len(dump.module_names), len(dump.adapters))
    wrong = [k for k in _ROW_ARRAYS if getattr(dump, k).shape != shape[:1]]
    wrong += [f"raw.{k}" for k, v in dump.raw.items() if v.shape != shape]
    wrong += [f"mean/std.{k}" for k, (m, s) in dump.calibrations.items()
              if m.shape != shape[1:] or s.shape != shape[1:]]  # fmt: skip
    if dump.votes is not None and dump.votes.shape != (shape[0], shape[2]):
        wrong.append("votes")
    if dump.check_losses is not None and dump.check_losses.shape != (shape[0], 2):
        wrong.append("check_losses")
    if wrong:
        raise DataError(f"{path}: {wrong} do not match {shape} (rows, modules, adapters)")
    return dump
