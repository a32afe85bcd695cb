"""Query statistics the server measures on its own traffic, which no adapter author can steer.

SEQR z-scores with each adapter's own signed (mu, sigma) (arXiv 2509.18093); a submitter who
lies about them hijacks routing (docs/THREATS.md). Query statistics (model_routing.reference,
``per_sequence``) are instead the moments of each adapter's per-sequence score over unlabeled
inputs like the ones being routed: here, the prompts this server routed itself, with each
adapter's decision score standardised over the same pool (model_routing.reference). The pool
keeps, per routed prompt, only the (M, N) matrix of its per-module token-mean raw scores and
its (N,) soft token vote shares (never the text, never logged, never sent anywhere) and is:

- bounded: at most ``capacity`` prompts; a routed adapter's group holds at most
  ``max_share * capacity`` (its oldest go first), and when the pool is full the oldest prompt of
  the largest group goes;
- decaying: a prompt's weight halves every ``half_life`` later prompts, so the moments follow
  the traffic;
- not dominated by one domain: the groups' total weights are capped at ``max_share`` each
  (water-filling; equal shares when fewer than 1 / max_share groups exist), so a flood of one
  kind of prompt cannot shift every adapter's moments towards it.

Until the pool is warm (``warm_sequences`` prompts scored by an adapter, ``warm_adapters`` routed
adapters seen) the adapters' own statistics are used. Under query statistics each routed
prompt's soft token vote shares join its entry too (``aggregation="soft_vote"``; scoring.py);
once ``warm_sequences`` prompts have voted over the same adapters, the decision is each
adapter's vote share standardised with the same weights (the mean of z-scores until then).
A prompt's votes were taken under the statistics in use when it was routed, which the pool
refreshes as it goes: like every moment here, they follow the traffic.

After a registry update, adapters the pool has not yet scored often enough are *pending*:
scored on every prompt (which fills their column) but not chosen by ``auto`` until their
moments exist, so a new adapter never routes on statistics its author wrote. They take no
share of any token's vote; votes over another set of adapters do not count towards these
(``voted_over``), so soft votes start again from the mean when that set changes.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from seqr.consumer.serve.config import PoolConfig
from seqr.consumer.serve.scoring import Calibration
from seqr.core.errors import ShapeError
from seqr.core.model_routing.reference import decision_standardized
from seqr.core.model_routing.soft_votes import vote_statistics


@dataclass(frozen=True)
class _Entry:
    shas: tuple[str, ...]  # the adapters scored, by column
    modules: tuple[str, ...]
    routed: str  # sha of the adapter the prompt was routed to: its group
    scores: np.ndarray  # (M, N) float64 per-sequence raw scores
    serial: int  # insertion number; age = later insertions
    votes: np.ndarray | None = None  # (N,) soft token vote shares, or None
    voted_over: tuple[bool, ...] | None = None  # the adapters (routable mask) that could vote


def capped_shares(weights: np.ndarray, cap: float) -> np.ndarray:
    """Shares proportional to ``weights`` with none above ``cap`` (water-filling): groups over
    the cap are fixed at it and the rest is shared in proportion; equal shares if K cap <= 1."""
    k = len(weights)
    if k * cap <= 1 or weights.sum() <= 0:
        return np.full(k, 1.0 / k)
    shares = weights / weights.sum()
    fixed = np.zeros(k, dtype=bool)
    while True:
        over = (shares > cap) & ~fixed
        if not over.any():
            return shares
        fixed |= over
        rest = ~fixed
        shares[fixed] = cap
        shares[rest] = weights[rest] / weights[rest].sum() * (1.0 - cap * fixed.sum())


class QueryPool:
    """Per-sequence raw scores of served prompts (module docstring); one engine thread adds."""

    def __init__(self, config: PoolConfig) -> None:
        self.config = config
        self._groups: dict[str, deque[_Entry]] = {}
        self._serial = 0
        self._lock = threading.Lock()
        self._cache: dict[tuple[tuple[str, ...], tuple[str, ...]], tuple[int, Calibration]] = {}

    def __len__(self) -> int:
        return sum(len(g) for g in self._groups.values())

    def __repr__(self) -> str:  # never the scores: they describe served prompts
        return f"QueryPool({len(self)} prompts)"

    def votes_under(self, calibration: Calibration) -> Calibration | None:
        """The calibration a routing pass takes soft votes under (scoring.sequence_scores):
        query statistics only, so that no vote was cast under statistics an author wrote."""
        soft = self.config.aggregation == "soft_vote" and calibration.kind == "queries"
        return calibration if soft else None

    def add(
        self,
        shas: tuple[str, ...],
        modules: tuple[str, ...],
        routed: str,
        raw: torch.Tensor,
        votes: torch.Tensor | None = None,
        voted_over: torch.Tensor | None = None,
    ) -> None:
        """One routed prompt's (M, N) raw scores and, if taken, its (N,) soft token votes over
        the ``voted_over`` adapters (bool (N,)); non-finite scores or votes are dropped."""
        scores = raw.detach().to("cpu", torch.float64).numpy().copy()
        if scores.shape != (len(modules), len(shas)):
            raise ShapeError(f"pool scores {scores.shape} != ({len(modules)}, {len(shas)})")
        if not np.isfinite(scores).all():
            return
        shares, over = None, None
        if votes is not None and voted_over is not None:
            shares = votes.detach().to("cpu", torch.float64).numpy().copy()
            over = tuple(bool(v) for v in voted_over.tolist())
            if shares.shape != (len(shas),) or len(over) != len(shas):
                raise ShapeError(f"pool votes {shares.shape} != ({len(shas)},)")
            if not np.isfinite(shares).all():
                shares, over = None, None
        with self._lock:
            self._serial += 1
            group = self._groups.setdefault(routed, deque())
            group.append(_Entry(shas, modules, routed, scores, self._serial, shares, over))
            if len(group) > max(1, int(self.config.max_share * self.config.capacity)):
                group.popleft()
            if len(self) > self.config.capacity:
                max(self._groups.values(), key=len).popleft()

    def calibration(
        self,
        shas: tuple[str, ...],
        names: tuple[str, ...],
        modules: tuple[str, ...],
        own: Calibration,
    ) -> Calibration:
        """The statistics to route a version's adapters (``shas``, called ``names``) with now
        (module docstring)."""
        key = (shas, modules)
        with self._lock:
            cached = self._cache.get(key)
            if cached is not None and self._serial - cached[0] < self.config.refresh_every:
                return cached[1]
            serial = self._serial
            entries = [e for g in self._groups.values() for e in g if e.modules == modules]
        result = self._compute(entries, serial, shas, names, own)
        with self._lock:
            self._cache[key] = (serial, result)
            if len(self._cache) > 4:  # old versions' entries
                self._cache.pop(next(iter(self._cache)))
        return result

    def _compute(
        self,
        entries: list[_Entry],
        serial: int,
        shas: tuple[str, ...],
        names: tuple[str, ...],
        own: Calibration,
    ) -> Calibration:
        cfg = self.config
        groups = {e.routed for e in entries}
        if len(groups) < min(cfg.warm_adapters, len(shas)):
            return own
        mean, std = own.mean.clone(), own.std.clone()
        routable = torch.zeros(len(shas), dtype=torch.bool)
        for i, sha in enumerate(shas):
            rows = [(e, e.shas.index(sha)) for e in entries if sha in e.shas]
            if len(rows) < cfg.warm_sequences:
                continue
            values = np.stack([e.scores[:, col] for e, col in rows])  # (n, M)
            weights = self._weights([e for e, _ in rows], serial)
            mu = weights @ values  # (M,)
            var = weights @ (values - mu) ** 2
            floor = 1e-6 * np.abs(mu) + 1e-12  # a constant score must not divide by 0
            sigma = np.maximum(np.sqrt(var), floor)
            # One level up: this adapter's decision score (the module mean of its z-scores)
            # standardised over the same weighted pool (reference.decision_standardized).
            mu, sigma = decision_standardized(mu[:, None], sigma[:, None], values[..., None],
                                              weights)  # fmt: skip
            mean[:, i] = torch.from_numpy(mu[:, 0])
            std[:, i] = torch.from_numpy(sigma[:, 0])
            routable[i] = True
        if int(routable.sum()) < min(2, len(shas)):
            return own
        pending = tuple(n for n, ok in zip(names, routable.tolist(), strict=True) if not ok)
        votes = self._vote_statistics(entries, serial, shas, tuple(routable.tolist()))
        return Calibration("queries", mean, std, routable, len(entries), pending, votes)

    def _weights(self, entries: list[_Entry], serial: int) -> np.ndarray:
        """Each entry's weight in the moments (module docstring): halved every half_life
        later prompts, each routed group's total capped at max_share; sums to 1."""
        cfg = self.config
        decay = np.array([0.5 ** ((serial - e.serial) / cfg.half_life) for e in entries])
        labels = [e.routed for e in entries]
        order = sorted(set(labels))
        index = np.array([order.index(label) for label in labels])
        totals = np.bincount(index, weights=decay, minlength=len(order))
        shares = capped_shares(totals, cfg.max_share)
        return shares[index] * decay / totals[index]

    def _vote_statistics(
        self,
        entries: list[_Entry],
        serial: int,
        shas: tuple[str, ...],
        routable: tuple[bool, ...],
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Each adapter's (mean, std) vote share over the prompts that voted over these
        adapters, with the pool's weights; None until warm_sequences of them exist."""
        voted = [
            e for e in entries if e.votes is not None and (e.shas, e.voted_over) == (shas, routable)
        ]
        if self.config.aggregation != "soft_vote" or len(voted) < self.config.warm_sequences:
            return None
        values = np.stack([e.votes for e in voted if e.votes is not None])  # (n, N)
        weights = self._weights(voted, serial)
        return vote_statistics(torch.from_numpy(values), torch.from_numpy(weights))

    def snapshot(self) -> dict[str, Any]:
        """Counts only (for /metrics and the page): prompts held, routed groups."""
        with self._lock:
            return {"prompts": len(self), "groups": len(self._groups)}
