"""seqr_core: the pure library behind seqr (routing, calibration, adapters, registry, signing).

It knows nothing of Flower; client/ and server/ wrap it in Flower apps. The public names
below are imported lazily (PEP 562), so ``seqr registry audit`` and the signing code start
without importing torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "SeqrError": "seqr_core.errors",
    "ArrowRouter": "seqr_core.routing",
    "BruteForceRouter": "seqr_core.routing",
    "Router": "seqr_core.routing",
    "SeqrRouter": "seqr_core.routing",
    "SpectrRouter": "seqr_core.routing",
    "NormStatistics": "seqr_core.stats",
    "RunningMoments": "seqr_core.stats",
    "ModelRoutingConfig": "seqr_core.model_routing",
    "RoutedModel": "seqr_core.model_routing",
    "RoutingDecision": "seqr_core.model_routing",
}
__all__ = [
    "ArrowRouter",
    "BruteForceRouter",
    "ModelRoutingConfig",
    "NormStatistics",
    "RoutedModel",
    "Router",
    "RoutingDecision",
    "RunningMoments",
    "SeqrError",
    "SeqrRouter",
    "SpectrRouter",
]

if TYPE_CHECKING:
    from seqr_core.errors import SeqrError
    from seqr_core.model_routing import ModelRoutingConfig, RoutedModel, RoutingDecision
    from seqr_core.routing import ArrowRouter, BruteForceRouter, Router, SeqrRouter, SpectrRouter
    from seqr_core.stats import NormStatistics, RunningMoments


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'seqr_core' has no attribute {name!r}")
    value = getattr(import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value
