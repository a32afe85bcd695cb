"""Whether a torch device named on a command line or in a config can be used here."""

from __future__ import annotations

import torch

from seqr.core.errors import ConfigError


def check_device(name: str, field: str = "device") -> None:
    """ConfigError naming ``field`` unless ``name`` is a torch device this machine has (a
    CUDA device on a CPU-only torch fails here, not as a traceback in the first forward)."""
    try:
        torch.empty(0, device=torch.device(name))
    # torch says "not compiled with CUDA" with an AssertionError, bad names with the others.
    except (AssertionError, RuntimeError, TypeError, ValueError) as exc:
        raise ConfigError(
            f"{field} = {name!r} is not usable on this machine ({exc}); use cpu, or run where "
            "that device exists"
        ) from None


def device_name(name: str) -> str:
    """What a report calls the device: the GPU's model name, else "CPU"."""
    device = torch.device(name)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
