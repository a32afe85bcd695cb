"""Federation settings shared by every client and the server (no Flower here).

One frozen, validated dataclass. It travels as a flat kebab-case dict (a Flower run config or a
``ConfigRecord``: values are bool/int/float/str only) and is read from TOML files with the same
keys. Every party must agree on all of it: the base model hash, the LoRA shape, the public seed of
the shared frozen A (FFA-LoRA, Sun et al. ICLR 2024), and how statistics are calibrated
(SEQR, arXiv 2509.18093: z-scores need statistics measured the same way by everyone).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import stat
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal, get_origin, get_type_hints

from seqr.core.errors import ConfigError
from seqr.core.stats import SCORE_KINDS, ScoreKind

DEFAULT_BASE_MODEL = "SmolLM2-135M-Instruct"

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_MODULE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*$")
_MAX_INT64 = 2**63 - 1
MAX_FEDERATION_BYTES = 1024 * 1024  # bytes; a federation file holds a few dozen keys


ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class FederationConfig:
    """Everything clients and server must share. Empty hash strings mean "not pinned yet"."""

    base_model: str = DEFAULT_BASE_MODEL  # a known name (see base_model.py) or a local folder
    base_model_sha256: str = ""  # seqr model hash (base_model.model_sha256); "" = record only
    lora_rank: int = 8  # r, as in the SEQR paper's experiments
    lora_alpha: int = 16
    # Every linear projection of a Llama-style block: on SmolLM2 the inputs of the MLP and
    # output projections separate domains far better than those of q/v (README, "Accuracy").
    lora_target_modules: tuple[str, ...] = ALL_LINEAR
    a_seed: int = 0  # public seed of the shared frozen A (shared_a.py)
    a_sha256: str = ""  # hash of all shared A matrices; "" = computed and filled in
    calib_max_sequences: int = 256  # sequences of train_seq_len tokens used for statistics
    calib_max_tokens: int = 32768  # tokens; the tighter of the two limits wins
    calib_lora_active: bool = False  # False: statistics on the base model's module inputs
    # What is z-scored: "gain" = ||B A x|| / ||A x|| (seqr.core.routing.gain), or "norm".
    calib_score: ScoreKind = "gain"
    calib_dp: bool = False  # Gaussian mechanism on clipped (count, sum, sum of squares)
    calib_dp_epsilon: float = 1.0
    calib_dp_delta: float = 1e-5
    calib_dp_clip: float = 1.0  # C: each token norm ||B A x|| is clipped to C
    train_steps: int = 100  # optimizer steps; ignored when train_tokens > 0
    train_tokens: int = 0  # token budget; > 0 sets steps = ceil(tokens / (batch * seq_len))
    train_lr: float = 2e-3
    train_batch_size: int = 8  # sequences per step
    train_seq_len: int = 128  # tokens per sequence (chunk length)
    train_max_grad_norm: float = 1.0  # 0 disables gradient clipping
    train_heldout_fraction: float = 0.1  # share of chunks kept out of training
    data_seed: int = 0  # split and data order

    def __post_init__(self) -> None:
        # Run configs carry lists as comma-separated strings; TOML may give a list.
        modules = self.lora_target_modules
        if isinstance(modules, str):
            modules = tuple(m.strip() for m in modules.split(",") if m.strip())
        elif isinstance(modules, list | tuple):
            modules = tuple(modules)
        object.__setattr__(self, "lora_target_modules", modules)
        for name, kind in field_kinds(type(self)).items():
            _check_type(name, getattr(self, name), kind)
            if kind == "float":  # TOML and run configs may give 16 for 16.0
                object.__setattr__(self, name, float(getattr(self, name)))
        self._check_ranges()

    def _check_ranges(self) -> None:
        _need(bool(self.base_model.strip()), "base_model", self.base_model, "must not be empty")
        for key in ("base_model_sha256", "a_sha256"):
            value = getattr(self, key)
            _need(value == "" or bool(_SHA256.match(value)), key, value, "must be 64 hex digits")
        _need(1 <= self.lora_rank <= 256, "lora_rank", self.lora_rank, "must be in [1, 256]")
        _need(1 <= self.lora_alpha <= 4096, "lora_alpha", self.lora_alpha, "must be in [1, 4096]")
        mods = self.lora_target_modules
        _need(len(mods) > 0, "lora_target_modules", mods, "must name at least one module")
        _need(len(set(mods)) == len(mods), "lora_target_modules", mods, "has duplicates")
        for m in mods:
            _need(
                isinstance(m, str) and bool(_MODULE.match(m)), "lora_target_modules", m, "bad name"
            )
        _need(0 <= self.a_seed <= _MAX_INT64, "a_seed", self.a_seed, "must be in [0, 2**63-1]")
        _need(
            self.calib_max_sequences >= 1, "calib_max_sequences", self.calib_max_sequences, ">= 1"
        )
        _need(self.calib_score in SCORE_KINDS, "calib_score", self.calib_score, f"in {SCORE_KINDS}")
        _need(self.calib_max_tokens >= 1, "calib_max_tokens", self.calib_max_tokens, "must be >= 1")
        eps = self.calib_dp_epsilon
        _need(0 < eps <= 100, "calib_dp_epsilon", eps, "must be in (0, 100]")
        delta = self.calib_dp_delta
        _need(0 < delta < 0.1, "calib_dp_delta", delta, "must be in (0, 0.1)")
        clip = self.calib_dp_clip
        _need(0 < clip < math.inf, "calib_dp_clip", clip, "must be finite and > 0")
        _need(
            1 <= self.train_steps <= 10**7, "train_steps", self.train_steps, "must be in [1, 1e7]"
        )
        _need(0 <= self.train_tokens <= 10**13, "train_tokens", self.train_tokens, "in [0, 1e13]")
        _need(0 < self.train_lr <= 1, "train_lr", self.train_lr, "must be in (0, 1]")
        bs = self.train_batch_size
        _need(1 <= bs <= 4096, "train_batch_size", bs, "must be in [1, 4096]")
        sl = self.train_seq_len
        _need(8 <= sl <= 32768, "train_seq_len", sl, "must be in [8, 32768]")
        g = self.train_max_grad_norm
        _need(0 <= g < math.inf, "train_max_grad_norm", g, "must be finite and >= 0")
        h = self.train_heldout_fraction
        _need(0 <= h <= 0.9, "train_heldout_fraction", h, "must be in [0, 0.9]")
        _need(0 <= self.data_seed <= _MAX_INT64, "data_seed", self.data_seed, "in [0, 2**63-1]")

    # ---- derived values -------------------------------------------------------------------

    @property
    def steps(self) -> int:
        """Optimizer steps: the token budget when set, else train_steps."""
        if self.train_tokens > 0:
            return max(
                1, math.ceil(self.train_tokens / (self.train_batch_size * self.train_seq_len))
            )
        return self.train_steps

    def replace(self, **changes: Any) -> FederationConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def fingerprint(self) -> str:
        """sha256 of the canonical JSON of the run config: names this exact configuration."""
        blob = json.dumps(self.to_run_config(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()

    # ---- (de)serialisation ----------------------------------------------------------------

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        """The run-config keys (kebab-case) this class reads and writes."""
        return tuple(_kebab(f.name) for f in fields(cls))

    def to_run_config(self) -> dict[str, bool | int | float | str]:
        """Flat kebab-case dict for a Flower run config / ConfigRecord."""
        out: dict[str, bool | int | float | str] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[_kebab(f.name)] = ",".join(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_run_config(
        cls, config: Mapping[str, Any], *, ignore_unknown: bool = False
    ) -> FederationConfig:
        """Read kebab-case keys; unknown keys are a ConfigError unless ``ignore_unknown``.

        A server reading its own run config (which also holds server-only keys) passes
        ``ignore_unknown=True``; a client reading what the server sent does not.
        """
        known = {_kebab(f.name): f.name for f in fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in config.items():
            if key not in known:
                if ignore_unknown:
                    continue
                raise ConfigError(
                    f"unknown federation key {key!r} (value {value!r}); "
                    f"known keys: {', '.join(sorted(known))}"
                )
            kwargs[known[key]] = value
        return cls(**kwargs)

    @classmethod
    def from_toml(cls, path: str | Path) -> FederationConfig:
        """Read a TOML file of kebab-case keys, at top level or inside a ``[federation]`` table."""
        path = Path(path)
        try:
            data = tomllib.loads(_read_federation_file(path).decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise ConfigError(f"federation file {path} is not UTF-8 text: {exc.reason}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"federation file {path} is not valid TOML: {exc}") from None
        if set(data) == {"federation"} and isinstance(data["federation"], dict):
            data = data["federation"]
        try:
            return cls.from_run_config(data)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None


def _read_federation_file(path: Path) -> bytes:
    """The file's bytes; ConfigError in words (never a raw errno) for a folder, a missing
    file, a FIFO or device (opened non-blocking, never read) or a file over the size cap."""
    if path.is_dir():
        raise ConfigError(
            f"federation file {path} is a folder; give the TOML file itself "
            f"(e.g. {path / 'federation.toml'})"
        )
    if not path.exists():
        raise ConfigError(f"federation file {path} does not exist; check the path")
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        raise ConfigError(f"cannot read federation file {path}: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as handle:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ConfigError(f"federation file {path} is not a regular file (a FIFO or device?)")
        data = handle.read(MAX_FEDERATION_BYTES + 1)
    if len(data) > MAX_FEDERATION_BYTES:
        raise ConfigError(
            f"federation file {path} is over {MAX_FEDERATION_BYTES} bytes; it holds a few keys"
        )
    return data


def _kebab(name: str) -> str:
    return name.replace("_", "-")


def _need(ok: bool, key: str, value: object, why: str) -> None:
    if not ok:
        raise ConfigError(f"federation setting {_kebab(key)} = {value!r} {why}")


_FIELD_KINDS: dict[type, dict[str, str]] = {}  # per settings class, resolved once


def field_kinds(cls: type) -> dict[str, str]:
    """Each dataclass field's type as written ("int", "float", "str", "tuple[str, ...]"), a
    Literal of strings read as "str": its value is checked against its choices apart."""
    if cls not in _FIELD_KINDS:
        hints = get_type_hints(cls)
        _FIELD_KINDS[cls] = {
            f.name: "str" if get_origin(hints[f.name]) is Literal else str(f.type)
            for f in fields(cls)
        }
    return _FIELD_KINDS[cls]


def _check_type(key: str, value: object, expected: str) -> None:
    ok: bool
    if expected == "bool":
        ok = isinstance(value, bool)
    elif expected == "int":
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif expected == "float":
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        if ok and not math.isfinite(float(value)):  # type: ignore[arg-type]
            raise ConfigError(f"federation setting {_kebab(key)} = {value!r} must be finite")
    elif expected == "str":
        ok = isinstance(value, str)
    else:  # tuple[str, ...]
        ok = isinstance(value, tuple) and all(isinstance(v, str) for v in value)
    if not ok:
        raise ConfigError(
            f"federation setting {_kebab(key)} = {value!r} has type {type(value).__name__}, "
            f"expected {expected}"
        )
