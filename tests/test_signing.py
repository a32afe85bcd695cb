"""Ed25519 key files and signatures: what a stolen, tampered or misconfigured key looks like."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from seqr.cli import keys as keys_cli
from seqr.core import signing
from seqr.core.errors import KeyFileError, SignatureError

PASS = b"correct horse battery staple"


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_keypair_roundtrip_signs_and_verifies(tmp_path: Path) -> None:
    fp = signing.write_keypair(tmp_path)
    key = signing.load_private_key(tmp_path / signing.PRIVATE_KEY_NAME)
    public = signing.load_public_key_hex((tmp_path / signing.PUBLIC_KEY_NAME).read_text())
    assert public == signing.public_key_bytes(key)
    assert fp == signing.fingerprint(public)
    assert fp.startswith("ed25519:") and len(fp) == len("ed25519:") + 16
    sig = signing.sign(key, b"exact bytes")
    assert len(sig) == 64
    signing.verify(public, b"exact bytes", sig)


def test_private_key_created_0600_even_with_open_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        signing.write_keypair(tmp_path / "keys")
    finally:
        os.umask(old)
    assert _mode(tmp_path / "keys") == 0o700
    assert _mode(tmp_path / "keys" / signing.PRIVATE_KEY_NAME) == 0o600
    assert _mode(tmp_path / "keys" / signing.PUBLIC_KEY_NAME) == 0o644
    assert not [p for p in (tmp_path / "keys").iterdir() if p.name.endswith(".tmp")]


def test_public_key_file_is_hex_line(tmp_path: Path) -> None:
    signing.write_keypair(tmp_path)
    text = (tmp_path / signing.PUBLIC_KEY_NAME).read_text()
    assert text.endswith("\n") and len(text) == 65
    assert bytes.fromhex(text.strip())


def test_existing_key_not_overwritten(tmp_path: Path) -> None:
    signing.write_keypair(tmp_path)
    before = (tmp_path / signing.PRIVATE_KEY_NAME).read_bytes()
    with pytest.raises(KeyFileError, match="already exists"):
        signing.write_keypair(tmp_path)
    assert (tmp_path / signing.PRIVATE_KEY_NAME).read_bytes() == before


def test_encrypted_key_roundtrip(tmp_path: Path) -> None:
    fp = signing.write_keypair(tmp_path, PASS)
    pem = (tmp_path / signing.PRIVATE_KEY_NAME).read_bytes()
    assert b"ENCRYPTED PRIVATE KEY" in pem
    key = signing.load_private_key(tmp_path / signing.PRIVATE_KEY_NAME, PASS)
    assert signing.fingerprint(signing.public_key_bytes(key)) == fp


def test_wrong_passphrase_rejected(tmp_path: Path) -> None:
    signing.write_keypair(tmp_path, PASS)
    with pytest.raises(KeyFileError, match="wrong passphrase"):
        signing.load_private_key(tmp_path / signing.PRIVATE_KEY_NAME, b"guess")


def test_missing_passphrase_rejected(tmp_path: Path) -> None:
    signing.write_keypair(tmp_path, PASS)
    with pytest.raises(KeyFileError, match="is encrypted"):
        signing.load_private_key(tmp_path / signing.PRIVATE_KEY_NAME)


def test_passphrase_for_plain_key_rejected(tmp_path: Path) -> None:
    signing.write_keypair(tmp_path)
    with pytest.raises(KeyFileError, match="not encrypted"):
        signing.load_private_key(tmp_path / signing.PRIVATE_KEY_NAME, PASS)


def test_empty_passphrase_rejected(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="empty"):
        signing.write_keypair(tmp_path, b"")
    assert not (tmp_path / signing.PRIVATE_KEY_NAME).exists()


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o666])
def test_loose_key_permissions_rejected(tmp_path: Path, mode: int) -> None:
    signing.write_keypair(tmp_path)
    path = tmp_path / signing.PRIVATE_KEY_NAME
    path.chmod(mode)
    with pytest.raises(KeyFileError) as info:
        signing.load_private_key(path)
    assert f"{mode:04o}" in str(info.value)
    assert f"chmod 600 {path}" in str(info.value)


def test_stricter_key_permissions_accepted(tmp_path: Path) -> None:
    signing.write_keypair(tmp_path)
    path = tmp_path / signing.PRIVATE_KEY_NAME
    path.chmod(0o400)
    signing.load_private_key(path)


def test_missing_key_file_rejected(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="does not exist.*seqr keys generate"):
        signing.load_private_key(tmp_path / "nope.pem")


def test_symlinked_key_file_rejected(tmp_path: Path) -> None:
    signing.write_keypair(tmp_path / "real")
    link = tmp_path / "link.pem"
    link.symlink_to(tmp_path / "real" / signing.PRIVATE_KEY_NAME)
    with pytest.raises(KeyFileError, match="cannot open"):
        signing.load_private_key(link)


def _write_0600(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    path.chmod(0o600)
    return path


def test_malformed_pem_rejected(tmp_path: Path) -> None:
    path = _write_0600(tmp_path / "k.pem", b"-----BEGIN PRIVATE KEY-----\nnot base64!\n")
    with pytest.raises(KeyFileError, match="not a valid PEM"):
        signing.load_private_key(path)


def test_non_ed25519_key_rejected(tmp_path: Path) -> None:
    ec_key = ec.generate_private_key(ec.SECP256R1())
    pem = ec_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    path = _write_0600(tmp_path / "ec.pem", pem)
    with pytest.raises(KeyFileError, match="not Ed25519"):
        signing.load_private_key(path)


def test_oversized_key_file_rejected(tmp_path: Path) -> None:
    path = _write_0600(tmp_path / "big.pem", b"A" * (signing.MAX_KEY_FILE_BYTES + 1))
    with pytest.raises(KeyFileError, match="larger than"):
        signing.load_private_key(path)


def test_forged_signature_rejected() -> None:
    key = signing.generate_private_key()
    public = signing.public_key_bytes(key)
    sig = bytearray(signing.sign(key, b"payload"))
    sig[10] ^= 0x01
    with pytest.raises(SignatureError, match="does not verify"):
        signing.verify(public, b"payload", bytes(sig))


def test_tampered_data_rejected() -> None:
    key = signing.generate_private_key()
    sig = signing.sign(key, b"payload")
    with pytest.raises(SignatureError, match="does not verify"):
        signing.verify(signing.public_key_bytes(key), b"payload ", sig)


def test_signature_by_other_key_rejected() -> None:
    key, other = signing.generate_private_key(), signing.generate_private_key()
    sig = signing.sign(other, b"payload")
    with pytest.raises(SignatureError, match="does not verify"):
        signing.verify(signing.public_key_bytes(key), b"payload", sig)


@pytest.mark.parametrize("length", [0, 63, 65, 128])
def test_wrong_length_signature_rejected(length: int) -> None:
    public = signing.public_key_bytes(signing.generate_private_key())
    with pytest.raises(SignatureError, match="64 bytes"):
        signing.verify(public, b"payload", b"\x00" * length)


def test_malformed_public_key_in_verify_rejected() -> None:
    key = signing.generate_private_key()
    sig = signing.sign(key, b"payload")
    with pytest.raises(SignatureError, match="32 raw bytes"):
        signing.verify(signing.public_key_bytes(key).hex().encode(), b"payload", sig)


@pytest.mark.parametrize(
    "text",
    ["", "00" * 31, "00" * 33, "zz" * 32, "0x" + "00" * 31],
)
def test_malformed_public_key_hex_rejected(text: str) -> None:
    with pytest.raises(KeyFileError):
        signing.load_public_key_hex(text)


def test_fingerprint_rejects_wrong_length() -> None:
    with pytest.raises(KeyFileError):
        signing.fingerprint(b"\x01" * 31)


# --- seqr keys generate -------------------------------------------------------------------


def test_keys_generate_cli_prints_fingerprint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert keys_cli.main(["--out", str(tmp_path / "k")]) == 0
    out = capsys.readouterr().out.strip()
    public = signing.load_public_key_hex((tmp_path / "k" / signing.PUBLIC_KEY_NAME).read_text())
    assert out == signing.fingerprint(public)


def test_keys_generate_cli_passphrase_env(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("SEQR_TEST_PASS", PASS.decode())
    assert keys_cli.main(["--out", str(tmp_path), "--passphrase-env", "SEQR_TEST_PASS"]) == 0
    signing.load_private_key(tmp_path / signing.PRIVATE_KEY_NAME, PASS)


def test_keys_generate_cli_passphrase_file(tmp_path: Path) -> None:
    secret = tmp_path / "pass.txt"
    secret.write_bytes(PASS + b"\n")
    out = tmp_path / "keys"
    assert keys_cli.main(["--out", str(out), "--passphrase-file", str(secret)]) == 0
    signing.load_private_key(out / signing.PRIVATE_KEY_NAME, PASS)


def test_keys_generate_cli_refuses_overwrite(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert keys_cli.main(["--out", str(tmp_path)]) == 0
    capsys.readouterr()
    assert keys_cli.main(["--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "already exists" in err and "Traceback" not in err
    assert err.count("\n") == 1


def test_keys_generate_cli_unset_env_is_one_line_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("SEQR_UNSET_PASS", raising=False)
    assert keys_cli.main(["--out", str(tmp_path), "--passphrase-env", "SEQR_UNSET_PASS"]) == 2
    err = capsys.readouterr().err
    assert "SEQR_UNSET_PASS is not set" in err and err.count("\n") == 1
    assert not (tmp_path / signing.PRIVATE_KEY_NAME).exists()


def test_keys_generate_through_seqr_dispatcher(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "seqr.cli.main", "keys", "generate", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        check=False,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().startswith("ed25519:")
    assert _mode(tmp_path / signing.PRIVATE_KEY_NAME) == 0o600
