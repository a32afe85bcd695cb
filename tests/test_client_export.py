"""Train -> calibrate -> export -> sign: a verified, peft-loadable export or nothing at all."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from peft import PeftModel
from safetensors.torch import load_file
from tiny import copy_texts, tiny_model_dir
from transformers import AutoModelForCausalLM

from seqr.core.errors import ConfigError, DataError, KeyFileError, ModelError
from seqr.core.export_folder import read_export
from seqr.core.federation import FederationConfig
from seqr.core.key_files import write_keypair
from seqr.core.manifest import verify_export_files
from seqr.core.shared_a import generate_shared_a
from seqr.core.signing import PRIVATE_KEY_NAME, PUBLIC_KEY_NAME, fingerprint, public_key_bytes
from seqr.core.stats import NormStatistics
from seqr.node import export as node_export
from seqr.node.task import checkpoint_dir_for, run_client

FILES = [
    "adapter_config.json",
    "adapter_model.safetensors",
    "manifest.json",
    "model.sig",
    "norm_stats.json",
]


def fed_for_tiny(**changes: object) -> FederationConfig:
    return FederationConfig(
        base_model=str(tiny_model_dir()), lora_rank=4, train_steps=3, train_batch_size=4,
        train_seq_len=32, train_lr=1e-2, calib_max_sequences=8, a_seed=5,
        lora_target_modules=("q_proj", "v_proj"),
    ).replace(**changes)  # fmt: skip


@pytest.fixture(scope="module")
def key(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("keys")
    write_keypair(folder)
    return folder / PRIVATE_KEY_NAME


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return copy_texts(tmp_path_factory.mktemp("private") / "code", ("bisect.py", "heapq.py"))


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, key: Path, data: Path):  # type: ignore[no-untyped-def]
    out = tmp_path_factory.mktemp("exports") / "code-adapter"
    return run_client(data, key, out, fed_for_tiny(), progress=False, checkpoint_every=2)


def test_export_holds_exactly_the_five_signed_files(run) -> None:  # type: ignore[no-untyped-def]
    files = read_export(run.out_dir)
    assert sorted(files) == FILES
    manifest = verify_export_files(files)
    assert manifest == run.manifest
    assert manifest.name == "code" and manifest.rank == 4 and manifest.alpha == 16.0
    assert manifest.a_seed == 5 and manifest.target_modules == ("q_proj", "v_proj")
    assert manifest.example_count == 12  # 3 steps x 4 sequences
    stats = NormStatistics.from_json_bytes(files["norm_stats.json"])
    # 8 sequences of 32 tokens, each measured without its first token (seqr.core.measurement)
    # and, for gains, without tokens where ||A x|| is rounding noise (none or a few).
    counts = [m.count for m in stats.modules.values()]
    assert len(counts) == 4 and all(8 * 31 - 4 <= c <= 8 * 31 for c in counts), counts
    assert not checkpoint_dir_for(run.out_dir).exists()  # optimizer state is gone


def test_exported_a_is_the_shared_a_and_config_names_no_local_path(run) -> None:  # type: ignore[no-untyped-def]
    tensors = load_file(run.out_dir / "adapter_model.safetensors")
    a_names = sorted(k for k in tensors if ".lora_A." in k)
    assert len(a_names) == 4 and len(tensors) == 8
    for key in a_names:
        module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
        assert torch.equal(tensors[key], generate_shared_a(5, module, 4, 64))
    config = json.loads((run.out_dir / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "tiny-llama"
    assert str(tiny_model_dir().parent) not in (run.out_dir / "adapter_config.json").read_text()


def test_peft_loads_the_export_with_the_same_outputs(run) -> None:  # type: ignore[no-untyped-def]
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir())
    loaded = PeftModel.from_pretrained(base, run.out_dir)
    ids = torch.arange(1, 33).reshape(1, 32)
    with torch.no_grad():
        expected = run.train.model(input_ids=ids).logits
        got = loaded(input_ids=ids).logits
        plain = loaded.get_base_model()
        with loaded.disable_adapter():
            without = plain(input_ids=ids).logits
    assert torch.equal(got, expected)
    assert not torch.equal(got, without)  # the trained B does something


def _no_leftovers(parent: Path, allowed: set[str]) -> None:
    assert {p.name for p in parent.iterdir()} <= allowed


@pytest.mark.parametrize(
    "case",
    ["missing", "malformed", "too open", "encrypted", "folder", "fifo", "symlink", "ed25519"],
)
def test_bad_key_file_fails_fast_leaving_nothing(tmp_path: Path, data: Path, case: str) -> None:
    key = tmp_path / "signing_key.pem"
    if case == "folder":
        write_keypair(tmp_path / "keys")
        key = tmp_path / "keys"  # --key KEYDIR instead of KEYDIR/signing_key.pem
    elif case == "fifo":
        os.mkfifo(key, 0o600)
    elif case == "symlink":
        write_keypair(tmp_path / "keys")
        key.symlink_to(tmp_path / "keys" / PRIVATE_KEY_NAME)
    elif case == "ed25519":
        pem = Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )  # fmt: skip
        key.write_bytes(pem)
        key.chmod(0o600)
    elif case == "malformed":
        key.write_text("-----BEGIN PRIVATE KEY-----\nnot base64\n-----END PRIVATE KEY-----\n")
        key.chmod(0o600)
    elif case == "too open":
        write_keypair(tmp_path)
        key.chmod(0o644)
    elif case == "encrypted":
        write_keypair(tmp_path, passphrase=b"secret")
    out = tmp_path / "out"
    with pytest.raises(KeyFileError, match=str(key)):
        run_client(data, key, out, fed_for_tiny(), progress=False)
    assert not out.exists() and not checkpoint_dir_for(out).exists()


def test_base_model_hash_mismatch_refused_before_training(
    tmp_path: Path, key: Path, data: Path
) -> None:
    out = tmp_path / "out"
    with pytest.raises(ModelError, match="0{64}"):
        run_client(data, key, out, fed_for_tiny(base_model_sha256="0" * 64), progress=False)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("case", ["empty folder", "not utf-8"])
def test_bad_data_refused_naming_the_problem(
    tmp_path: Path, key: Path, case: str, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "data"
    folder.mkdir()
    if case == "not utf-8":  # skipped with a warning naming it; what is left is too little
        (folder / "ok.txt").write_text("hello\n")
        (folder / "cp1252.md").write_bytes(b"smart \x93quotes\x94\n")
    match = "fewer than one chunk" if case == "not utf-8" else "no UTF-8 text file"
    with pytest.raises(DataError, match=match):
        run_client(folder, key, tmp_path / "out", fed_for_tiny(), progress=False)
    if case == "not utf-8":
        assert "binary or not UTF-8: cp1252.md" in caplog.text
    _no_leftovers(tmp_path, {"data"})


def test_existing_output_is_never_replaced(tmp_path: Path, key: Path, data: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    with pytest.raises(ConfigError, match="already exists"):
        run_client(data, key, out, fed_for_tiny(), progress=False)
    assert [p.name for p in out.iterdir()] == ["mine.txt"]


def test_failure_while_signing_leaves_no_export(
    tmp_path: Path, key: Path, data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt  # e.g. Ctrl-C while the manifest is written

    monkeypatch.setattr(node_export, "sign_export", broken)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        run_client(data, key, out, fed_for_tiny(), progress=False)
    # Only the resumable checkpoints folder may remain; no export, no temp folder.
    _no_leftovers(tmp_path, {checkpoint_dir_for(out).name})
    assert not out.exists()


def test_manifest_is_signed_by_the_given_key(run, key: Path) -> None:  # type: ignore[no-untyped-def]
    from seqr.core.key_files import load_private_key, load_public_key

    assert run.manifest.public_key_bytes == public_key_bytes(load_private_key(key))
    assert run.manifest.public_key_bytes == load_public_key(key.parent / PUBLIC_KEY_NAME)
    assert run.manifest.fingerprint == fingerprint(load_public_key(key.parent / PUBLIC_KEY_NAME))


def test_encrypted_key_signs_with_its_passphrase(tmp_path: Path, data: Path) -> None:
    write_keypair(tmp_path / "keys", passphrase=b"secret")
    out = tmp_path / "out"
    run = run_client(
        data, tmp_path / "keys" / PRIVATE_KEY_NAME, out, fed_for_tiny(), passphrase=b"secret",
        progress=False,
    )  # fmt: skip
    assert verify_export_files(read_export(out)) == run.manifest
