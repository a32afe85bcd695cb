"""Base models: hashed exactly, converted atomically, refused on a hash mismatch."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny import tiny_model_dir

from seqr.core.base_model import (
    atomic_folder,
    load_base_model,
    model_sha256,
    resolve_model_dir,
)
from seqr.core.errors import ModelError


@pytest.fixture
def model_copy(tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_model_dir(), tmp_path / "model"))


def test_hash_is_stable_and_ignores_header_order_and_metadata(model_copy: Path) -> None:
    before = model_sha256(model_copy)
    assert before == model_sha256(model_copy)
    weights = model_copy / "model.safetensors"
    tensors = load_file(weights)
    reordered = dict(reversed(list(tensors.items())))
    weights.unlink()
    save_file(reordered, weights, metadata={"note": "re-saved"})
    assert model_sha256(model_copy) == before


def test_hash_covers_every_weight_byte(model_copy: Path) -> None:
    before = model_sha256(model_copy)
    weights = model_copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01  # the last byte of the last tensor's data
    weights.write_bytes(bytes(data))
    assert model_sha256(model_copy) != before


def test_hash_is_independent_of_sharding(model_copy: Path) -> None:
    before = model_sha256(model_copy)
    tensors = load_file(model_copy / "model.safetensors")
    names = sorted(tensors)
    (model_copy / "model.safetensors").unlink()
    save_file({n: tensors[n] for n in names[:5]}, model_copy / "a.safetensors")
    save_file({n: tensors[n] for n in names[5:]}, model_copy / "b.safetensors")
    assert model_sha256(model_copy) == before


def test_local_folder_loads_with_its_hash(model_copy: Path) -> None:
    base = load_base_model(str(model_copy), expected_sha256=model_sha256(model_copy))
    assert base.sha256 == model_sha256(model_copy)
    assert base.model.dtype == torch.float32
    ids = base.tokenizer("def f(x): return x", return_tensors="pt")["input_ids"]
    assert base.model(ids).logits.shape[-1] == base.model.config.vocab_size


def test_hash_mismatch_rejected_before_loading(model_copy: Path) -> None:
    wrong = "0" * 64
    with pytest.raises(ModelError) as info:
        load_base_model(str(model_copy), expected_sha256=wrong)
    assert wrong in str(info.value) and model_sha256(model_copy) in str(info.value)


def test_pickle_only_folder_rejected(model_copy: Path) -> None:
    (model_copy / "model.safetensors").rename(model_copy / "pytorch_model.bin")
    with pytest.raises(ModelError, match="no \\*.safetensors"):
        load_base_model(str(model_copy))


def test_unknown_model_name_rejected(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="neither a known name"):
        resolve_model_dir("no-such-model", tmp_path)


def test_truncated_weights_rejected(model_copy: Path) -> None:
    weights = model_copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    with pytest.raises(ModelError, match="truncated"):
        model_sha256(model_copy)
    weights.write_bytes(struct.pack("<Q", 10**12))
    with pytest.raises(ModelError, match="header"):
        model_sha256(model_copy)


def test_cache_corruption_detected(model_copy: Path) -> None:
    (model_copy / "seqr_model.json").write_text(json.dumps({"sha256": "f" * 64}))
    with pytest.raises(ModelError, match="corrupted"):
        load_base_model(str(model_copy))


def test_interrupted_build_leaves_nothing(tmp_path: Path) -> None:
    target = tmp_path / "cache" / "SomeModel"
    with pytest.raises(KeyboardInterrupt), atomic_folder(target) as tmp:
        (tmp / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt
    assert list((tmp_path / "cache").iterdir()) == []
    with atomic_folder(target) as tmp:
        (tmp / "done").write_text("ok")
    assert (target / "done").read_text() == "ok"
    with pytest.raises(FileExistsError), atomic_folder(target):
        pass
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["SomeModel"]


def test_unfinished_cache_entry_is_not_used(tmp_path: Path) -> None:
    (tmp_path / "SmolLM2-135M-Instruct").mkdir()
    with pytest.raises(ModelError, match="not a finished conversion"):
        resolve_model_dir("SmolLM2-135M-Instruct", tmp_path)
