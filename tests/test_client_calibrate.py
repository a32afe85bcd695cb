"""Calibration: exact per-module norms ||B A x||, documented inputs, and DP on the moments."""

from __future__ import annotations

import contextlib
import math

import numpy as np
import pytest
import torch
from tiny import copy_texts, tiny_model_dir

from seqr.core.base_model import load_base_model
from seqr.core.federation import FederationConfig
from seqr.core.shared_a import lora_layers
from seqr.core.stats import NormStatistics
from seqr.core.textdata import load_text_data
from seqr.node.calibrate import _privatize, analytic_gaussian_sigma, calibrate, pick_sequences
from seqr.node.train import make_lora_model, train_adapter

FED = FederationConfig(
    lora_rank=4, train_steps=6, train_batch_size=4, train_seq_len=32, train_lr=1e-2,
    calib_max_sequences=12,
)  # fmt: skip


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    base = load_base_model(str(tiny_model_dir()))
    folder = copy_texts(tmp_path_factory.mktemp("data"), ("bisect.py", "heapq.py"))
    data = load_text_data(folder, base.tokenizer, seq_len=32, heldout_fraction=0.1, seed=0)
    model, a_sha = make_lora_model(base.model, FED)
    train_adapter(model, data.train, FED, a_sha256=a_sha, progress=False)
    return model, data.train


def _reference_norms(
    model, chunks: np.ndarray, active: bool, score: str = "norm"
) -> dict[str, np.ndarray]:  # type: ignore[no-untyped-def]
    """||B A x|| from each LoRA layer's own forward: (layer(x) - base_layer(x)) / scaling;
    for "gain" divided by ||A x||."""
    inputs: dict[str, torch.Tensor] = {}
    layers = lora_layers(model, "default")
    hooks = [
        layer.register_forward_hook(
            lambda m, args, out, name=name: inputs.__setitem__(name, args[0])
        )
        for name, layer in layers.items()
    ]
    ctx = model.disable_adapter() if not active else contextlib.nullcontext()
    with torch.no_grad(), ctx:
        model(input_ids=torch.from_numpy(chunks))
    for h in hooks:
        h.remove()
    out = {}
    with torch.no_grad():  # adapter enabled again here
        for name, layer in layers.items():
            x = inputs[name]
            delta = (layer(x) - layer.base_layer(x)) / layer.scaling["default"]
            values = delta.norm(dim=-1)
            if score == "gain":
                values = values / layer.lora_A["default"](x).norm(dim=-1)
            # The token rule (seqr.core.measurement): not the first token of each chunk.
            out[name] = values[:, 1:].reshape(-1).double().numpy()
    return out


@pytest.mark.parametrize(("active", "score"), [(False, "norm"), (True, "norm"), (False, "gain")])
def test_statistics_equal_values_computed_from_layer_outputs(
    trained, active: bool, score: str
) -> None:  # type: ignore[no-untyped-def]
    model, chunks = trained
    fed = FED.replace(calib_lora_active=active, calib_score=score)
    result = calibrate(model, chunks, fed, progress=False, batch_size=5)
    picked = chunks[pick_sequences(len(chunks), fed)]
    assert result.sequences == 12 and result.tokens == 12 * 32 and result.privacy is None
    assert result.stats.score == score
    reference = _reference_norms(model, picked, active, score)
    assert sorted(result.stats.modules) == sorted(reference)
    for name, moments in result.stats.modules.items():
        assert moments.count == 12 * 31
        assert moments.mean[0] == pytest.approx(reference[name].mean(), rel=1e-4)
        assert moments.std[0] == pytest.approx(reference[name].std(), rel=1e-3)


def test_lora_active_changes_only_inputs_after_the_first_adapted_module(trained) -> None:  # type: ignore[no-untyped-def]
    model, chunks = trained
    off = calibrate(model, chunks, FED, progress=False).stats.modules
    on = calibrate(model, chunks, FED.replace(calib_lora_active=True), progress=False).stats.modules
    first = "model.layers.0.self_attn.q_proj"  # its input comes before any LoRA
    assert on[first].mean[0] == pytest.approx(off[first].mean[0], rel=1e-6)
    later = "model.layers.1.self_attn.v_proj"
    assert on[later].mean[0] != pytest.approx(off[later].mean[0], rel=1e-6)


def test_limits_pick_the_tighter_bound() -> None:
    fed = FED.replace(calib_max_sequences=100, calib_max_tokens=5 * 32 + 7)
    idx = pick_sequences(50, fed)
    assert len(idx) == 5 and np.all(np.diff(idx) > 0)
    assert len(pick_sequences(3, fed)) == 3


def test_analytic_gaussian_meets_delta_and_beats_classic() -> None:
    for eps in (0.1, 0.5, 0.9):
        sigma = analytic_gaussian_sigma(eps, 1e-5, 1.0)
        classic = math.sqrt(2 * math.log(1.25 / 1e-5)) / eps  # Dwork & Roth Thm A.1, eps < 1
        assert sigma < classic
        phi = lambda t: 0.5 * math.erfc(-t / math.sqrt(2))  # noqa: E731
        achieved = phi(1 / (2 * sigma) - eps * sigma) - math.exp(eps) * phi(
            -1 / (2 * sigma) - eps * sigma
        )
        assert achieved <= 1e-5 and achieved == pytest.approx(1e-5, rel=1e-3)
    assert analytic_gaussian_sigma(1.0, 1e-5, 3.0) == pytest.approx(
        3 * analytic_gaussian_sigma(1.0, 1e-5, 1.0)
    )


def test_dp_noise_has_the_documented_scale() -> None:
    fed = FED.replace(calib_dp=True, calib_dp_epsilon=2.0, calib_dp_clip=0.5)
    rng = np.random.default_rng(0)
    big = {f"m{i}": np.array([1e9, 0.25e9, 0.1e9]) for i in range(4)}  # many tokens: no clamping
    draws = np.array([
        [m.count for m in _privatize(big, fed, rng)[0].modules.values()] for _ in range(400)
    ])  # fmt: skip
    _, privacy = _privatize(big, fed, rng)
    sigma = analytic_gaussian_sigma(2.0, fed.calib_dp_delta, math.sqrt(3 * 4))
    assert privacy["noise_std"]["count"] == pytest.approx(sigma * 32)
    assert draws.std() == pytest.approx(sigma * 32, rel=0.1)
    assert privacy["epsilon"] == 2.0 and privacy["delta"] == fed.calib_dp_delta


def test_dp_statistics_near_the_truth_with_large_epsilon(trained) -> None:  # type: ignore[no-untyped-def]
    model, chunks = trained
    many = FED.replace(calib_max_sequences=96)  # DP needs data: noise shrinks as 1/n
    exact = calibrate(model, chunks, many, progress=False).stats.modules
    clip = 2 * max(float(m.mean[0] + 4 * m.std[0]) for m in exact.values())  # clipping is rare
    fed = many.replace(calib_dp=True, calib_dp_epsilon=100.0, calib_dp_clip=clip)
    noisy = calibrate(model, chunks, fed, progress=False, rng=np.random.default_rng(1))
    assert noisy.privacy is not None and noisy.privacy["epsilon"] == 100.0
    signed = NormStatistics.from_json_bytes(noisy.stats.to_json_bytes())  # what the server gets
    assert signed.privacy == noisy.privacy
    assert set(noisy.stats.modules) == set(exact)
    noise = noisy.privacy["noise_std"]
    for name, m in noisy.stats.modules.items():
        truth = exact[name]
        # mean = (S + e_S) / (n + e_n): error std about sqrt(s_S^2 + mean^2 s_n^2) / n.
        err = math.hypot(noise["sum"], truth.mean[0] * noise["count"]) / truth.count
        assert abs(m.mean[0] - truth.mean[0]) < 5 * err < 0.5 * truth.mean[0]
        assert abs(m.count - exact[name].count) < 6 * noisy.privacy["noise_std"]["count"]
