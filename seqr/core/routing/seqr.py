"""SEQR: exact norm-maximising routing through the QR factors of each B_i.

Fleshman & Van Durme, "SEQR: Secure and Efficient QR-based LoRA Routing" (arXiv 2509.18093):
all adapters share one frozen A, and with B_i = Q_i R_i (R_i is r x r),
||B_i A x|| = ||Q_i R_i A x|| = ||R_i h|| with h = A x computed once for all adapters.

Which product we really need: only the squared norm, ||R_i h||^2 = h^T G_i h with
G_i = R_i^T R_i. That is one inner product between the r(r+1)/2 distinct monomials
h_j h_k (j <= k) and G_i's upper triangle (off-diagonal doubled), so routing T tokens over
N adapters is a single (T, r(r+1)/2) x (r(r+1)/2, N) GEMM: no (T, N, r) intermediate and
an inner dimension large enough for the BLAS to run near its peak, where the naive
(T, r) x (r, N r) product is bound by writing its large output.
"""

from __future__ import annotations

import torch

from seqr.core.routing.base import Factors, Router, finite_or_lowest


def _triu_index(r: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    rows, cols = torch.triu_indices(r, r, device=device)
    return rows, cols


class SeqrRouter(Router):
    """SeqrRouter(A, B, *, mean=None, std=None): A (r, d_in) shared, B (N, d_out, r)."""

    method = "seqr"
    allows_per_adapter_a = False

    def _factorize(self, A: torch.Tensor, B: torch.Tensor) -> Factors:
        # Reduced QR of every B_i at once (torch.linalg.qr is batched); only R is kept.
        R = torch.linalg.qr(B.to(torch.float64), mode="r").R  # (N, min(d_out, r), r)
        gram = R.transpose(1, 2) @ R  # (N, r, r) = B_i^T B_i, computed in float64
        rows, cols = _triu_index(self.r, gram.device)
        weights = gram[:, rows, cols] * torch.where(rows == cols, 1.0, 2.0).to(gram)
        return {"R": R.to(self.compute_dtype), "gram_weights": weights.to(self.compute_dtype)}

    @property
    def R(self) -> torch.Tensor:
        """The stacked R_i factors, (N, min(d_out, r), r)."""
        return self._factors["R"]

    def project(self, X: torch.Tensor) -> torch.Tensor:
        """h = A x for every row: the one shared projection, (T, r)."""
        assert self.shared_a is not None  # SEQR always has a shared A (checked at init)
        return self._as_input(X) @ self.shared_a.T

    def norms_from_projection(self, H: torch.Tensor) -> torch.Tensor:
        """(T, N) norms from h = A x already computed (reused inside LoRA layers)."""
        return self._norms_h(H.to(self.compute_dtype)).to(self.dtype)

    def scores_from_projection(self, H: torch.Tensor) -> torch.Tensor:
        """(T, N) scores from h = A x; not finite in the compute dtype -> -inf (as scores)."""
        norms = self._norms_h(H.to(self.compute_dtype))
        if self._mean is not None and self._std is not None:
            norms = norms.sub_(self._mean).div_(self._std)
        return finite_or_lowest(norms)

    def _norms(self, X: torch.Tensor) -> torch.Tensor:
        assert self.shared_a is not None
        return self._norms_h(X @ self.shared_a.T)

    def _norms_h(self, H: torch.Tensor) -> torch.Tensor:
        rows, cols = _triu_index(self.r, H.device)
        monomials = H[:, rows] * H[:, cols]  # (T, r(r+1)/2)
        squared = monomials @ self._factors["gram_weights"].T  # (T, N) = ||R_i h||^2
        # Rounding can leave a tiny negative value where the true norm is ~0.
        return squared.clamp_(min=0).sqrt_()
