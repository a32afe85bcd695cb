"""SpectR (arXiv 2504.03454): the exact norm through the SVD of each B_i A_i.

B_i A_i = U_i S_i V_i^T, so ||B_i A_i x|| = ||S_i V_i^T x||: r d_in multiply-adds per
adapter and token. The SVD of the rank-r product is taken exactly through its r x r core:
with A_i^T = Q_a R_a and B_i = Q_b R_b, B_i A_i = Q_b (R_b R_a^T) Q_a^T, and the SVD of the
core M = U' S V'^T gives V_i = Q_a V' (the same singular values and vectors as a full SVD).
"""

from __future__ import annotations

import torch

from seqr.core.routing.base import Factors, Router

# Bounds the (T, chunk * r) product so memory stays flat in N; not a (T, N, d) tensor.
_MAX_CHUNK_ELEMENTS = 1 << 24


def top_right_singular(A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Singular values S (N, r) and right singular vectors V (N, d_in, r) of every B_i A_i."""
    A64, B64 = A.to(torch.float64), B.to(torch.float64)
    if A64.ndim == 2:
        A64 = A64.unsqueeze(0)
    Q_a, R_a = torch.linalg.qr(A64.transpose(-1, -2))  # (n, d_in, r), (n, r, r)
    R_b = torch.linalg.qr(B64, mode="r").R  # (N, min(d_out, r), r)
    core = R_b @ R_a.transpose(-1, -2)  # (N, min(d_out, r), r)
    _, S, Vh = torch.linalg.svd(core, full_matrices=False)
    V = Q_a @ Vh.transpose(-1, -2)  # (N, d_in, k)
    return S, V


class SpectrRouter(Router):
    """SpectrRouter(A, B, *, mean=None, std=None): A (r, d_in) or (N, r, d_in)."""

    method = "spectr"

    def _factorize(self, A: torch.Tensor, B: torch.Tensor) -> Factors:
        S, V = top_right_singular(A, B)
        projection = S.unsqueeze(-1) * V.transpose(-1, -2)  # S_i V_i^T, (N, k, d_in)
        return {"projection": projection.to(self.compute_dtype)}

    def _norms(self, X: torch.Tensor) -> torch.Tensor:
        projection = self._factors["projection"]
        n, k, _ = projection.shape
        flat = projection.reshape(n * k, self.d_in)
        chunk = max(1, _MAX_CHUNK_ELEMENTS // max(1, X.shape[0] * k))
        out = X.new_empty(X.shape[0], n)
        for start in range(0, n, chunk):
            stop = min(n, start + chunk)
            coords = X @ flat[start * k : stop * k].T  # (T, c k)
            out[:, start:stop] = coords.reshape(X.shape[0], stop - start, k).norm(dim=-1)
        return out
