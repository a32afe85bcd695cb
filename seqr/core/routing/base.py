"""What every router shares: input checks, per-adapter factors, z-scores and top-k.

A router holds, per adapter, whatever factors its method needs (stacked along dim 0), so
adding or removing one adapter touches only that adapter's row: the others are never
recomputed. Subclasses implement ``_factorize`` (once per adapter) and ``_norms``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from seqr.core.errors import ShapeError, ValueCheckError

SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
Factors = dict[str, torch.Tensor]


def compute_dtype_for(*dtypes: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else is computed in float32 (bf16 sums lose norms)."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def finite_or_lowest(scores: torch.Tensor) -> torch.Tensor:
    """Scores with NaN and +-inf replaced by -inf, the lowest possible score.

    A score that overflowed (B^T B or ||B h||^2 past float32's 3.4e38) or is undefined (NaN,
    which ``torch.topk`` ranks FIRST) must never win: the adapter it belongs to simply loses
    that input (docs/THREATS.md, "Numeric overflow across a dtype boundary").
    """
    lowest = float("-inf")
    return torch.nan_to_num(scores, nan=lowest, posinf=lowest, neginf=lowest)  # one pass


def best_k(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, indices) of the k largest scores along the last dim, best first. For k = 1 a
    max reduction: on an H200 torch.topk's radix select took 48% of SEQR's routing time
    (docs/RESULTS.md, "Routing speed")."""
    if k == 1:
        values, indices = scores.max(dim=-1, keepdim=True)
    else:
        values, indices = torch.topk(scores, k, dim=-1)
    return values, indices


def _check_finite(name: str, tensor: torch.Tensor) -> None:
    if not torch.isfinite(tensor).all():
        raise ValueCheckError(f"{name} contains NaN or inf; re-export the adapter")


def _check_dtype(name: str, tensor: torch.Tensor) -> None:
    if tensor.dtype not in SUPPORTED_DTYPES:
        raise ValueCheckError(f"{name} has dtype {tensor.dtype}; use float32, float64 or bfloat16")


def stack_b(B: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    """(N, d_out, r) from a stacked tensor or a list of (d_out, r) matrices."""
    if isinstance(B, torch.Tensor):
        if B.ndim == 2:
            B = B.unsqueeze(0)
        if B.ndim != 3:
            raise ShapeError(f"B must have shape (N, d_out, r), got {tuple(B.shape)}")
        stacked = B
    else:
        mats = list(B)
        if not mats:
            raise ShapeError("B holds no adapters (N = 0); give at least one B_i")
        shapes = {tuple(m.shape) for m in mats}
        if any(m.ndim != 2 for m in mats) or len(shapes) != 1:
            raise ShapeError(f"every B_i must be (d_out, r) and all alike; got {sorted(shapes)}")
        stacked = torch.stack(list(mats))
    if stacked.shape[0] == 0:
        raise ShapeError("B holds no adapters (N = 0); give at least one B_i")
    return stacked


class Router:
    """Base class. ``A`` is (r, d_in) shared, or (N, r, d_in) per adapter where allowed."""

    method = "base"
    allows_per_adapter_a = True

    def __init__(
        self,
        A: torch.Tensor,
        B: torch.Tensor | Sequence[torch.Tensor],
        *,
        mean: Any = None,
        std: Any = None,
        names: Sequence[str] | None = None,
    ) -> None:
        B = stack_b(B)
        _check_dtype("A", A)
        _check_dtype("B", B)
        self.dtype = B.dtype
        self.compute_dtype = compute_dtype_for(A.dtype, B.dtype)
        self.device = A.device
        if A.ndim == 3 and not self.allows_per_adapter_a:
            raise ShapeError(
                f"{type(self).__name__} needs one shared A of shape (r, d_in), got "
                f"{tuple(A.shape)}; use SpectrRouter or BruteForceRouter for one A per adapter"
            )
        if A.ndim not in (2, 3):
            raise ShapeError(f"A must be (r, d_in) or (N, r, d_in), got {tuple(A.shape)}")
        self.r, self.d_in = int(A.shape[-2]), int(A.shape[-1])
        self.d_out = int(B.shape[1])
        self.shared_a: torch.Tensor | None = None
        if A.ndim == 2:
            _check_finite("A", A)
            self.shared_a = A.to(self.compute_dtype)
        self._factors: Factors = {}
        self._mean: torch.Tensor | None = None
        self._std: torch.Tensor | None = None
        self.names: list[str] = []
        self._append(A, B, mean, std, names)

    # ----- adapters -------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.names)

    def add(
        self,
        B: torch.Tensor,
        *,
        A: torch.Tensor | None = None,
        mean: float | None = None,
        std: float | None = None,
        name: str | None = None,
    ) -> int:
        """Add one adapter (B of shape (d_out, r)); returns its index. Others are untouched."""
        if A is None:
            if self.shared_a is None:
                raise ShapeError("this router has one A per adapter: pass A for the new adapter")
            A = self.shared_a
        elif self.shared_a is not None:
            raise ShapeError("this router shares one A: the new adapter must not bring its own")
        else:
            A = A.unsqueeze(0) if A.ndim == 2 else A
        means = None if mean is None else [mean]
        stds = None if std is None else [std]
        self._append(A, stack_b(B), means, stds, None if name is None else [name])
        return len(self) - 1

    def remove(self, index: int | str) -> None:
        """Remove one adapter by index or name; the others keep their factors and order."""
        i = self.names.index(index) if isinstance(index, str) else int(index)
        if not -len(self) <= i < len(self):
            raise ShapeError(f"adapter index {index} is out of range for N = {len(self)}")
        if len(self) == 1:
            raise ShapeError("cannot remove the last adapter: a router needs N >= 1")
        i %= len(self)
        keep = [j for j in range(len(self)) if j != i]
        self._factors = {k: v[keep] for k, v in self._factors.items()}
        if self._mean is not None and self._std is not None:
            self._mean, self._std = self._mean[keep], self._std[keep]
        del self.names[i]

    def _append(
        self,
        A: torch.Tensor,
        B: torch.Tensor,
        mean: Any,
        std: Any,
        names: Sequence[str] | None,
    ) -> None:
        n = B.shape[0]
        if B.shape[2] != self.r:
            raise ShapeError(f"r of A is {self.r} but B has r = {B.shape[2]} (B is (N, d_out, r))")
        if B.shape[1] != self.d_out:
            raise ShapeError(f"d_out of the router is {self.d_out} but B has d_out = {B.shape[1]}")
        if A.ndim == 3 and A.shape[0] != n:
            raise ShapeError(f"A holds {A.shape[0]} matrices but B holds {n} adapters")
        if A.shape[-2:] != (self.r, self.d_in):
            raise ShapeError(
                f"A must be (r, d_in) = ({self.r}, {self.d_in}), got {tuple(A.shape[-2:])}"
            )
        _check_finite("B", B)
        if A.ndim == 3:
            _check_finite("A", A)
        mean_t, std_t = self._check_stats(mean, std, n)
        new = self._factorize(
            A.to(self.device, self.compute_dtype), B.to(self.device, self.compute_dtype)
        )
        self._factors = {
            k: torch.cat([self._factors[k], v]) if self._factors else v for k, v in new.items()
        }
        if mean_t is not None and std_t is not None:
            self._mean = mean_t if self._mean is None else torch.cat([self._mean, mean_t])
            self._std = std_t if self._std is None else torch.cat([self._std, std_t])
        start = len(self.names)
        self.names.extend(list(names) if names is not None else [str(start + j) for j in range(n)])
        if len(self.names) != start + n or len(set(self.names)) != len(self.names):
            raise ShapeError("adapter names must be unique and one per adapter")

    def _check_stats(
        self, mean: Any, std: Any, n: int
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if (mean is None) != (std is None):
            raise ValueCheckError("give both mean and std, or neither")
        has_stats = self._mean is not None
        if self.names and has_stats != (mean is not None):
            raise ValueCheckError(
                "every adapter of a router needs statistics, or none: "
                f"this router {'has' if has_stats else 'has no'} statistics"
            )
        if mean is None:
            return None, None
        mean_t = torch.as_tensor(mean, dtype=self.compute_dtype, device=self.device).reshape(-1)
        std_t = torch.as_tensor(std, dtype=self.compute_dtype, device=self.device).reshape(-1)
        if mean_t.shape != (n,) or std_t.shape != (n,):
            raise ShapeError(
                f"mean and std need one value per adapter ({n}), got "
                f"{tuple(mean_t.shape)} and {tuple(std_t.shape)}"
            )
        _check_finite("mean", mean_t)
        _check_finite("std", std_t)
        if (std_t <= 0).any():
            bad = int(torch.nonzero(std_t <= 0)[0])
            raise ValueCheckError(
                f"std of adapter {bad} is {float(std_t[bad])}; it must be > 0 "
                "(recalibrate on more varied data)"
            )
        return mean_t, std_t

    # ----- routing ----------------------------------------------------------------------
    def _as_input(self, X: torch.Tensor) -> torch.Tensor:
        if not isinstance(X, torch.Tensor):
            raise ShapeError(f"X must be a torch.Tensor of shape (T, {self.d_in})")
        if X.ndim < 1 or X.shape[-1] != self.d_in:
            raise ShapeError(f"X must be (T, d_in) with d_in = {self.d_in}, got {tuple(X.shape)}")
        return X.to(self.device, self.compute_dtype)

    def norms(self, X: torch.Tensor) -> torch.Tensor:
        """(T, N) activation norms ||B_i A_i x|| (or the method's proxy), in the router's dtype."""
        X = self._as_input(X)
        flat = X.reshape(-1, self.d_in)
        return self._norms(flat).reshape(*X.shape[:-1], len(self)).to(self.dtype)

    def scores(self, X: torch.Tensor) -> torch.Tensor:
        """(T, N) z-scores (norm - mean) / std when statistics were given, else the norms;
        a score that is not finite in the compute dtype is -inf (``finite_or_lowest``)."""
        X = self._as_input(X)
        flat = self._score_rows(X.reshape(-1, self.d_in))
        # float16 routers: a finite float32 score may overflow the cast; it ranks last too.
        return finite_or_lowest(flat.reshape(*X.shape[:-1], len(self)).to(self.dtype))

    def _score_rows(self, X: torch.Tensor) -> torch.Tensor:
        norms = self._norms(X)
        if self._mean is not None and self._std is not None:
            norms = norms.sub_(self._mean).div_(self._std)
        return finite_or_lowest(norms)

    def topk(self, X: torch.Tensor, k: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores, indices), each (T, k), best first; scores in the compute dtype. A score
        that is not finite counts as -inf: it never ranks above a finite one."""
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= len(self):
            raise ShapeError(f"k must be an integer in [1, N = {len(self)}], got {k!r}")
        X = self._as_input(X)
        rows = self._score_rows(X.reshape(-1, self.d_in))
        values, indices = best_k(rows, k)
        shape = (*X.shape[:-1], k)
        return values.reshape(shape), indices.reshape(shape)

    def route(self, X: torch.Tensor, k: int = 1) -> torch.Tensor:
        """(T, k) int64 indices of the best adapters, best first."""
        return self.topk(X, k)[1]

    # ----- method-specific ------------------------------------------------------------
    def _factorize(self, A: torch.Tensor, B: torch.Tensor) -> Factors:
        raise NotImplementedError

    def _norms(self, X: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @property
    def mean(self) -> torch.Tensor | None:
        return self._mean

    @property
    def std(self) -> torch.Tensor | None:
        return self._std

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(N={len(self)}, r={self.r}, d_in={self.d_in}, "
            f"d_out={self.d_out}, dtype={self.dtype}, z_scores={self._mean is not None})"
        )
