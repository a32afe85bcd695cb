"""LoRA-FA training: only B moves, A stays the shared one, and a resumed run is exact."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from tiny import copy_texts, tiny_model_dir

from seqr.core.base_model import load_base_model
from seqr.core.errors import ConfigError
from seqr.core.federation import FederationConfig
from seqr.core.shared_a import check_shared_a
from seqr.core.textdata import load_text_data
from seqr.node.train import (
    batch_indices,
    latest_checkpoint,
    make_lora_model,
    train_adapter,
    trainable_b,
)

FED = FederationConfig(
    lora_rank=4, train_steps=12, train_batch_size=4, train_seq_len=32, train_lr=1e-2, a_seed=11
)


@pytest.fixture(scope="module")
def chunks(tmp_path_factory: pytest.TempPathFactory) -> np.ndarray:
    base = load_base_model(str(tiny_model_dir()))
    folder = copy_texts(tmp_path_factory.mktemp("data"), ("bisect.py", "heapq.py"))
    data = load_text_data(folder, base.tokenizer, seq_len=32, heldout_fraction=0.1, seed=0)
    return data.train


def _fresh(fed: FederationConfig = FED):  # type: ignore[no-untyped-def]
    return make_lora_model(load_base_model(str(tiny_model_dir())).model, fed)


def _b(model) -> dict[str, torch.Tensor]:  # type: ignore[no-untyped-def]
    return {k: v.detach().clone() for k, v in trainable_b(model).items()}


def test_only_b_trains_and_a_stays_shared(chunks: np.ndarray) -> None:
    model, a_sha = _fresh()
    frozen_before = {
        n: p.detach().clone() for n, p in model.named_parameters() if ".lora_B." not in n
    }
    result = train_adapter(model, chunks, FED, a_sha256=a_sha, progress=False)
    assert result.steps == 12 and len(result.losses) == 12
    assert result.tokens == 12 * 4 * 32
    assert np.mean(result.losses[-3:]) < np.mean(result.losses[:3])  # it learns
    after = dict(model.named_parameters())
    assert all(torch.equal(after[n], v) for n, v in frozen_before.items())  # base and A unchanged
    assert all(
        float(p.detach().abs().sum()) > 0 for p in trainable_b(model).values()
    )  # B left zero
    assert check_shared_a(model, "default", FED.a_seed) == []


def test_batches_are_a_pure_function_of_step() -> None:
    seen = np.concatenate([batch_indices(s, 10, 4, 3) for s in range(5)])
    assert sorted(seen[:10].tolist()) == list(range(10))  # epoch 0 is a permutation
    assert sorted(seen[10:20].tolist()) == list(range(10))  # and so is epoch 1
    assert np.array_equal(batch_indices(3, 10, 4, 3), seen[12:16])
    assert not np.array_equal(batch_indices(0, 10, 4, 4), seen[:4])


def test_interrupted_training_resumes_to_the_same_b(chunks: np.ndarray, tmp_path: Path) -> None:
    model, a_sha = _fresh()
    train_adapter(model, chunks, FED, a_sha256=a_sha, progress=False)
    expected = _b(model)

    ckpt = tmp_path / "ckpt"

    def crash(step: int, loss: float) -> None:
        if step == 6:  # after the step-5 checkpoint, mid-way to the next one
            raise KeyboardInterrupt

    model, a_sha = _fresh()
    with pytest.raises(KeyboardInterrupt):
        train_adapter(model, chunks, FED, a_sha256=a_sha, checkpoint_dir=ckpt,
                      checkpoint_every=5, progress=False, on_step=crash)  # fmt: skip
    assert latest_checkpoint(ckpt) == ckpt / "step-00000005"
    assert [p.name for p in ckpt.iterdir()] == ["step-00000005"]  # older ones dropped

    model, a_sha = _fresh()  # a new process: nothing in memory survives
    result = train_adapter(model, chunks, FED, a_sha256=a_sha, checkpoint_dir=ckpt,
                           checkpoint_every=5, progress=False)  # fmt: skip
    assert result.resumed_from == 5 and len(result.losses) == 7
    got = _b(model)
    assert all(torch.equal(got[k], expected[k]) for k in expected)


def test_checkpoint_of_other_settings_refused(chunks: np.ndarray, tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    model, a_sha = _fresh()
    train_adapter(model, chunks, FED.replace(train_steps=3), a_sha256=a_sha,
                  checkpoint_dir=ckpt, checkpoint_every=2, progress=False)  # fmt: skip
    other = FED.replace(train_lr=5e-3)
    model, a_sha = _fresh(other)
    with pytest.raises(ConfigError, match="federation"):
        train_adapter(model, chunks, other, a_sha256=a_sha, checkpoint_dir=ckpt, progress=False)


def test_a_hash_mismatch_with_federation_refused() -> None:
    with pytest.raises(ConfigError, match="a-sha256"):
        _fresh(FED.replace(a_sha256="0" * 64))
