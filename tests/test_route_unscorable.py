"""A RegistryRouter skips, with a warning naming it, an adapter it cannot score in float32
(huge B, huge claimed mean, a foreign lora_A, statistics unusable on the reference text) and
routes the others exactly as before, under every calibration; it never fails the registry.

The adapters are given to the router directly (as ``from_verified`` does after the audit), so
the test is about the router's own defence, whatever an audit upstream checks."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from _route_world import DOMAINS, RouteWorld, domain_text, make_world
from safetensors.numpy import load, save

from seqr.cli.route import _fail
from seqr.consumer.router import AuditedAdapter, RegistryRouter, RouterConfig, audited_adapters
from seqr.consumer.scorable import gram_overflows
from seqr.core.base_model import load_base_model
from seqr.core.errors import RegistryError
from seqr.core.stats import NormStatistics, RunningMoments
from seqr.registry import audit_registry

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
CALIBRATIONS = ("own", "reference", "blend", "queries")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> RouteWorld:
    return make_world(tmp_path_factory.mktemp("route-world"))


@pytest.fixture(scope="module")
def honest(world: RouteWorld) -> list[AuditedAdapter]:
    return audited_adapters(audit_registry(world.registry))


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("reference")
    for domain in DOMAINS:
        (folder / f"{domain}.txt").write_text(domain_text(domain, 12, seed=7), encoding="utf-8")
    return folder


def _texts() -> list[tuple[str, str]]:
    return [(d, domain_text(d, 3, seed)) for seed in (1, 2) for d in DOMAINS]


def _reweighted(adapter: AuditedAdapter, name: str, change: Any) -> AuditedAdapter:
    tensors = {k: np.array(v) for k, v in load(adapter.weights).items()}
    change(tensors)
    return replace(adapter, name=name, weights=save(tensors))


def _scaled_b(target_max: float) -> Any:
    def change(tensors: dict[str, np.ndarray]) -> None:
        for name, value in tensors.items():
            if ".lora_B." in name and np.abs(value).max() > 0:
                tensors[name] = (value * (target_max / np.abs(value).max())).astype(np.float32)

    return change


def _stats_with_mean(stats: NormStatistics, mean: float) -> NormStatistics:
    return NormStatistics(
        {n: RunningMoments(1, m.count, np.array([mean]), m.m2.copy()) for n, m in
         stats.modules.items()}, score=stats.score,
    )  # fmt: skip


def _attackers(honest: list[AuditedAdapter]) -> dict[str, AuditedAdapter]:
    digits = next(a for a in honest if a.name == "digits")

    def foreign_a(tensors: dict[str, np.ndarray]) -> None:
        name = next(n for n in sorted(tensors) if ".lora_A." in n)
        tensors[name] = tensors[name][:, ::-1].copy()  # same numbers, another A

    return {
        "huge-b": _reweighted(digits, "huge-b", _scaled_b(1e20)),
        "huge-mean": replace(digits, name="huge-mean", stats=_stats_with_mean(digits.stats, 1e39)),
        "foreign-a": _reweighted(digits, "foreign-a", foreign_a),
        # Another LoRA scaling than every other adapter's: one module cannot mix scalings.
        "other-alpha": replace(
            digits, name="other-alpha", manifest=replace(digits.manifest, alpha=3.0)
        ),
    }


def _router(world: RouteWorld, adapters: list[AuditedAdapter], **config: Any) -> RegistryRouter:
    base = load_base_model(str(world.model_dir))  # fresh: peft wraps the model in place
    report = audit_registry(world.registry)
    return RegistryRouter(base, adapters, report, RouterConfig(**config))


@pytest.mark.parametrize("calibration", CALIBRATIONS)
def test_unscorable_adapters_are_skipped_by_name_and_the_rest_routes_as_before(
    world: RouteWorld,
    honest: list[AuditedAdapter],
    reference: Path,
    calibration: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Prepare: the honest registry plus three adapters a router cannot score in float32.
    attackers = _attackers(honest)
    ref = None if calibration == "own" else reference
    texts = [text for _, text in _texts()]
    expected = _router(world, honest, calibration=calibration, reference=ref).route(texts)
    # Execute
    with caplog.at_level(logging.WARNING, logger="seqr.route"):
        router = _router(
            world, [*honest, *attackers.values()], calibration=calibration, reference=ref
        )
        results = router.route(texts)
    # Assert: each attacker skipped with its reason and a warning naming it; the honest
    # adapters route every input exactly as they do without the attackers.
    assert router.names == tuple(a.name for a in honest)
    assert set(router.skipped) == set(attackers)
    assert "B^T B" in router.skipped["huge-b"] and "float32" in router.skipped["huge-b"]
    assert "mean 1e+39" in router.skipped["huge-mean"]
    assert "shared A" in router.skipped["foreign-a"]
    assert "alpha 3" in router.skipped["other-alpha"]
    for name in attackers:
        assert any(name in r.getMessage() for r in caplog.records)
    assert [r.adapter for r in results] == [d for d, _ in _texts()]
    for got, want in zip(results, expected, strict=True):
        assert got.scores == pytest.approx(want.scores, abs=1e-4)


def test_adapter_without_usable_statistics_on_the_reference_text_is_skipped(
    world: RouteWorld, honest: list[AuditedAdapter], reference: Path
) -> None:
    # A zero B is finite everywhere and its own (claimed) statistics are usable, but on the
    # reference text its scores do not vary (std 0): no z-score can be formed for it there.
    zero = _reweighted(honest[0], "zero", _scaled_b(0.0))
    router = _router(world, [*honest, zero], calibration="reference", reference=reference)
    assert router.names == tuple(a.name for a in honest)
    assert "reference text" in router.skipped["zero"]
    # With its own statistics it stays listed, and never wins an input.
    own = _router(world, [*honest, zero])
    assert "zero" in own.names and not own.skipped
    assert all(r.adapter != "zero" for r in own.route([text for _, text in _texts()]))


def test_gram_weights_checked_as_seqr_stores_them() -> None:
    c = np.float32(1.5e19)  # B^T B entries 2.25e38 are finite in float32; doubled, they are not
    b = np.zeros((8, 4), dtype=np.float32)
    b[0, :2] = c
    assert np.isfinite((b.astype(np.float64).T @ b.astype(np.float64)).astype(np.float32)).all()
    assert gram_overflows(b)
    assert not gram_overflows(b / np.float32(1e10))


def test_registry_of_only_unscorable_adapters_is_one_clear_error(
    world: RouteWorld, honest: list[AuditedAdapter]
) -> None:
    with pytest.raises(RegistryError, match="no adapter of the registry can be scored"):
        _router(world, list(_attackers(honest).values()))


def test_route_cli_prints_error_text_escaped(capsys: pytest.CaptureFixture[str]) -> None:
    class Args:
        json, trusted_state = False, None

    _fail(Args(), RegistryError("revoked: \x1b[2J\x1b[31mall clear\x1b[0m\nadmitted"), True)
    err = capsys.readouterr().err
    assert "\x1b" not in err and "\\x1b[2J" in err and "\\x0aadmitted" in err
    assert "RegistryError" not in err  # no class names in human messages
