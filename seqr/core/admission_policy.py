"""What the server admits: the federation's expectations and bounds, and what it saw before.

``AdmissionPolicy`` is one frozen config dataclass that validates itself (security bounds carry
their units, as python-tuf's UpdaterConfig does). ``SeenSubmissions`` is the replay state: the
manifest hashes already admitted and, per key, the newest ``created`` admitted (TUF's rule
that versions never decrease, applied to one client's submissions).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from types import MappingProxyType
from typing import Any, NoReturn

import numpy as np

from seqr.core.errors import ConfigError, FormatError, KeyFileError
from seqr.core.signing import parse_public_key
from seqr.core.stats import SCORE_KINDS, ScoreKind
from seqr.core.strict_json import loads_strict
from seqr.core.value_bounds import StatsBounds, WeightBounds

__all__ = ["AdmissionPolicy", "SeenSubmissions", "WEIGHT_DTYPES"]

WEIGHT_DTYPES = ("BF16", "F16", "F32", "F64")  # safetensors dtypes adapter weights may use
_MAX_SEEN_BYTES = 64 * 1024**2  # bytes; replay state of a very large federation


@dataclass(frozen=True)
class AdmissionPolicy:
    """The federation's expectations of every submission, and the server's bounds."""

    base_model_sha256: str
    a_seed: int
    a_sha256: str
    rank: int
    target_modules: tuple[str, ...]  # LoRA target names as in adapter_config.json (q_proj)
    expected_tensors: Mapping[str, tuple[tuple[int, ...], str]]  # name -> (shape, dtype)
    stats_modules: tuple[str, ...]  # module names that norm_stats.json must hold, no others
    allowed_keys: frozenset[str]  # hex public keys allowed to submit
    revoked_keys: frozenset[str] = frozenset()  # hex public keys never accepted again
    alpha: float | None = None  # None: any lora_alpha (z-scores are scale-invariant)
    stats_score: ScoreKind = "gain"  # what norm_stats.json measures: the federation's score
    # Tensor name -> the federation's shared A (shared_a.generate_shared_a); when given, every
    # listed tensor must equal it bit for bit (both cast to float32; for BF16 weights pass the
    # BF16-rounded A). None: trust the manifest's a_seed and a_sha256 only.
    expected_a: Mapping[str, np.ndarray] | None = field(default=None, compare=False)
    max_adapter_bytes: int = 256 * 1024**2  # bytes, adapter_model.safetensors
    max_header_bytes: int = 1024**2  # bytes, the safetensors JSON header
    max_stats_bytes: int = 1024**2  # bytes, norm_stats.json
    max_config_bytes: int = 64 * 1024  # bytes, adapter_config.json
    max_clock_skew: timedelta = timedelta(minutes=5)  # how far `created` may be in the future
    max_age: timedelta = timedelta(days=7)  # how far `created` may be in the past
    # Numeric bounds (seqr.core.value_bounds, which says where the defaults come from): every
    # tensor and every statistic must be usable in float32, the dtype routers compute in.
    max_tensor_norm: float = WeightBounds.max_tensor_norm  # Frobenius norm of one tensor
    min_stats_count: int = StatsBounds.min_count  # norm values (tokens) behind each module
    max_stats_mean: float = StatsBounds.max_mean  # claimed mean, in units of the score
    min_stats_std: float = StatsBounds.min_std  # claimed std, in units of the score
    max_stats_std: float = StatsBounds.max_std  # claimed std, in units of the score
    # check_stats_plausible: probe spreads the claimed mean may sit below the probe median. 4:
    # honest SmolLM2 adapters of the ten-domain simulation sat up to 2.82 below on one of 210
    # modules (shakespeare, seed 1: refused under the old bound 2, docs/RESULTS.md). Looser costs
    # nothing measured: at 2 a careful liar already took every input under own statistics, and
    # query statistics ignore claims (seqr bench hijack).
    max_mean_z: float = 4.0
    # check_stats_plausible: probe stds the claimed mean may sit ABOVE the probe mean. Honest
    # adapters sit higher on their own data than on probe text: the 10 real SmolLM2 adapters of
    # the baseline simulation at most 3.44 (fortunes_de), tiny test adapters 0.40; 100 is 29x.
    max_mean_z_above: float = 100.0
    max_sigma_ratio: float = 3.0  # check_stats_plausible: probe std / claimed std at most this

    def __post_init__(self) -> None:
        for key in ("base_model_sha256", "a_sha256"):
            value = getattr(self, key)
            if not (isinstance(value, str) and len(value) == 64 and _is_lower_hex(value)):
                _bad(key, value, "must be 64 lowercase hex digits (sha256)")
        _int_in(self, "a_seed", 0, 2**63 - 1)
        _int_in(self, "rank", 1, 4096)
        modules = tuple(self.target_modules)
        if not modules or len(set(modules)) != len(modules):
            _bad("target_modules", modules, "must be non-empty and without duplicates")
        object.__setattr__(self, "target_modules", tuple(sorted(modules)))
        if self.stats_score not in SCORE_KINDS:
            _bad("stats_score", self.stats_score, f"must be one of {SCORE_KINDS}")
        stats_modules = tuple(self.stats_modules)
        if not stats_modules or len(set(stats_modules)) != len(stats_modules):
            _bad("stats_modules", stats_modules, "must be non-empty and without duplicates")
        object.__setattr__(self, "stats_modules", tuple(sorted(stats_modules)))
        object.__setattr__(self, "expected_tensors", _tensor_specs(self.expected_tensors))
        allowed = _keys("allowed_keys", self.allowed_keys)
        if not allowed:
            _bad("allowed_keys", allowed, "is empty: every submission would be refused")
        object.__setattr__(self, "allowed_keys", allowed)
        object.__setattr__(self, "revoked_keys", _keys("revoked_keys", self.revoked_keys))
        if self.alpha is not None and not (
            isinstance(self.alpha, int | float) and math.isfinite(self.alpha) and self.alpha > 0
        ):
            _bad("alpha", self.alpha, "must be None or a finite number > 0")
        if self.expected_a is not None:
            object.__setattr__(self, "expected_a", self._checked_expected_a(self.expected_a))
        for key in ("max_adapter_bytes", "max_header_bytes", "max_stats_bytes", "max_config_bytes"):
            _int_in(self, key, 1, 2**40)
        # Building the bound objects validates them (ConfigError names the field).
        try:
            self.weight_bounds  # noqa: B018
            self.stats_bounds  # noqa: B018
        except ConfigError as exc:
            raise ConfigError(f"admission policy: {exc}") from None
        for key in ("max_clock_skew", "max_age"):
            value = getattr(self, key)
            if not isinstance(value, timedelta) or value < timedelta(0):
                _bad(key, value, "must be a non-negative timedelta")
        if not (math.isfinite(self.max_mean_z) and self.max_mean_z >= 0):
            _bad("max_mean_z", self.max_mean_z, "must be finite and >= 0 (probe stds)")
        if not (math.isfinite(self.max_sigma_ratio) and self.max_sigma_ratio >= 1):
            _bad("max_sigma_ratio", self.max_sigma_ratio, "must be finite and >= 1")
        if not (math.isfinite(self.max_mean_z_above) and self.max_mean_z_above >= 0):
            _bad("max_mean_z_above", self.max_mean_z_above, "must be finite and >= 0")

    @property
    def weight_bounds(self) -> WeightBounds:
        """The tensor bounds, for seqr.core.value_bounds.check_weights."""
        return WeightBounds(max_tensor_norm=self.max_tensor_norm)

    @property
    def stats_bounds(self) -> StatsBounds:
        """The statistics bounds, for seqr.core.value_bounds.check_statistics."""
        return StatsBounds(
            min_count=self.min_stats_count,
            max_mean=self.max_stats_mean,
            min_std=self.min_stats_std,
            max_std=self.max_stats_std,
        )

    @property
    def plausibility(self) -> dict[str, float]:
        """Keyword arguments of check_stats_plausible."""
        return {
            "max_mean_z": self.max_mean_z,
            "max_mean_z_above": self.max_mean_z_above,
            "max_sigma_ratio": self.max_sigma_ratio,
        }

    def _checked_expected_a(self, expected_a: Mapping[str, Any]) -> Mapping[str, np.ndarray]:
        out = {}
        for name, a in expected_a.items():
            array = np.asarray(a.detach().cpu().numpy() if hasattr(a, "detach") else a)
            spec = self.expected_tensors.get(name)
            if spec is None or tuple(array.shape) != spec[0]:
                _bad("expected_a", name, "must name a tensor of expected_tensors with its shape")
            out[name] = array
        return MappingProxyType(out)


@dataclass
class SeenSubmissions:
    """Replay state: admitted manifest hashes, and per key the newest admitted ``created``.

    ``admit`` only reads it; the server calls ``record`` once it has accepted a submission,
    and persists it with ``to_json_bytes`` so a restart does not reopen old submissions.
    """

    manifest_hashes: set[str] = field(default_factory=set)
    last_created: dict[str, datetime] = field(default_factory=dict)  # public key hex -> time

    def record(self, manifest_sha256: str, public_key: str, created: datetime) -> None:
        self.manifest_hashes.add(manifest_sha256)
        previous = self.last_created.get(public_key)
        if previous is None or created > previous:
            self.last_created[public_key] = created

    def to_json_bytes(self) -> bytes:
        return json.dumps(
            {
                "manifest_hashes": sorted(self.manifest_hashes),
                "last_created": {k: v.isoformat() for k, v in sorted(self.last_created.items())},
            },
            sort_keys=True,
            separators=(",", ":"),
        ).encode()

    @classmethod
    def from_json_bytes(cls, data: bytes) -> SeenSubmissions:
        obj = loads_strict(data, what="replay state", max_bytes=_MAX_SEEN_BYTES)
        if not isinstance(obj, dict) or set(obj) != {"manifest_hashes", "last_created"}:
            raise FormatError("replay state must hold exactly manifest_hashes and last_created")
        hashes, last = obj["manifest_hashes"], obj["last_created"]
        if not isinstance(hashes, list) or not all(
            isinstance(h, str) and len(h) == 64 and _is_lower_hex(h) for h in hashes
        ):
            raise FormatError("replay state manifest_hashes must be a list of sha256 hex strings")
        if not isinstance(last, dict) or not all(isinstance(v, str) for v in last.values()):
            raise FormatError("replay state last_created must map keys to ISO-8601 times")
        try:
            times = {k: datetime.fromisoformat(v) for k, v in last.items()}
        except ValueError as exc:
            raise FormatError(f"replay state holds a bad time: {exc}") from None
        if any(t.utcoffset() is None for t in times.values()):
            raise FormatError("replay state times must carry a timezone")
        return cls(set(hashes), times)


def _tensor_specs(specs: Mapping[str, Any]) -> Mapping[str, tuple[tuple[int, ...], str]]:
    if not isinstance(specs, Mapping) or not specs:
        _bad("expected_tensors", specs, "must map at least one tensor name to (shape, dtype)")
    out: dict[str, tuple[tuple[int, ...], str]] = {}
    for name, spec in specs.items():
        try:
            shape, dtype = spec
            shape = tuple(int(d) for d in shape)
        except (TypeError, ValueError):
            _bad(f"expected_tensors[{name!r}]", spec, "must be (shape tuple, dtype str)")
        if any(d < 0 for d in shape):
            _bad(f"expected_tensors[{name!r}]", shape, "has a negative dimension")
        if dtype not in WEIGHT_DTYPES:
            _bad(f"expected_tensors[{name!r}]", dtype, f"dtype must be one of {WEIGHT_DTYPES}")
        out[str(name)] = (shape, dtype)
    return MappingProxyType(out)


def _keys(key: str, values: Any) -> frozenset[str]:
    if isinstance(values, str):
        _bad(key, values, "must be a set of hex keys, not one string")
    out = set()
    for value in values:
        try:
            out.add(parse_public_key(str(value), what=f"a key in {key}").hex())
        except KeyFileError as exc:
            raise ConfigError(f"admission policy {key}: {exc}") from None
    return frozenset(out)


def _int_in(policy: AdmissionPolicy, key: str, low: int, high: int) -> None:
    value = getattr(policy, key)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        _bad(key, value, f"must be an integer in [{low}, {high}]")


def _is_lower_hex(text: str) -> bool:
    return all(c in "0123456789abcdef" for c in text)


def _bad(key: str, value: object, why: str) -> NoReturn:
    raise ConfigError(f"admission policy {key} = {value!r:.80} {why}")
