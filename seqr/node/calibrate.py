"""Calibration: per-module statistics of the adapter's activation norms on its own data.

SEQR (arXiv 2509.18093) routes by z = (||B A x|| - mu) / sigma with mu, sigma measured on the
adapter's own training data. For every LoRA module, with x the module's input at each token,
the value recorded is ||B A x||_2 (divided by ||A x|| when FederationConfig.calib_score is
"gain", the default: seqr.core.routing.gain): the stored lora_B and the shared lora_A, WITHOUT
peft's alpha/r scaling (the router computes ||R (A x)|| from the published B). Keys are the base
model's module names (``model.layers.0.self_attn.q_proj``), as in shared_a.py. The values and
the tokens that count (not the first token of a chunk; for gains, no token with a near-zero
||A x||) come from the one measurement every party uses, seqr.core.measurement, so the
server's probe recomputes exactly these numbers on public text.

Documented choice (FederationConfig.calib_lora_active, default False): the calibration forward
runs with the adapter DISABLED, so x is what the base model feeds each module. A router scoring
adapters before choosing one sees exactly these inputs, and anyone holding the public B can
recompute the norms on probe text (the server's plausibility check) without trusting anyone's
adapter to be active.

Differential privacy (calib_dp): each token norm is clipped to C, then the Gaussian mechanism
is applied to every module's (count, sum, sum of squares). Privacy unit: one calibration
sequence (a chunk of T = train_seq_len tokens). Adding or removing one changes each module's
count by at most T (the token rule leaves some of its tokens out), sum by at most T*C and sum
of squares by at most T*C^2; scaling those three by (T, T*C, T*C^2) gives a vector over M
modules with L2 sensitivity sqrt(3 M). The noise scale is the analytic Gaussian mechanism's
(Balle & Wang, ICML 2018, Thm 8). Mean and variance are post-processing (clamped to [0, C]
and [(1e-3 C)^2, C^2/4]). DP covers the statistics only, not the adapter weights (training is
not DP-SGD).
"""

from __future__ import annotations

import logging
import math
import secrets
from dataclasses import dataclass
from typing import Any

import numpy as np

from seqr.core.errors import ValueCheckError
from seqr.core.federation import FederationConfig
from seqr.core.measurement import adapter_router, measured_tokens, project, token_scores
from seqr.core.shared_a import lora_layers
from seqr.core.stats import NormStatistics, RunningMoments
from seqr.node.train import ADAPTER

log = logging.getLogger("seqr.client.calibrate")


@dataclass
class CalibrationResult:
    stats: NormStatistics
    sequences: int
    tokens: int  # per module
    lora_active: bool
    privacy: dict[str, Any] | None  # DP parameters and noise scales; None without DP


def analytic_gaussian_sigma(epsilon: float, delta: float, sensitivity: float) -> float:
    """Smallest noise std giving (epsilon, delta)-DP for this L2 sensitivity (Balle & Wang).

    Thm 8: the mechanism is (eps, delta)-DP iff
    Phi(D/(2s) - eps s/D) - e^eps Phi(-D/(2s) - eps s/D) <= delta; solved by bisection.
    """
    if not (epsilon > 0 and 0 < delta < 1 and sensitivity > 0):
        raise ValueCheckError(f"need eps > 0, 0 < delta < 1, sensitivity > 0; got {epsilon}")

    def phi(t: float) -> float:
        return 0.5 * math.erfc(-t / math.sqrt(2))

    def delta_of(s: float) -> float:
        a, b = sensitivity / (2 * s), epsilon * s / sensitivity
        return phi(a - b) - math.exp(epsilon) * phi(-a - b)

    lo, hi = 1e-6 * sensitivity, sensitivity
    while delta_of(hi) > delta:
        lo, hi = hi, hi * 2
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if delta_of(mid) > delta else (lo, mid)
    return hi


def pick_sequences(n_chunks: int, fed: FederationConfig) -> np.ndarray:
    """Indices of the calibration chunks: a seeded sample within both limits, in order."""
    seq_len = fed.train_seq_len
    n = min(n_chunks, fed.calib_max_sequences, max(1, fed.calib_max_tokens // seq_len))
    gen = np.random.Generator(np.random.PCG64([fed.data_seed, 2**32 + 1]))  # not a train epoch
    return np.sort(gen.permutation(n_chunks)[:n])


def calibrate(
    peft_model: Any,
    chunks: np.ndarray,
    fed: FederationConfig,
    *,
    batch_size: int = 8,
    progress: bool = True,
    rng: np.random.Generator | None = None,
) -> CalibrationResult:
    """Statistics of ||B A x|| per module on the adapter's own chunks (see module docstring).

    ``rng`` draws the DP noise; by default a fresh OS-seeded generator (noise must not be
    reproducible by anyone else). Pass one only in tests.
    """
    import contextlib

    import torch
    from tqdm.auto import tqdm

    layers = lora_layers(peft_model, ADAPTER)
    picked = chunks[pick_sequences(len(chunks), fed)]
    clip = fed.calib_dp_clip if fed.calib_dp else math.inf
    sums = {name: np.zeros(3) for name in layers}  # clipped count, sum, sum of squares
    stats = NormStatistics(score=fed.calib_score)

    def hook_for(name: str, layer: Any) -> Any:
        a = layer.lora_A[ADAPTER].weight.detach()  # (r, d_in), the shared A
        router = adapter_router(layer.lora_B[ADAPTER].weight.detach())  # B (d_out, r)

        def hook(module: Any, args: tuple[Any, ...], output: Any) -> None:
            x = args[0].detach()  # (batch, T, d_in)
            h = project(x, a)
            keep = measured_tokens(x, h, None, fed.calib_score)  # the token rule
            values = token_scores(router, h[keep], fed.calib_score)[:, 0]
            if not torch.isfinite(values).all():
                raise ValueCheckError(
                    f"the adapter's scores on module {name} overflow float32, the dtype "
                    "routers compute in: its B is too large; train with a lower learning rate"
                )
            norms = values.double()  # (measured tokens,)
            if fed.calib_dp:
                c = norms.clamp(max=clip)
                sums[name] += [c.numel(), float(c.sum()), float((c * c).sum())]
            else:
                stats.update(name, norms)

        return hook

    handles = [layer.register_forward_hook(hook_for(n, layer)) for n, layer in layers.items()]
    # Skip the LM head: only module inputs matter (get_decoder is the stack of layers).
    core = peft_model.get_base_model()
    runner = core.get_decoder() if hasattr(core, "get_decoder") else core
    off = contextlib.nullcontext() if fed.calib_lora_active else peft_model.disable_adapter()
    was_training = peft_model.training
    peft_model.eval()
    try:
        with torch.no_grad(), off:
            steps = range(0, len(picked), batch_size)
            for i in tqdm(steps, desc="calibrate", unit="batch", disable=not progress):
                runner(input_ids=torch.from_numpy(picked[i : i + batch_size]), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
        peft_model.train(was_training)
    tokens = int(picked.size)
    privacy = None
    if fed.calib_dp:
        stats, privacy = _privatize(sums, fed, rng or np.random.default_rng(secrets.randbits(128)))
    return CalibrationResult(stats, len(picked), tokens, fed.calib_lora_active, privacy)


def _privatize(
    sums: dict[str, np.ndarray], fed: FederationConfig, rng: np.random.Generator
) -> tuple[NormStatistics, dict[str, Any]]:
    t, c = fed.train_seq_len, fed.calib_dp_clip
    sensitivity = math.sqrt(3 * len(sums))  # unit-scaled (count, sum, sumsq) per module
    sigma = analytic_gaussian_sigma(fed.calib_dp_epsilon, fed.calib_dp_delta, sensitivity)
    scales = np.array([t, t * c, t * c * c])  # undo the unit scaling
    stats = NormStatistics(score=fed.calib_score)
    clamped = []
    for name in sorted(sums):
        count, total, squares = sums[name] + rng.normal(0.0, sigma, 3) * scales
        n = max(count, float(t))  # post-processing: at least one sequence
        mean = min(max(total / n, 0.0), c)
        var_bounds = ((1e-3 * c) ** 2, c * c / 4)  # a value in [0, C] has variance <= C^2/4
        var = min(max(squares / n - mean * mean, var_bounds[0]), var_bounds[1])
        if n != count or mean in (0.0, c) or var in var_bounds:
            clamped.append(name)
        stats.modules[name] = RunningMoments(
            1, count=int(round(n)), mean=np.array([mean]), m2=np.array([var * round(n)])
        )
    if clamped:
        log.warning("DP noise forced clamping in %d modules; use more data", len(clamped))
    privacy = {
        "mechanism": "analytic-gaussian",
        "unit": "one calibration sequence",
        "epsilon": fed.calib_dp_epsilon,
        "delta": fed.calib_dp_delta,
        "clip": c,
        "sequence_tokens": t,
        "l2_sensitivity_unit_scaled": sensitivity,
        "noise_std": {
            "count": sigma * t,
            "sum": sigma * t * c,
            "sum_of_squares": sigma * t * c * c,
        },
        "clamped_modules": clamped,
    }
    stats.privacy = privacy  # signed with the statistics file: anyone can read the guarantee
    return stats, privacy
