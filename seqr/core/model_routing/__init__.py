"""Routing inside a model: SEQR per token and per layer, or one adapter per sequence.

config.py (ModelRoutingConfig), modules.py (find LoRA modules, check the shared A, build one
router per module), per_token.py (routed delta inside peft's lora.Linear), collect.py (first pass
on the base model), per_sequence.py (aggregation, RoutingDecision), routed_model.py (the API).
"""

from seqr.core.model_routing.config import ModelRoutingConfig
from seqr.core.model_routing.modules import RoutedModule, build_routed_modules
from seqr.core.model_routing.per_sequence import RoutingDecision
from seqr.core.model_routing.per_token import ModuleRecord, topk_weights
from seqr.core.model_routing.reference import blend_statistics, reference_statistics
from seqr.core.model_routing.routed_model import RoutedModel

__all__ = [
    "ModelRoutingConfig",
    "ModuleRecord",
    "RoutedModel",
    "RoutedModule",
    "RoutingDecision",
    "blend_statistics",
    "build_routed_modules",
    "reference_statistics",
    "topk_weights",
]
