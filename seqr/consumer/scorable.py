"""Which audited adapters a router can score: the rest are skipped, never the whole registry.

A router computes in float32 (seqr.core.routing.base.compute_dtype_for). An adapter that
passed an audit may still be impossible to score there: a B whose B^T B overflows float32,
statistics whose mean, std or 1/std do not fit, or a lora_A that is not the federation's
shared A (SEQR needs one A per module). Refusing the whole registry for one such adapter
would let any enrolled client switch routing off for everyone, so each is checked on its
own and skipped with a reason (docs/THREATS.md, "Numeric overflow across a dtype boundary").
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from seqr.core.errors import FormatError
from seqr.core.model_routing.reference import unusable_statistics
from seqr.core.safetensors_check import load_float_tensors, parse_safetensors_header
from seqr.core.shared_a import shared_a_mismatches

if TYPE_CHECKING:
    from seqr.consumer.router import AuditedAdapter

__all__ = ["gram_overflows", "unscorable_reasons", "weights_problem"]


def weights_problem(weights: bytes, seed: int) -> str | None:
    """Why these adapter weights cannot be scored in float32 next to the federation's other
    adapters (shared A of ``seed``), or None."""
    try:
        header = parse_safetensors_header(weights)
        tensors = load_float_tensors(weights, header)
    except FormatError as exc:
        return f"its weights are not readable: {exc}"
    for name, array in sorted(tensors.items()):
        if not np.isfinite(array).all():
            return f"tensor {ascii(name)} holds NaN or inf"
        if name.endswith(".lora_B.weight") and array.ndim == 2 and gram_overflows(array):
            return f"B^T B of {ascii(name)} overflows float32 (its B is too large)"
    dtypes = {name: info.dtype for name, info in header.tensors.items()}
    wrong_a = shared_a_mismatches(tensors, seed, dtypes)
    if wrong_a:
        return (
            f"its lora_A differs from the shared A of seed {seed} in {len(wrong_a)} tensor(s), "
            f"e.g. {ascii(wrong_a[0])}"
        )
    return None


def gram_overflows(b: np.ndarray) -> bool:
    """True when SEQR's stored Gram weights of B (B^T B, off-diagonal doubled,
    seqr.core.routing.seqr) overflow float32, or could for a unit-norm h: the sum of their
    absolute values bounds h^T B^T B h for every ||h|| <= 1, the gain score's input."""
    b64 = np.asarray(b, dtype=np.float64)
    gram = np.abs(b64.T @ b64)
    total = 2.0 * gram.sum() - np.trace(gram)  # upper triangle with off-diagonal doubled
    with np.errstate(over="ignore"):
        return not bool(np.isfinite(np.float32(total)))


def _shape(adapter: AuditedAdapter) -> tuple[int, int, float, tuple[str, ...]]:
    m = adapter.manifest
    return (m.a_seed, m.rank, m.alpha, tuple(m.target_modules))


def unscorable_reasons(adapters: Sequence[AuditedAdapter]) -> dict[str, str]:
    """Adapter name -> why a router cannot score it next to the others (weights, statistics,
    or a shared-A seed / rank / alpha / targets other than what most adapters name: SEQR
    needs one A and one scaling per module); adapters missing from the result are fine."""
    shapes = Counter(_shape(a) for a in adapters)
    common = shapes.most_common(1)[0][0] if shapes else (0, 0, 0.0, ())
    seed = common[0]
    out = {}
    for adapter in adapters:
        if _shape(adapter) != common:
            seed_, rank, alpha, _ = _shape(adapter)
            out[adapter.name] = (
                f"it names shared-A seed {seed_}, rank {rank}, alpha {alpha:g} and its target "
                f"modules; most of the registry's adapters name seed {common[0]}, rank "
                f"{common[1]}, alpha {common[2]:g} and theirs"
            )
            continue
        problem = weights_problem(adapter.weights, seed)
        if problem is None:
            stats = unusable_statistics(adapter.stats)
            problem = None if stats is None else f"its statistics: {stats}"
        if problem is not None:
            out[adapter.name] = problem
    return out
