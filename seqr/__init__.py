"""seqr: federated, privacy-preserving LoRA routing with SEQR (arXiv 2509.18093).

The sub-packages are the roles, in the order data flows through them:

    seqr.node      a party: trains B on private data, calibrates, signs its export (ClientApp)
    seqr.operator  the federation's server: admits exports, publishes the registry (ServerApp)
    seqr.registry  the signed, append-only adapter registry and its audit
    seqr.consumer  whoever routes: audits the registry, routes with SEQR, generates
    seqr.core      the pure library beneath them (routing, statistics, formats, admission)
    seqr.cli       the ``seqr`` command;  seqr.sim  simulations, evaluation, benchmarks;
    seqr.deploy    helpers around Flower's own deployment commands

The public names below are imported lazily (PEP 562), so ``seqr registry audit`` and the
signing code start without importing torch.
"""

from __future__ import annotations

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

try:
    __version__ = version("seqr")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"

_EXPORTS = {
    "SeqrError": "seqr.core.errors",
    "ArrowRouter": "seqr.core.routing",
    "BruteForceRouter": "seqr.core.routing",
    "Router": "seqr.core.routing",
    "SeqrRouter": "seqr.core.routing",
    "SpectrRouter": "seqr.core.routing",
    "NormStatistics": "seqr.core.stats",
    "RunningMoments": "seqr.core.stats",
    "ModelRoutingConfig": "seqr.core.model_routing",
    "RoutedModel": "seqr.core.model_routing",
    "RoutingDecision": "seqr.core.model_routing",
}
__all__ = [
    "__version__",
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
    from seqr.core.errors import SeqrError
    from seqr.core.model_routing import ModelRoutingConfig, RoutedModel, RoutingDecision
    from seqr.core.routing import ArrowRouter, BruteForceRouter, Router, SeqrRouter, SpectrRouter
    from seqr.core.stats import NormStatistics, RunningMoments


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'seqr' has no attribute {name!r}")
    value = getattr(import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value
