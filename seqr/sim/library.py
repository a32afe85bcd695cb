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


def exports_from_audit(verified: Any, folder: Path) -> dict[str, Path]:
    """The verified adapters of an audit (registry.audit_registry) written as plain peft
    export folders under ``folder``, by manifest name (peft's loaders take folders).

    Two clients may pick the same name; the later ones get their key id appended.
    """
    from seqr.core.atomic_write import write_atomic

    folders: dict[str, Path] = {}
    for adapter in verified.adapters:
        entry = adapter.entry
        name = entry.name if entry.name not in folders else f"{entry.name}-{entry.client[7:15]}"
        target = Path(folder) / name
        target.mkdir(parents=True, exist_ok=True)
        for file_name, data in adapter.files.items():
            write_atomic(target / file_name, data)
        folders[name] = target
    return folders
