"""The standard tool verifies a seqr export: the real `model_signing` CLI, not seqr's code.

A reviewer runs exactly

    model_signing verify key EXPORT --signature EXPORT/model.sig --public_key signing_key.pub

on a client's export folder (the bundle lies inside the folder; the CLI leaves the file named
by --signature out of the hashed files). This runs that console script from the venv against
a fresh export made by `seqr client train`'s code (seqr.node.task.run_client on the tiny
model) and against tampered copies of it; each copy must fail the CLI and seqr's in-memory
verification alike, and the original export must be untouched afterwards.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from _signed_export import make_key
from tiny import copy_texts, tiny_model_dir

from seqr.core.errors import FormatError, SignatureError
from seqr.core.export_folder import read_export
from seqr.core.federation import FederationConfig
from seqr.core.key_files import SigningKeyFile, write_keypair
from seqr.core.manifest import SIGNATURE_NAME, verify_export_files
from seqr.core.model_signature import sign_files
from seqr.core.signing import PRIVATE_KEY_NAME, PUBLIC_KEY_NAME
from seqr.node.task import run_client

CLI = Path(sys.executable).with_name("model_signing")  # the venv's console script


def model_signing_verify(folder: Path, public_key: Path) -> subprocess.CompletedProcess[str]:
    """`model_signing verify key FOLDER --signature FOLDER/model.sig --public_key PUB`."""
    argv = [str(CLI), "verify", "key", str(folder), "--signature", str(folder / SIGNATURE_NAME),
            "--public_key", str(public_key)]  # fmt: skip
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("keys") / "client"
    write_keypair(folder)
    return folder


@pytest.fixture(scope="module")
def export(tmp_path_factory: pytest.TempPathFactory, keys: Path) -> Path:
    fed = FederationConfig(
        base_model=str(tiny_model_dir()), lora_rank=4, train_steps=2, train_batch_size=2,
        train_seq_len=32, calib_max_sequences=4, lora_target_modules=("q_proj", "v_proj"),
    )  # fmt: skip
    data = copy_texts(tmp_path_factory.mktemp("private") / "code", ("bisect.py",))
    out = tmp_path_factory.mktemp("exports") / "code-adapter"
    run_client(data, keys / PRIVATE_KEY_NAME, out, fed, progress=False)
    return out


def test_model_signing_cli_verifies_a_fresh_export(export: Path, keys: Path) -> None:
    assert CLI.is_file(), f"{CLI} missing: model-signing is a dependency of seqr"
    result = model_signing_verify(export, keys / PUBLIC_KEY_NAME)
    assert result.returncode == 0, result.stderr
    assert "Verification succeeded" in result.stdout


def _flip_last_byte(name: str) -> Callable[[Path], None]:
    def tamper(folder: Path) -> None:
        data = bytearray((folder / name).read_bytes())
        data[-2] ^= 0x01  # the last byte may be a newline or a closing brace: flip one before
        (folder / name).write_bytes(bytes(data))

    return tamper


def _add_file(folder: Path) -> None:
    (folder / "extra.safetensors").write_bytes(b"\x00" * 16)


def _remove_file(folder: Path) -> None:
    (folder / "norm_stats.json").unlink()


TAMPERING = {
    "changed byte in adapter_model.safetensors": _flip_last_byte("adapter_model.safetensors"),
    "changed byte in adapter_config.json": _flip_last_byte("adapter_config.json"),
    "changed byte in norm_stats.json": _flip_last_byte("norm_stats.json"),
    "changed byte in manifest.json": _flip_last_byte("manifest.json"),
    "changed byte in the bundle's signature": lambda f: _flip_sig(f),
    "added file": _add_file,
    "removed file": _remove_file,
}


def _flip_sig(folder: Path) -> None:
    text = (folder / SIGNATURE_NAME).read_text()
    start = text.index('"sig":"') + len('"sig":"')
    swapped = "B" if text[start + 10] != "B" else "C"
    (folder / SIGNATURE_NAME).write_text(text[: start + 10] + swapped + text[start + 11 :])


@pytest.mark.parametrize("attack", sorted(TAMPERING))
def test_model_signing_cli_refuses_a_tampered_export(
    export: Path, keys: Path, tmp_path: Path, attack: str
) -> None:
    before = read_export(export)
    copy = tmp_path / export.name
    shutil.copytree(export, copy)
    TAMPERING[attack](copy)
    result = model_signing_verify(copy, keys / PUBLIC_KEY_NAME)
    assert result.returncode == 1 and "Verification failed" in result.stderr, result.stdout
    with pytest.raises((SignatureError, FormatError)):
        verify_export_files(read_export(copy))
    assert read_export(export) == before


def test_model_signing_cli_refuses_a_swapped_bundle(
    export: Path, keys: Path, tmp_path: Path
) -> None:
    """The bundle the same key made for other statistics, in place of this export's."""
    copy = tmp_path / export.name
    shutil.copytree(export, copy)
    files = {n: b for n, b in read_export(copy).items() if n != SIGNATURE_NAME}
    files["norm_stats.json"] = b"{}"  # what the same key signed for another folder
    same_key = SigningKeyFile.open(keys / PRIVATE_KEY_NAME)
    (copy / SIGNATURE_NAME).write_bytes(sign_files(files, same_key, name=export.name))
    result = model_signing_verify(copy, keys / PUBLIC_KEY_NAME)
    assert result.returncode == 1 and "norm_stats.json" in result.stderr
    with pytest.raises(SignatureError, match="norm_stats.json"):
        verify_export_files(read_export(copy))


def test_model_signing_cli_refuses_another_clients_key(export: Path, tmp_path: Path) -> None:
    write_keypair(tmp_path / "someone-else")
    result = model_signing_verify(export, tmp_path / "someone-else" / PUBLIC_KEY_NAME)
    assert result.returncode == 1 and "Key mismatch" in result.stderr


def test_model_signing_cli_verifies_a_bundle_made_in_memory(tmp_path: Path) -> None:
    """sign_files (the server's group exports) makes a folder the CLI accepts as written."""
    key = make_key(tmp_path / "server-key")
    files = {"adapter_model.safetensors": b"\x01" * 64, "manifest.json": b"{}", "x.json": b"[]"}
    folder = tmp_path / "group-adapter"
    folder.mkdir()
    for name, data in {**files, SIGNATURE_NAME: sign_files(files, key, name=folder.name)}.items():
        (folder / name).write_bytes(data)
    result = model_signing_verify(folder, tmp_path / "server-key" / PUBLIC_KEY_NAME)
    assert result.returncode == 0, result.stderr
