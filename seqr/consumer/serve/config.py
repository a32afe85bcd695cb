"""How ``seqr serve`` batches, what it accepts from a client, and how it calibrates.

Every bound on what a client may send is here, with its unit, so that one place says what the
server promises to refuse (OpenAI-style 4xx errors, app.py) before any model call.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Literal, get_args

from seqr.core.device import check_device
from seqr.core.errors import ConfigError
from seqr.core.model_routing.config import FIRST_PASS_DTYPES
from seqr.core.model_routing.loss_check import LOSS_CHECK_MARGIN
from seqr.core.model_routing.soft_votes import SOFT_VOTE_TEMPERATURE

Calibration = Literal["queries", "own"]
CALIBRATIONS: tuple[str, ...] = get_args(Calibration)


def _check_ints(obj: object, limits: dict[str, tuple[int, int]]) -> None:
    for name, (low, high) in limits.items():
        value = getattr(obj, name)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ConfigError(
                f"{type(obj).__name__}.{name} = {value!r} must be an integer in [{low}, {high}]"
            )


@dataclass(frozen=True)
class LimitsConfig:
    """What one request may ask for; anything beyond is a 4xx naming the limit."""

    max_body_bytes: int = 1 << 20  # bytes of one request body (413 beyond)
    max_prompt_tokens: int = 1024  # tokens of one prompt after the chat template
    max_tokens: int = 512  # largest max_tokens a request may ask for
    default_max_tokens: int = 16  # completions without max_tokens (OpenAI's default)
    default_chat_max_tokens: int = 256  # chat without max_tokens
    max_n: int = 4  # choices per prompt
    max_prompts: int = 8  # prompts in one completions request (a list)
    max_messages: int = 64  # chat messages in one request
    max_stop: int = 4  # stop strings
    max_stop_chars: int = 64  # characters of one stop string

    def __post_init__(self) -> None:
        _check_ints(
            self,
            {
                "max_body_bytes": (1024, 1 << 30),
                "max_prompt_tokens": (1, 1 << 20),
                "max_tokens": (1, 1 << 20),
                "default_max_tokens": (1, 1 << 20),
                "default_chat_max_tokens": (1, 1 << 20),
                "max_n": (1, 128),
                "max_prompts": (1, 1024),
                "max_messages": (1, 4096),
                "max_stop": (0, 64),
                "max_stop_chars": (1, 4096),
            },
        )
        for name in ("default_max_tokens", "default_chat_max_tokens"):
            if getattr(self, name) > self.max_tokens:
                raise ConfigError(
                    f"LimitsConfig.{name} = {getattr(self, name)} is over max_tokens = "
                    f"{self.max_tokens}"
                )


@dataclass(frozen=True)
class PoolConfig:
    """The query-statistics pool (pool.py): bounded, decaying, no routed adapter dominates."""

    capacity: int = 1024  # per-sequence score vectors kept (the oldest of the largest group go)
    max_share: float = 0.25  # most weight one routed adapter's prompts may carry in the moments
    half_life: int = 512  # prompts after which a pooled prompt's weight has halved
    warm_sequences: int = 64  # pooled prompts scoring an adapter before its moments are used
    warm_adapters: int = 2  # distinct routed adapters the pool must hold before it is used
    refresh_every: int = 16  # prompts between recomputations of the moments
    # How token z-scores under query statistics decide: soft token votes once the pool holds
    # their statistics ("soft_vote", never behind the mean significantly: docs/RESULTS.md), or
    # "mean"
    aggregation: Literal["mean", "soft_vote"] = "soft_vote"
    vote_temperature: float = SOFT_VOTE_TEMPERATURE  # soft_votes.py, z-score units
    # Under soft votes, a prompt whose two best adapters are closer than this (standardised
    # units) goes to the one with the lower loss on the prompt: seqr.core.model_routing.
    # loss_check (two more forward passes of that prompt); 0 turns the check off.
    loss_check_margin: float = LOSS_CHECK_MARGIN

    def __post_init__(self) -> None:
        _check_ints(
            self,
            {
                "capacity": (4, 1 << 20),
                "half_life": (1, 1 << 30),
                "warm_sequences": (2, 1 << 20),
                "warm_adapters": (1, 1 << 20),
                "refresh_every": (1, 1 << 20),
            },
        )
        share = self.max_share
        if (
            isinstance(share, bool)
            or not isinstance(share, (int, float))
            or not math.isfinite(share)
            or not 0 < share <= 1
        ):
            raise ConfigError(f"PoolConfig.max_share = {share!r} must be a number in (0, 1]")
        if self.aggregation not in ("mean", "soft_vote"):
            raise ConfigError(
                f"PoolConfig.aggregation = {self.aggregation!r} must be mean or soft_vote"
            )
        heat = self.vote_temperature
        if isinstance(heat, bool) or not isinstance(heat, (int, float)) or not 0 < heat < 1e6:
            raise ConfigError(f"PoolConfig.vote_temperature = {heat!r} must be a number > 0")
        gap = self.loss_check_margin
        if isinstance(gap, bool) or not isinstance(gap, (int, float)) or not 0 <= gap < 1e6:
            raise ConfigError(
                f"PoolConfig.loss_check_margin = {gap!r} must be a number >= 0 (0: no check)"
            )
        if self.warm_sequences > self.capacity:
            raise ConfigError(
                f"PoolConfig.warm_sequences = {self.warm_sequences} is over capacity = "
                f"{self.capacity}: the pool would never be warm"
            )


@dataclass(frozen=True)
class EngineConfig:
    """The batching engine (engine.py): one thread owns the model."""

    max_batch: int = 32  # sequences decoded together (new ones join between steps)
    queue_size: int = 64  # sequences waiting for a place in the batch (429 beyond)
    device: str = "cpu"  # torch device of the model
    # The routing pass on a copy of the base model in this dtype ("bfloat16": ~2.5x faster on
    # CPUs with AMX, where it keeps auto within 10% of a named adapter at 32 clients; near-ties
    # may flip, as with `seqr route --first-pass-dtype`); None: on the model itself, exactly.
    first_pass_dtype: str | None = None

    def __post_init__(self) -> None:
        _check_ints(self, {"max_batch": (1, 4096), "queue_size": (1, 1 << 20)})
        if self.first_pass_dtype not in (None, *FIRST_PASS_DTYPES):
            raise ConfigError(
                f"EngineConfig.first_pass_dtype = {self.first_pass_dtype!r} must be None or one "
                f"of {FIRST_PASS_DTYPES}"
            )
        check_device(self.device, "EngineConfig.device")


@dataclass(frozen=True)
class ServeConfig:
    """``seqr serve`` as a whole (validated on construction)."""

    host: str = "127.0.0.1"
    port: int = 8000
    calibration: Calibration = "queries"  # query statistics from served prompts, or own only
    refresh_s: float | None = None  # re-read and audit the registry this often (also SIGHUP)
    base_model_id: str = "base"  # the model id that asks for the base model without adapters
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    pool: PoolConfig = field(default_factory=PoolConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)

    def __post_init__(self) -> None:
        _check_ints(self, {"port": (0, 65535)})
        if self.calibration not in CALIBRATIONS:
            raise ConfigError(
                f"ServeConfig.calibration = {self.calibration!r} must be one of {CALIBRATIONS}"
            )
        refresh = self.refresh_s
        if refresh is not None and (
            isinstance(refresh, bool)
            or not isinstance(refresh, (int, float))
            or not math.isfinite(refresh)
            or refresh < 1
        ):
            raise ConfigError(f"ServeConfig.refresh_s = {refresh!r} must be None or >= 1 second")
        if not isinstance(self.host, str) or not self.host:
            raise ConfigError(f"ServeConfig.host = {self.host!r} must be a host name or address")
        if self.base_model_id in ("auto", "") or not isinstance(self.base_model_id, str):
            raise ConfigError(
                f"ServeConfig.base_model_id = {self.base_model_id!r} must be a "
                "non-empty name other than 'auto'"
            )
        for f in fields(self):
            if f.name in ("limits", "pool", "engine"):
                expected = {"limits": LimitsConfig, "pool": PoolConfig, "engine": EngineConfig}
                if not isinstance(getattr(self, f.name), expected[f.name]):
                    raise ConfigError(f"ServeConfig.{f.name} must be a {expected[f.name].__name__}")
        most = self.limits.max_n * self.limits.max_prompts  # sequences one request may queue
        if most > self.engine.queue_size:
            raise ConfigError(
                f"one request may ask for max_n x max_prompts = {most} sequences but the queue "
                f"holds {self.engine.queue_size}; raise EngineConfig.queue_size or lower the limits"
            )
