"""Task groups: clients whose private data belong to one task federate one adapter.

Declared in the run config (flat kebab-case keys, ``GroupSettings``)::

    task-groups = "wiki:wiki0@sha256:9f2c...,wiki1@sha256:41ab...;code:sha256:07d3...,..."

Each group is ``name:member,member,...``, groups separated by ``;``. A member slot is bound to
an enrolled signing KEY, never to a name alone: ``FINGERPRINT`` (as ``seqr keys generate``
prints it) or ``ADAPTER-NAME@FINGERPRINT`` (the node must also use that adapter name: its
``adapter-name`` node setting, or in simulation its data subfolder). A node gets the slot only
by signing the server's fresh challenge with that key (seqr.registry.contribution_records), so
no client can take an offline member's slot or knock out an online one by claiming its name.
The group's adapter is published under the group's name. Clients not in any group keep the
registry flow.

Because every adapter shares the frozen A (FFA-LoRA, Sun et al. ICLR 2024), the server
averages only B: mean_i(B_i A) = (mean_i B_i) A exactly, and only B travels (A is regenerated
from the public seed by everyone). The averaging is Flower's own: FedAvg weighted by the
clients' example counts (McMahan et al. 2017), or, against poisoning, FedTrimmedAvg (Yin et
al. 2018, beta trimmed from each tail), FedMedian or Krum (Blanchard et al. 2017); called
from the ServerApp's custom loop through ``Strategy.configure_train`` / ``aggregate_train``.
Client-level DP wraps FedAvg in Flower's DifferentialPrivacy{Server,Client}SideFixedClipping
(Andrew et al. 2021 / McMahan et al. 2018: clip each client's update of B to an L2 norm C,
add Gaussian noise of std z C / n to the mean), with a privacy accountant.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, Literal, NoReturn, get_args

from seqr.core.errors import ConfigError
from seqr.core.federation import field_kinds

__all__ = [
    "GroupSettings",
    "MemberSlot",
    "parse_task_groups",
    "NodeSubset",
    "make_strategy",
    "WEIGHT_KEY",
    "UNIT_WEIGHT_KEY",
]

WEIGHT_KEY = "num-examples"  # what a member states: its training chunks (signed)
# The FedAvg weight the strategy reads, written by the SERVER into each checked reply: the
# member's capped share of the stated counts (seqr.core.fedavg_weights), or 1 for every
# member under DP (Flower's accounting assumes equal weights). Never a client's number.
UNIT_WEIGHT_KEY = SERVER_WEIGHT_KEY = "server-weight"
GroupAggregation = Literal["fedavg", "fedtrimmedavg", "fedmedian", "krum"]
AGGREGATIONS: tuple[str, ...] = get_args(GroupAggregation)
GroupDp = Literal["none", "server", "client"]  # who clips and noises (server or clients)
DP_MODES: tuple[str, ...] = get_args(GroupDp)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")  # manifest.py's rule for `name`
_FINGERPRINT = re.compile(r"^[a-z0-9-]{1,16}:[0-9a-f]{16,128}$")  # signing.fingerprint's form


@dataclass(frozen=True)
class MemberSlot:
    """One place in a task group: the key that may fill it, and optionally the adapter name
    the node holding that key must use."""

    fingerprint: str  # signing.fingerprint of the member's public key
    name: str | None = None

    @property
    def label(self) -> str:
        return self.name or self.fingerprint

    def __str__(self) -> str:
        return f"{self.name}@{self.fingerprint}" if self.name else self.fingerprint


def parse_task_groups(spec: str) -> dict[str, tuple[MemberSlot, ...]]:
    """``"g:a@KEY1,KEY2;h:..."`` -> {"g": (MemberSlot(KEY1, "a"), MemberSlot(KEY2)), ...};
    ConfigError names the fault."""
    groups: dict[str, tuple[MemberSlot, ...]] = {}
    owner: dict[str, str] = {}
    for part in (p.strip() for p in spec.split(";")):
        if not part:
            continue
        name, sep, members_text = part.partition(":")
        name = name.strip()
        if not sep or not _NAME.match(name):
            _refuse(
                f"task-groups entry {part!r:.80} must be NAME:member,member,... with NAME of "
                "A-Z a-z 0-9 . _ - (e.g. wiki:wiki0@sha256:9f2c...,wiki1@sha256:41ab...)"
            )
        if name in groups:
            _refuse(f"task-groups names group {name!r} twice")
        slots = tuple(_slot(name, m.strip()) for m in members_text.split(",") if m.strip())
        if len(slots) < 2:
            _refuse(f"task group {name!r} has {len(slots)} member(s); it needs >= 2")
        for slot in slots:
            for claim in {slot.fingerprint, slot.name} - {None}:
                if claim in owner:
                    _refuse(
                        f"{claim!r} is in task groups {owner[claim]!r} and {name!r} (or twice "
                        "in one); a client federates one task"
                    )
                owner[str(claim)] = name
        groups[name] = slots
    return groups


def _slot(group: str, text: str) -> MemberSlot:
    name, at, fingerprint = text.rpartition("@")
    if not at:
        name, fingerprint = "", text
    if not _FINGERPRINT.match(fingerprint):
        hint = (
            f"bind it to its client key: {text}@<fingerprint>"
            if _NAME.match(text)
            else "give the key fingerprint, e.g. sha256:9f2c..., or NAME@FINGERPRINT"
        )
        _refuse(
            f"task group {group!r}: member {text!r:.80} names no signing key; {hint} "
            "(`seqr keys generate` prints the fingerprint)"
        )
    if at and not _NAME.match(name):
        _refuse(f"task group {group!r}: member {text!r:.80} has a bad adapter name {name!r:.40}")
    return MemberSlot(fingerprint, name or None)


def _refuse(message: str) -> NoReturn:
    raise ConfigError(message)


@dataclass(frozen=True)
class GroupSettings:
    """Run-config keys of the group flow (kebab-case of the field names)."""

    task_groups: str = ""  # see the module docstring; "" = no groups
    num_group_rounds: int = 3  # FedAvg rounds per group
    group_local_steps: int = 10  # optimizer steps each client takes per round
    group_aggregation: GroupAggregation = "fedavg"
    group_trim_beta: float = 0.2  # FedTrimmedAvg: share cut from each tail, in [0, 0.5)
    group_krum_malicious: int = 0  # Krum: assumed number of malicious clients
    group_dp: GroupDp = "none"
    group_dp_noise_multiplier: float = 1.0  # z: noise std = z * clip / n on the mean of B
    group_dp_clip: float = 0.05  # C: L2 bound on each client's update of B (all modules)
    group_dp_delta: float = 1e-5  # delta at which the spent epsilon is reported
    group_dp_max_epsilon: float = 0.0  # refuse rounds past this epsilon; 0 = no limit
    group_timeout_s: float = 3600.0  # seconds to wait for one group round's replies
    # Bounds on what one member can do to the average (seqr.core.fedavg_weights):
    group_max_examples: int = 10_000_000  # training chunks a member may state; more is refused
    group_max_weight_share: float = 0.5  # FedAvg share of one member, at most (or 1/n)
    # Update bound, in units of train-lr per local step and B entry (RMS): a member's update
    # of B may have ||B_new - B_global||_F <= this * train-lr * group-local-steps *
    # sqrt(entries of B). Adam moves each entry by at most 3.16 lr per step (Kingma & Ba
    # 2015, Sec. 2.1, beta1 0.9, beta2 0.999), so an honest update stays inside 4.
    group_max_update_step: float = 4.0

    def __post_init__(self) -> None:
        for name, kind in field_kinds(type(self)).items():
            value = getattr(self, name)
            ok = (
                isinstance(value, str)
                if kind == "str"
                else (isinstance(value, int) and not isinstance(value, bool))
                if kind == "int"
                else isinstance(value, int | float) and not isinstance(value, bool)
            )
            if not ok:
                _bad(name, value, f"must be of type {kind}")
            if kind == "float":
                object.__setattr__(self, name, float(value))
        self.groups  # noqa: B018 - parse now: a bad spec fails before any training
        checks = (
            ("num_group_rounds", 1 <= self.num_group_rounds <= 10_000, "must be in [1, 10000]"),
            ("group_local_steps", 1 <= self.group_local_steps <= 10**6, "must be in [1, 1e6]"),
            ("group_aggregation", self.group_aggregation in AGGREGATIONS, f"not in {AGGREGATIONS}"),
            ("group_trim_beta", 0 <= self.group_trim_beta < 0.5, "must be in [0, 0.5)"),
            ("group_krum_malicious", self.group_krum_malicious >= 0, "must be >= 0"),
            ("group_dp", self.group_dp in DP_MODES, f"must be one of {DP_MODES}"),
            ("group_dp_noise_multiplier", self.group_dp_noise_multiplier > 0, "must be > 0"),
            ("group_dp_clip", 0 < self.group_dp_clip < float("inf"), "must be finite and > 0"),
            ("group_dp_delta", 0 < self.group_dp_delta < 0.1, "must be in (0, 0.1)"),
            ("group_dp_max_epsilon", self.group_dp_max_epsilon >= 0, "must be >= 0"),
            ("group_timeout_s", self.group_timeout_s > 0, "must be > 0"),
            ("group_max_examples", 1 <= self.group_max_examples <= 2**53, "in [1, 2**53]"),
            ("group_max_weight_share", 0 < self.group_max_weight_share <= 1, "in (0, 1]"),
            ("group_max_update_step", 0 < self.group_max_update_step < 1e6, "in (0, 1e6)"),
        )
        for name, ok, why in checks:
            if not ok:
                _bad(name, getattr(self, name), why)
        if self.group_dp != "none" and self.group_aggregation != "fedavg":
            _bad(
                "group_aggregation",
                self.group_aggregation,
                "must be fedavg with group-dp (Flower's DP accounting assumes a plain mean)",
            )

    @property
    def groups(self) -> dict[str, tuple[MemberSlot, ...]]:
        return parse_task_groups(self.task_groups)

    def max_update_norm(self, train_lr: float, b_entries: int) -> float:
        """The Frobenius bound on one member's update of B (group_max_update_step)."""
        return self.group_max_update_step * train_lr * self.group_local_steps * b_entries**0.5

    @property
    def enabled(self) -> bool:
        return bool(self.groups)

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        return tuple(f.name.replace("_", "-") for f in fields(cls))

    @classmethod
    def from_run_config(cls, config: Mapping[str, Any]) -> GroupSettings:
        """This class's keys of a run config; other keys are left alone."""
        known = {f.name.replace("_", "-"): f.name for f in fields(cls)}
        return cls(**{known[k]: v for k, v in config.items() if k in known})

    def describe_aggregation(self) -> str:
        agg = self.group_aggregation
        if agg == "fedavg":
            if self.group_dp != "none":
                return "fedavg unweighted (DP)"
            return (
                f"fedavg weighted by {WEIGHT_KEY}, each clipped to {self.group_max_examples}, "
                f"share at most {self.group_max_weight_share:g} (or 1/n)"
            )
        if agg == "fedtrimmedavg":
            return f"fedtrimmedavg beta={self.group_trim_beta}"
        if agg == "krum":
            return f"krum malicious={self.group_krum_malicious}"
        return agg


class NodeSubset:
    """The Grid as a strategy sees it, restricted to one group's nodes: Flower's strategies
    sample from ``grid.get_node_ids()``, and a group trains only its own members."""

    def __init__(self, grid: Any, node_ids: Sequence[int]) -> None:
        self._grid = grid
        self._nodes = list(node_ids)

    def get_node_ids(self) -> list[int]:
        return list(self._nodes)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


def make_strategy(settings: GroupSettings, n_nodes: int) -> Any:
    """Flower strategy for one group of ``n_nodes`` (every member trains every round)."""
    from flwr.serverapp.strategy import (
        DifferentialPrivacyClientSideFixedClipping,
        DifferentialPrivacyServerSideFixedClipping,
        FedAvg,
        FedMedian,
        FedTrimmedAvg,
        Krum,
    )

    common: dict[str, Any] = {
        "fraction_train": 1.0,
        "fraction_evaluate": 0.0,
        "min_train_nodes": n_nodes,
        "min_evaluate_nodes": 0,
        "min_available_nodes": n_nodes,
        "weighted_by_key": SERVER_WEIGHT_KEY,  # set by the server in every checked reply
    }
    agg = settings.group_aggregation
    if agg == "fedtrimmedavg":
        strategy: Any = FedTrimmedAvg(**common, beta=settings.group_trim_beta)
    elif agg == "fedmedian":
        strategy = FedMedian(**common)
    elif agg == "krum":
        strategy = Krum(**common, num_malicious_nodes=settings.group_krum_malicious)
    else:
        strategy = FedAvg(**common)
    if settings.group_dp == "none":
        return strategy
    from seqr.operator.group_privacy import make_accountant

    wrapper = (
        DifferentialPrivacyServerSideFixedClipping
        if settings.group_dp == "server"
        else DifferentialPrivacyClientSideFixedClipping
    )
    accountant = make_accountant(
        delta=settings.group_dp_delta,
        population=n_nodes,
        max_epsilon=settings.group_dp_max_epsilon or None,
    )
    return wrapper(
        strategy,
        noise_multiplier=settings.group_dp_noise_multiplier,
        clipping_norm=settings.group_dp_clip,
        num_sampled_clients=n_nodes,
        accountant=accountant,
    )


def _bad(name: str, value: object, why: str) -> None:
    raise ConfigError(f"group setting {name.replace('_', '-')} = {value!r:.80} {why}")
