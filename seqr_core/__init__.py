"""seqr_core: the pure library behind seqr (routing, calibration, adapters, registry, signing).

It knows nothing of Flower; client/ and server/ wrap it in Flower apps.
"""

from seqr_core.errors import SeqrError
from seqr_core.model_routing import ModelRoutingConfig, RoutedModel, RoutingDecision
from seqr_core.routing import ArrowRouter, BruteForceRouter, Router, SeqrRouter, SpectrRouter
from seqr_core.stats import NormStatistics, RunningMoments

__all__ = [
    "ArrowRouter",
    "BruteForceRouter",
    "ModelRoutingConfig",
    "NormStatistics",
    "RoutedModel",
    "RoutingDecision",
    "Router",
    "RunningMoments",
    "SeqrError",
    "SeqrRouter",
    "SpectrRouter",
]
