"""Brute force: ||B_i (A_i x)|| computed directly, N (r d_in + d_out r) per token.

The reference every other router is checked against. Adapters are processed in chunks
so memory stays bounded; each chunk builds (c, T, d_out), never (T, N, d_out).
"""

from __future__ import annotations

import torch

from seqr.core.routing.base import Factors, Router

_MAX_CHUNK_ELEMENTS = 1 << 24


class BruteForceRouter(Router):
    """BruteForceRouter(A, B, *, mean=None, std=None): A (r, d_in) or (N, r, d_in)."""

    method = "brute_force"

    def _factorize(self, A: torch.Tensor, B: torch.Tensor) -> Factors:
        factors = {"B": B}
        if A.ndim == 3:
            factors["A"] = A
        return factors

    def _norms(self, X: torch.Tensor) -> torch.Tensor:
        B = self._factors["B"]
        n = B.shape[0]
        chunk = max(1, _MAX_CHUNK_ELEMENTS // max(1, X.shape[0] * self.d_out))
        out = X.new_empty(X.shape[0], n)
        for start in range(0, n, chunk):
            stop = min(n, start + chunk)
            if "A" in self._factors:
                A = self._factors["A"][start:stop]
            else:
                # A real copy per adapter: batched matmul on a stride-0 expand is very slow.
                assert self.shared_a is not None
                A = self.shared_a.expand(stop - start, self.r, self.d_in).contiguous()
            h = X @ A.transpose(1, 2)  # (c, T, r): A_i x for each adapter, as the method says
            out[:, start:stop] = (h @ B[start:stop].transpose(1, 2)).norm(dim=-1).T
        return out
