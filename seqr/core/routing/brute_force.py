"""Brute force: ||B_i (A_i x)|| computed directly, N (r d_in + d_out r) per token.

The reference every other router is checked against. Adapters are processed in chunks
so memory stays bounded; each chunk builds (c, T, d_out), never (T, N, d_out).
"""

from __future__ import annotations

import torch

from seqr.core.errors import ShapeError
from seqr.core.routing.base import Factors, Router

_MAX_CHUNK_ELEMENTS = 1 << 24
# Tokens per product in norms_shared_projection: (tokens, d_out) stays in the CPU's cache
# (measured: 7x faster than one product of 1024 tokens by every B_i at N = 10, d_out = 1536).
_CACHED_ELEMENTS = 1 << 20


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

    def norms_shared_projection(self, X: torch.Tensor) -> torch.Tensor:
        """(T, N) ||B_i (A x)|| with the shared A applied once, then each B_i directly.

        The same numbers as ``norms`` (up to rounding) at about half its work: an exactness
        check on many tokens (seqr simulate's evaluation) needs the direct d_out-dimensional
        product, not the paper's cost model of a separate A_i x per adapter.
        """
        if self.shared_a is None:
            raise ShapeError("norms_shared_projection needs one A shared by every adapter")
        X = self._as_input(X)
        flat = X.reshape(-1, self.d_in)
        B = self._factors["B"]  # (N, d_out, r)
        rows = max(1, _CACHED_ELEMENTS // self.d_out)
        out = flat.new_empty(flat.shape[0], len(self))
        for start in range(0, flat.shape[0], rows):
            h = flat[start : start + rows] @ self.shared_a.T  # (t, r): A x once
            for i in range(len(self)):
                out[start : start + rows, i] = (h @ B[i].T).norm(dim=-1)
        return out.reshape(*X.shape[:-1], len(self)).to(self.dtype)
