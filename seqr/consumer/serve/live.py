"""The registry version being served, and replacing it without downtime.

One base model is loaded (and hash-checked) once. Each registry version gets its own peft model
built on a *structural* copy of it: new module objects whose parameters and buffers are the very
same tensors (``copy.deepcopy`` with every tensor pre-entered in the memo). ``build_peft_model``
wraps the copy's linear layers in place, so versions never see each other's LoRA layers, and
the base weights are never duplicated: a new version costs its LoRA weights and the audit, and
the frozen base weights are read-only for every version at once.

A reload audits first (source.py); only a version that audits AND loads replaces the live one,
by one reference assignment. Requests already bound to the old version (queued or generating)
finish on it (engine.py keeps one batch per live version); the old version is dropped when its
last request is done. A failed reload keeps the old version and is counted and kept for the
page and /metrics.
"""

from __future__ import annotations

import copy
import itertools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import torch

from seqr.consumer.router import RegistryRouter, RouterConfig
from seqr.consumer.serve.scoring import Calibration, FirstPass, module_names, own_calibration
from seqr.consumer.serve.source import RegistrySource
from seqr.core.base_model import BaseModel
from seqr.core.errors import ModelError, SeqrError
from seqr.registry import VerifiedRegistry

log = logging.getLogger("seqr.serve")
AUTO = "auto"


def shared_weight_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` whose modules are new but whose tensors are the same objects."""
    memo: dict[int, Any] = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, memo)


@dataclass(frozen=True)
class ServedVersion:
    """One audited registry version loaded onto the shared base model."""

    router: RegistryRouter
    version: int
    ids: dict[str, int]  # model id -> adapter index (names; a reserved name gets a suffix)
    names: tuple[str, ...]  # model id of each adapter, by index
    shas: tuple[str, ...]  # adapter_sha256 by index
    modules: tuple[str, ...]  # scored LoRA modules, in order
    first_pass: FirstPass  # the routing pass (RegistryRouter's own; scoring.py)
    own: Calibration
    loaded_at: datetime
    build_seconds: float

    @property
    def report(self) -> Any:
        return self.router.report

    @property
    def peft_model(self) -> Any:
        return self.router.routed.peft_model

    def internal(self, index: int | None) -> str:
        """peft adapter name of adapter ``index`` (None: the base model)."""
        return "__base__" if index is None else f"a{index}"


@dataclass(frozen=True)
class ReloadStatus:
    """What the last reload did."""

    at: datetime
    outcome: str  # "loaded", "unchanged" or "failed"
    version: int | None  # the version served afterwards
    message: str
    seconds: float


def build_version(
    base: BaseModel,
    audited: VerifiedRegistry,
    router_config: RouterConfig,
    reserved: tuple[str, ...],
) -> ServedVersion:
    """Load an audited registry onto a structural copy of ``base`` (module docstring)."""
    started = time.perf_counter()
    shared = BaseModel(
        shared_weight_copy(base.model), base.tokenizer, base.path, base.sha256, base.name
    )
    router = RegistryRouter.from_verified(audited, config=router_config, base=shared)
    names, ids = [], {}
    for i, adapter in enumerate(router.adapters):
        name = adapter.name
        if name in reserved:  # "auto" and the base model's id keep their meaning
            name = f"{name}-{adapter.entry.client[7:15]}"
        while name in ids:
            name = f"{name}-{i}"
        names.append(name)
        ids[name] = i
    # The same first pass RegistryRouter routes with; built now (a bf16 copy takes a moment),
    # so the first request after a swap does not pay for it.
    first_pass: FirstPass = router.routed._first_pass()
    modules = module_names(first_pass[1])
    own = own_calibration([a.stats for a in router.adapters], list(modules))
    return ServedVersion(
        router=router,
        version=audited.report.version,
        ids=ids,
        names=tuple(names),
        shas=tuple(a.entry.adapter_sha256 for a in router.adapters),
        modules=modules,
        first_pass=first_pass,
        own=own,
        loaded_at=datetime.now(UTC),
        build_seconds=time.perf_counter() - started,
    )


class LiveRegistry:
    """The current ServedVersion, and ``reload()`` that replaces it only with a better one."""

    def __init__(
        self,
        source: RegistrySource,
        base: BaseModel,
        router_config: RouterConfig,
        *,
        reserved: tuple[str, ...] = (AUTO, "base"),
        on_reload: Callable[[ReloadStatus, ServedVersion], None] | None = None,
    ) -> None:
        self.source, self.base, self.router_config = source, base, router_config
        self.reserved = reserved
        self.on_reload = on_reload
        self._reload_lock = threading.Lock()  # one reload at a time
        started = time.perf_counter()
        self._current = build_version(base, source.audited(), router_config, reserved)
        self.last_reload = ReloadStatus(
            datetime.now(UTC),
            "loaded",
            self._current.version,
            f"version {self._current.version} loaded at start",
            time.perf_counter() - started,
        )

    @property
    def current(self) -> ServedVersion:
        return self._current  # one reference read: a request binds to one whole version

    def reload(self) -> ReloadStatus:
        """Re-read and audit the registry; swap in a newer version that audits and loads."""
        with self._reload_lock:
            started = time.perf_counter()
            live = self._current
            try:
                audited = self.source.audited()
                report = audited.report
                if report.version == live.version and report.tree_root == live.report.tree_root:
                    status = ReloadStatus(
                        datetime.now(UTC),
                        "unchanged",
                        live.version,
                        f"version {live.version} is already served",
                        time.perf_counter() - started,
                    )
                else:
                    if report.version < live.version:  # the trusted state refuses this first
                        raise ModelError(
                            f"registry version {report.version} is older than the served "
                            f"version {live.version}; keeping {live.version}"
                        )
                    new = build_version(self.base, audited, self.router_config, self.reserved)
                    self._current = new  # the swap: requests bound to `live` finish on it
                    status = ReloadStatus(
                        datetime.now(UTC),
                        "loaded",
                        new.version,
                        f"version {new.version} replaced {live.version}",
                        time.perf_counter() - started,
                    )
            except Exception as exc:  # noqa: BLE001 - whatever failed, the old version stays
                message = str(exc) if isinstance(exc, SeqrError) else f"unexpected error: {exc!r}"
                status = ReloadStatus(
                    datetime.now(UTC),
                    "failed",
                    live.version,
                    f"reload failed, still serving version {live.version}: {message}",
                    time.perf_counter() - started,
                )
            self.last_reload = status
            level = logging.WARNING if status.outcome == "failed" else logging.INFO
            log.log(
                level,
                "registry reload %s in %.2f s: %s",
                status.outcome,
                status.seconds,
                status.message,
            )
            if self.on_reload is not None:
                self.on_reload(status, self._current)
            return status
