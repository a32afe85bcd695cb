"""ARROW (Ostapenko et al., ICML 2024): abs(v_i . x) with v_i the top right singular vector.

A proxy for the norm: cheap (d_in per adapter and token) but not exact; the SEQR paper
gives inputs on which it picks a different adapter than the norm maximiser.
"""

from __future__ import annotations

import torch

from seqr.core.routing.base import Factors, Router
from seqr.core.routing.spectr import top_right_singular


class ArrowRouter(Router):
    """ArrowRouter(A, B, *, mean=None, std=None): A (r, d_in) or (N, r, d_in)."""

    method = "arrow"

    def _factorize(self, A: torch.Tensor, B: torch.Tensor) -> Factors:
        _, V = top_right_singular(A, B)  # singular values come sorted, largest first
        return {"prototype": V[:, :, 0].to(self.compute_dtype)}  # (N, d_in)

    def _norms(self, X: torch.Tensor) -> torch.Tensor:
        return (X @ self._factors["prototype"].T).abs_()
