"""The ServerApp's own settings, read from the Flower run config (flat kebab-case keys).

One frozen dataclass that validates itself (python-tuf UpdaterConfig style: bounds carry their
units). The federation settings (``FederationConfig``) come from the same run config, or from
a TOML file named by ``federation-file``; see ``federation_from_run_config``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from seqr.core.admission_policy import WEIGHT_DTYPES, AdmissionPolicy
from seqr.core.errors import ConfigError
from seqr.core.federation import FederationConfig
from seqr.core.value_bounds import StatsBounds, WeightBounds

__all__ = ["ServerSettings", "federation_from_run_config", "state_dir_for"]

log = logging.getLogger("seqr.server")
POLICY_BOUNDS = (
    "max_mean_z", "max_mean_z_above", "max_sigma_ratio", "max_tensor_norm", "min_stats_count",
    "max_stats_mean", "min_stats_std", "max_stats_std",
)  # fmt: skip
_TYPES: dict[str, type | tuple[type, ...]] = {
    "str": str,
    "int": int,
    "float": (int, float),
    "bool": bool,
}


@dataclass(frozen=True)
class ServerSettings:
    """Run-config keys of the ServerApp (kebab-case of the field names)."""

    registry_dir: str  # registry folder made by `seqr server init` (absolute path)
    server_keys: str  # comma-separated folders holding signing_key.pem (the registry's keys)
    server_key_passphrase_env: str = ""  # env var with the keys' passphrase; "" = unencrypted
    state_dir: str = ""  # replay state; "" = <registry-dir>.server-state next to the registry
    federation_file: str = ""  # TOML of federation keys; "" = federation keys of the run config
    probe_text: str = ""  # public probe text (file or folder); "" = built-in stdlib sources
    probe_max_tokens: int = 4096  # tokens per module the plausibility probe runs on
    num_server_rounds: int = 1
    min_nodes: int = 1  # wait for this many connected nodes before a round
    node_wait_s: float = 120.0  # seconds to wait for min-nodes
    train_timeout_s: float = 3600.0  # seconds to wait for submissions (then: timeout verdicts)
    verdict_timeout_s: float = 60.0  # seconds to wait for verdict acknowledgements
    auto_enrol: bool = False  # True: a validly signed unknown key is enrolled on submission
    adapter_dtype: str = "F32"  # safetensors dtype every adapter tensor must have
    # Admission bounds: AdmissionPolicy owns each default and its unit (seqr.core.value_bounds
    # says where the numeric ones come from); policy_bounds() hands them to the round.
    max_mean_z: float = AdmissionPolicy.max_mean_z  # probe stds the mean may sit below
    max_mean_z_above: float = AdmissionPolicy.max_mean_z_above  # ... and above
    max_sigma_ratio: float = AdmissionPolicy.max_sigma_ratio  # probe std / claimed std
    max_tensor_norm: float = AdmissionPolicy.max_tensor_norm  # Frobenius norm of one tensor
    min_stats_count: int = AdmissionPolicy.min_stats_count  # values behind each module
    max_stats_mean: float = AdmissionPolicy.max_stats_mean  # units of the score
    min_stats_std: float = AdmissionPolicy.min_stats_std  # units of the score
    max_stats_std: float = AdmissionPolicy.max_stats_std  # units of the score
    max_age_s: float = 7 * 86400.0  # seconds a submission's `created` may lie in the past

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            expected = _TYPES[str(f.type)]
            if isinstance(value, bool) != (f.type == "bool") or not isinstance(value, expected):
                _bad(f.name, value, f"must be of type {f.type}")
            if f.type == "float":
                if not math.isfinite(value) or value < 0:
                    _bad(f.name, value, "must be a finite number >= 0")
                object.__setattr__(self, f.name, float(value))
        if not self.registry_dir.strip():
            _bad("registry_dir", self.registry_dir, "is required: the folder of `seqr server init`")
        if not self.key_dirs:
            _bad("server_keys", self.server_keys, "must name at least one server key folder")
        for name, low, high in (
            ("probe_max_tokens", 2, 10**7),
            ("num_server_rounds", 1, 10**6),
            ("min_nodes", 1, 10**6),
        ):
            if not low <= getattr(self, name) <= high:
                _bad(name, getattr(self, name), f"must be in [{low}, {high}]")
        if self.adapter_dtype not in WEIGHT_DTYPES:
            _bad("adapter_dtype", self.adapter_dtype, f"must be one of {WEIGHT_DTYPES}")
        if self.max_sigma_ratio < 1:
            _bad("max_sigma_ratio", self.max_sigma_ratio, "must be >= 1")
        try:  # the policy's own checks of the bounds, before any round runs
            WeightBounds(max_tensor_norm=self.max_tensor_norm)
            StatsBounds(self.min_stats_count, self.max_stats_mean, self.min_stats_std,
                        self.max_stats_std)  # fmt: skip
        except ConfigError as exc:
            raise ConfigError(f"server settings: {exc}") from None

    def policy_bounds(self) -> dict[str, float]:
        """The numeric AdmissionPolicy fields these settings set (RoundRunner(**bounds))."""
        return {name: getattr(self, name) for name in POLICY_BOUNDS}

    @property
    def key_dirs(self) -> tuple[Path, ...]:
        return tuple(Path(p.strip()).expanduser() for p in self.server_keys.split(",") if p.strip())

    @property
    def registry_path(self) -> Path:
        return Path(self.registry_dir).expanduser()

    @property
    def state_path(self) -> Path:
        if self.state_dir:
            return Path(self.state_dir).expanduser()
        return state_dir_for(self.registry_path)

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        return tuple(f.name.replace("_", "-") for f in fields(cls))

    @classmethod
    def from_run_config(cls, config: Mapping[str, Any]) -> ServerSettings:
        """Read this class's keys; other keys (federation, client settings) are left alone."""
        known = {f.name.replace("_", "-"): f.name for f in fields(cls)}
        kwargs = {known[k]: v for k, v in config.items() if k in known}
        for required in ("registry-dir", "server-keys"):
            if required not in config:
                raise ConfigError(
                    f"run config has no {required!r}; pass it with "
                    f'flwr run . --run-config "{required}=..."'
                )
        return cls(**kwargs)


def state_dir_for(registry: Path) -> Path:
    """Default server state folder: ``<registry>.server-state`` beside the registry (the
    registry folder is served to everyone; the server's own state need not be)."""
    registry = Path(registry)
    return registry.with_name(registry.name + ".server-state")


def federation_from_run_config(config: Mapping[str, Any]) -> FederationConfig:
    """The federation: ``federation-file`` (TOML) when set, else the run config's own keys.

    An explicit file wins over run-config federation keys (which may be pyproject defaults);
    each key it overrides with another value is logged.
    """
    path = str(config.get("federation-file", "") or "")
    from_config = FederationConfig.from_run_config(config, ignore_unknown=True)
    if not path:
        return from_config
    from_file = FederationConfig.from_toml(Path(path).expanduser())
    mine, theirs = from_file.to_run_config(), from_config.to_run_config()
    for key in sorted(k for k in mine if k in config and mine[k] != theirs[k]):
        log.warning("federation-file %s sets %s = %r (run config: %r)", path, key, mine[key],
                    theirs[key])  # fmt: skip
    return from_file


def _bad(name: str, value: object, why: str) -> None:
    raise ConfigError(f"server setting {name.replace('_', '-')} = {value!r:.80} {why}")
