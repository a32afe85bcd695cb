"""The plausibility probe: exact norms on public text, honest statistics pass, lies do not."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from types import MappingProxyType

import numpy as np
import pytest
import torch
from _server_world import (
    Client,
    base_model,
    federation_setup,
    lying_stats,
    make_client,
    now,
    probe,
)
from peft import PeftModel
from tiny import tiny_model_dir

from seqr.core.admission import AdmittedAdapter, SeenSubmissions, admit
from seqr.core.base_model import load_base_model
from seqr.core.errors import AdmissionError, DataError
from seqr.core.shared_a import lora_layers
from seqr.core.stats import NormStatistics
from seqr.operator.probe import BUILTIN_PROBE_FILES, load_probe_texts, probe_chunks

BOUNDS = {"max_sigma_ratio": 3.0, "max_mean_z": 1.0}


@pytest.fixture(scope="module")
def clients(tmp_path_factory: pytest.TempPathFactory) -> list[Client]:
    root = tmp_path_factory.mktemp("clients")
    return [make_client(root, i) for i in range(2)]


def admitted(client: Client) -> AdmittedAdapter:
    policy = federation_setup().policy({client.public_hex})
    return admit(client.files(), policy, seen=SeenSubmissions(), now=now())


def with_stats(adapter: AdmittedAdapter, stats: NormStatistics) -> AdmittedAdapter:
    return replace(adapter, stats=stats)


def test_probe_scores_equal_the_lora_layers_own_outputs(clients: list[Client]) -> None:
    """Reference: peft's layer with the adapter on, minus its base layer, over alpha/r, per
    unit ||A x|| (the federation's gain), on each module's input recorded while the adapter
    is OFF (calibration's convention), without the first token of each chunk (token rule)."""
    base = load_base_model(str(tiny_model_dir()))  # peft changes the model it wraps
    model = PeftModel.from_pretrained(base.model, str(clients[0].export_dir))
    chunks = probe_chunks(load_probe_texts(""), base.tokenizer, 32, 1024)
    inputs: dict[str, list[torch.Tensor]] = {}
    layers = lora_layers(model, "default")
    hooks = [
        layer.register_forward_hook(
            lambda m, args, out, n=name: inputs.setdefault(n, []).append(args[0])
        )
        for name, layer in layers.items()
    ]
    with torch.no_grad(), model.disable_adapter():
        for i in range(0, len(chunks), 8):
            model(input_ids=torch.from_numpy(chunks[i : i + 8]))
    for h in hooks:
        h.remove()
    assert probe().score == "gain" and probe().tokens == chunks.size
    scores = probe().scores(admitted(clients[0]).tensors)
    with torch.no_grad():
        for name, layer in layers.items():
            x = torch.cat(inputs[name])  # (N, 32, d_in)
            delta = (layer(x) - layer.base_layer(x)) / layer.scaling["default"]
            gains = delta.norm(dim=-1) / layer.lora_A["default"](x).norm(dim=-1)
            reference = gains[:, 1:].reshape(-1).double().numpy()
            assert scores[name].shape == reference.shape == (len(chunks) * 31,)
            np.testing.assert_allclose(scores[name], reference, rtol=2e-4, atol=1e-7)
            rows = probe().sequences[name]
            assert rows.tolist() == np.repeat(np.arange(len(chunks)), 31).tolist()


def test_honest_statistics_from_the_real_calibration_pass(clients: list[Client]) -> None:
    for client in clients:
        probe().check(admitted(client), **BOUNDS)  # raises if implausible


@pytest.mark.parametrize(
    ("mean_factor", "std_factor", "what"),
    [(0.2, 1.0, "mean"), (1.0, 0.05, "std"), (0.1, 0.01, "mean")],
)
def test_lying_statistics_are_implausible(
    clients: list[Client], mean_factor: float, std_factor: float, what: str
) -> None:
    adapter = admitted(clients[0])
    liar = with_stats(adapter, lying_stats(adapter.stats, mean_factor, std_factor))
    with pytest.raises(AdmissionError, match=f"claimed {what}") as info:
        probe().check(liar, **BOUNDS)
    assert info.value.reason == "implausible_stats"


def test_claiming_larger_norms_only_hurts_the_claimant_and_passes(clients: list[Client]) -> None:
    adapter = admitted(clients[0])
    probe().check(with_stats(adapter, lying_stats(adapter.stats, 3.0, 2.0)), **BOUNDS)


def test_claimed_mean_far_above_the_probe_refused_with_its_own_message(
    clients: list[Client],
) -> None:
    adapter = admitted(clients[0])
    policy = federation_setup().policy({clients[0].public_hex})  # the defaults, as served
    probe().check(with_stats(adapter, lying_stats(adapter.stats, 3.0, 1.0)), **policy.plausibility)
    with pytest.raises(AdmissionError, match="probe spreads ABOVE the probe median") as info:
        probe().check(
            with_stats(adapter, lying_stats(adapter.stats, 1e5, 1.0)), **policy.plausibility
        )
    assert info.value.reason == "implausible_stats"


def test_zero_adapter_is_implausible_not_a_server_error(clients: list[Client]) -> None:
    adapter = admitted(clients[0])
    zeroed = {n: (np.zeros_like(t) if ".lora_B." in n else t) for n, t in adapter.tensors.items()}
    with pytest.raises(AdmissionError, match="do not vary") as info:
        probe().check(replace(adapter, tensors=MappingProxyType(zeroed)), **BOUNDS)
    assert info.value.reason == "implausible_stats"


def test_probe_measures_in_float32_so_an_overflowing_b_is_refused(clients: list[Client]) -> None:
    # Defence in depth behind the admission bound (max-tensor-norm): with |B| up to 1e20
    # every entry is finite in float32, the float64 norms are finite too, but B^T B is not
    # in float32 -- the dtype routers use -- so the probe refuses at admission.
    adapter = admitted(clients[0])
    huge = {
        n: (t * np.float32(1e20 / np.abs(t).max()) if ".lora_B." in n else t)
        for n, t in adapter.tensors.items()
    }
    assert all(np.isfinite(t).all() for t in huge.values())
    with pytest.raises(AdmissionError, match="overflow float32") as info:
        probe().check(replace(adapter, tensors=MappingProxyType(huge)), **BOUNDS)
    assert info.value.reason == "non_finite"
    # Scaled by 1e6 instead: finite in float32 everywhere, and z-scores do not change with
    # the scale of B, so the honest statistics scaled alike still pass.
    tensors = adapter.tensors
    scaled = {n: (t * np.float32(1e6) if ".lora_B." in n else t) for n, t in tensors.items()}
    probe().check(
        replace(adapter, tensors=MappingProxyType(scaled),
                stats=lying_stats(adapter.stats, 1e6, 1e6)), **BOUNDS,
    )  # fmt: skip


def test_probe_text_from_a_file_a_folder_or_the_builtin_sources(tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("alpha beta\n", encoding="utf-8")
    (tmp_path / "docs" / "b.md").write_text("gamma\n", encoding="utf-8")
    assert [t.text for t in load_probe_texts(str(tmp_path / "docs" / "a.txt"))] == ["alpha beta\n"]
    assert len(load_probe_texts(str(tmp_path / "docs"))) == 2
    builtin = load_probe_texts("")
    assert 0 < len(builtin) <= len(BUILTIN_PROBE_FILES)
    with pytest.raises(DataError, match="cannot read probe text"):
        load_probe_texts(str(tmp_path / "missing.txt"))
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe")
    with pytest.raises(DataError, match="UTF-8"):
        load_probe_texts(str(tmp_path / "bad.txt"))


def test_probe_refuses_text_shorter_than_two_tokens() -> None:
    from seqr.core.textdata import TextFile

    tokenizer = base_model().tokenizer
    with pytest.raises(DataError):
        probe_chunks([TextFile(Path("x"), "a")], tokenizer, 32, 1024)
