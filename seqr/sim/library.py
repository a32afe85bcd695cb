"""A routed adapter library as a client holds it: base model + every adapter + statistics.

Loads signed exports (or registry entries, which carry the same files) into one peft model.
Every adapter shares each module's frozen A, so a uniform merge of the library is exact
(mean_i B_i A = (mean_i B_i) A, FFA-LoRA's observation) and is built as one more adapter.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from seqr.core.errors import ConfigError
from seqr.core.manifest import NORM_STATS_NAME
from seqr.core.stats import NormStatistics

UNIFORM_MERGE = "uniform_merge"


@dataclass
class AdapterLibrary:
    peft_model: Any  # peft.PeftModel in eval mode, holding every adapter
    adapters: tuple[str, ...]  # routed adapters, in index order
    stats: dict[str, NormStatistics]


def load_library(base_model: Any, exports: Mapping[str, Path]) -> AdapterLibrary:
    """One PeftModel holding every export folder's adapter under its name."""
    from peft import PeftModel

    if not exports:
        raise ConfigError("no adapters to load: the library is empty")
    names = list(exports)
    peft_model = PeftModel.from_pretrained(
        base_model, str(exports[names[0]]), adapter_name=names[0]
    )
    for name in names[1:]:
        peft_model.load_adapter(str(exports[name]), adapter_name=name)
    peft_model.eval()
    stats = {
        name: NormStatistics.from_json_bytes((Path(folder) / NORM_STATS_NAME).read_bytes())
        for name, folder in exports.items()
    }
    return AdapterLibrary(peft_model, tuple(names), stats)


@torch.no_grad()
def add_uniform_merge(library: AdapterLibrary, name: str = UNIFORM_MERGE) -> str:
    """Add the exact uniform merge of all adapters (mean of B over the shared A) as ``name``."""
    from peft.tuners.lora import LoraLayer

    model = library.peft_model
    first = library.adapters[0]
    if name not in model.peft_config:
        model.add_adapter(name, model.peft_config[first])
    for module in model.modules():
        if isinstance(module, LoraLayer) and first in module.lora_A:
            layer: Any = module  # peft types lora_A / lora_B loosely
            layer.lora_A[name].weight.copy_(layer.lora_A[first].weight)
            stacked = torch.stack([layer.lora_B[a].weight for a in library.adapters])
            layer.lora_B[name].weight.copy_(stacked.mean(dim=0))
    model.eval()
    return name


def lora_shape(library: AdapterLibrary) -> tuple[int, int]:
    """(r, d_in) of the first LoRA module: the shape routing works on."""
    from peft.tuners.lora import LoraLayer

    first = library.adapters[0]
    for module in library.peft_model.modules():
        if isinstance(module, LoraLayer) and first in module.lora_A:
            layer: Any = module  # peft types lora_A loosely
            r, d_in = layer.lora_A[first].weight.shape
            return int(r), int(d_in)
    raise ConfigError("the library holds no LoRA module")


def exports_from_audit(registry: Path, entries: Any) -> dict[str, Path]:
    """Adapter folders of an AUDITED registry by manifest name (call audit_registry first).

    Two clients may pick the same name; the later ones get their key id appended.
    """
    folders: dict[str, Path] = {}
    for entry in entries:
        name = entry.name if entry.name not in folders else f"{entry.name}-{entry.client[:8]}"
        folders[name] = Path(registry) / "adapters" / entry.adapter_sha256
    return folders
