"""ECDSA P-256 key files and signatures: what a stolen, tampered or wrong key looks like."""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

from seqr.cli import keys as keys_cli
from seqr.cli.main import main as seqr_main
from seqr.core import key_files, signing
from seqr.core.errors import KeyFileError, SignatureError

PASS = b"correct horse battery staple"
P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
SPKI = serialization.PublicFormat.SubjectPublicKeyInfo
# Ed25519 points of small order (RFC 8032 encodings; "Taming the many EdDSAs", table 2):
# whoever holds no private key can still make signatures that verify for them.
SMALL_ORDER_ED25519 = {
    "identity": bytes([1]) + bytes(31),
    "order 2": bytes([0xEC]) + bytes([0xFF]) * 30 + bytes([0x7F]),
    "order 4": bytes(32),
    "order 8": bytes.fromhex("26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05"),
}


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _write_0600(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    path.chmod(0o600)
    return path


def _pkcs8(key: object) -> bytes:
    return key.private_bytes(  # type: ignore[attr-defined, no-any-return]
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_keypair_roundtrip_signs_and_verifies(tmp_path: Path) -> None:
    fp = key_files.write_keypair(tmp_path)
    key = key_files.load_private_key(tmp_path / signing.PRIVATE_KEY_NAME)
    public = key_files.load_public_key(tmp_path / signing.PUBLIC_KEY_NAME)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1"
    assert public == signing.public_key_bytes(key) and len(public) == signing.PUBLIC_KEY_BYTES
    assert fp == signing.fingerprint(public) == "sha256:" + hashlib.sha256(public).hexdigest()
    sig = signing.sign(key, b"exact bytes")
    assert len(sig) == signing.SIGNATURE_BYTES
    signing.verify(public, b"exact bytes", sig)


def test_private_key_created_0600_even_with_open_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        key_files.write_keypair(tmp_path / "keys")
    finally:
        os.umask(old)
    assert _mode(tmp_path / "keys") == 0o700
    assert _mode(tmp_path / "keys" / signing.PRIVATE_KEY_NAME) == 0o600
    assert _mode(tmp_path / "keys" / signing.PUBLIC_KEY_NAME) == 0o644
    assert not [p for p in (tmp_path / "keys").iterdir() if p.name.endswith(".tmp")]


def test_public_key_file_is_the_pem_model_signing_reads(tmp_path: Path) -> None:
    key_files.write_keypair(tmp_path)
    pem = (tmp_path / signing.PUBLIC_KEY_NAME).read_bytes()
    assert pem.startswith(b"-----BEGIN PUBLIC KEY-----\n") and pem.endswith(
        b"-----END PUBLIC KEY-----\n"
    )
    loaded = serialization.load_pem_public_key(pem)  # what model_signing's verifier does
    assert isinstance(loaded, ec.EllipticCurvePublicKey) and loaded.curve.name == "secp256r1"
    assert signing.parse_public_key(pem) == loaded.public_bytes(serialization.Encoding.DER, SPKI)


def test_existing_key_not_overwritten(tmp_path: Path) -> None:
    key_files.write_keypair(tmp_path)
    before = (tmp_path / signing.PRIVATE_KEY_NAME).read_bytes()
    with pytest.raises(KeyFileError, match="already exists"):
        key_files.write_keypair(tmp_path)
    assert (tmp_path / signing.PRIVATE_KEY_NAME).read_bytes() == before


def test_encrypted_key_roundtrip(tmp_path: Path) -> None:
    fp = key_files.write_keypair(tmp_path, PASS)
    pem = (tmp_path / signing.PRIVATE_KEY_NAME).read_bytes()
    assert b"ENCRYPTED PRIVATE KEY" in pem
    key = key_files.load_private_key(tmp_path / signing.PRIVATE_KEY_NAME, PASS)
    assert signing.fingerprint(signing.public_key_bytes(key)) == fp


def test_wrong_passphrase_rejected(tmp_path: Path) -> None:
    key_files.write_keypair(tmp_path, PASS)
    with pytest.raises(KeyFileError, match="wrong passphrase"):
        key_files.load_private_key(tmp_path / signing.PRIVATE_KEY_NAME, b"guess")


def test_missing_passphrase_rejected(tmp_path: Path) -> None:
    key_files.write_keypair(tmp_path, PASS)
    with pytest.raises(KeyFileError, match="is encrypted"):
        key_files.load_private_key(tmp_path / signing.PRIVATE_KEY_NAME)


def test_passphrase_for_plain_key_rejected(tmp_path: Path) -> None:
    key_files.write_keypair(tmp_path)
    with pytest.raises(KeyFileError, match="not encrypted"):
        key_files.load_private_key(tmp_path / signing.PRIVATE_KEY_NAME, PASS)


def test_empty_passphrase_rejected(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="empty"):
        key_files.write_keypair(tmp_path / "k", b"")
    assert not (tmp_path / "k").exists()


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o666])
def test_loose_key_permissions_rejected(tmp_path: Path, mode: int) -> None:
    key_files.write_keypair(tmp_path)
    path = tmp_path / signing.PRIVATE_KEY_NAME
    path.chmod(mode)
    with pytest.raises(KeyFileError) as info:
        key_files.load_private_key(path)
    assert f"{mode:04o}" in str(info.value)
    assert f"chmod 600 {path}" in str(info.value)


def test_stricter_key_permissions_accepted(tmp_path: Path) -> None:
    key_files.write_keypair(tmp_path)
    path = tmp_path / signing.PRIVATE_KEY_NAME
    path.chmod(0o400)
    key_files.load_private_key(path)


def test_missing_key_file_rejected(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="does not exist.*seqr keys generate"):
        key_files.load_private_key(tmp_path / "nope.pem")


def test_symlinked_key_file_rejected(tmp_path: Path) -> None:
    key_files.write_keypair(tmp_path / "real")
    link = tmp_path / "link.pem"
    link.symlink_to(tmp_path / "real" / signing.PRIVATE_KEY_NAME)
    with pytest.raises(KeyFileError, match="symlink"):
        key_files.load_private_key(link)


def test_folder_as_key_file_rejected(tmp_path: Path) -> None:
    key_files.write_keypair(tmp_path / "keys")
    with pytest.raises(KeyFileError, match="is a folder.*signing_key.pem"):
        key_files.load_private_key(tmp_path / "keys")


def test_fifo_as_key_file_rejected_without_hanging(tmp_path: Path) -> None:
    fifo = tmp_path / "key.pem"
    os.mkfifo(fifo, 0o600)  # nobody ever writes: a blocking open would wait forever
    with pytest.raises(KeyFileError, match="not a regular file"):
        key_files.load_private_key(fifo)


def test_malformed_pem_rejected(tmp_path: Path) -> None:
    path = _write_0600(tmp_path / "k.pem", b"-----BEGIN PRIVATE KEY-----\nnot base64!\n")
    with pytest.raises(KeyFileError, match="not a valid PEM"):
        key_files.load_private_key(path)


@pytest.mark.parametrize(
    ("make", "kind"),
    [
        (ed25519.Ed25519PrivateKey.generate, "Ed25519"),
        (lambda: ec.generate_private_key(ec.SECP384R1()), "secp384r1"),
        (lambda: ec.generate_private_key(ec.SECP256K1()), "secp256k1"),
    ],
)
def test_private_key_of_other_type_or_curve_rejected(
    tmp_path: Path, make: object, kind: str
) -> None:
    path = _write_0600(tmp_path / "other.pem", _pkcs8(make()))  # type: ignore[operator]
    with pytest.raises(KeyFileError, match=f"{kind}.*only with ECDSA P-256"):
        key_files.load_private_key(path)


def test_oversized_key_file_rejected(tmp_path: Path) -> None:
    path = _write_0600(tmp_path / "big.pem", b"A" * (signing.MAX_KEY_FILE_BYTES + 1))
    with pytest.raises(KeyFileError, match="larger than"):
        key_files.load_private_key(path)


# --- public keys from other parties: only canonical P-256 points --------------------------


@pytest.mark.parametrize("name", sorted(SMALL_ORDER_ED25519))
def test_small_order_ed25519_public_key_rejected(name: str) -> None:
    """Issue 14: small-order Ed25519 keys let anyone forge; seqr refuses Ed25519 outright."""
    point = ed25519.Ed25519PublicKey.from_public_bytes(SMALL_ORDER_ED25519[name])
    der = point.public_bytes(serialization.Encoding.DER, SPKI)
    pem = point.public_bytes(serialization.Encoding.PEM, SPKI)
    for call in (
        lambda: signing.check_public_key(der),
        lambda: signing.parse_public_key(pem),
        lambda: signing.parse_public_key(der.hex()),
        lambda: signing.fingerprint(der),
    ):
        with pytest.raises(KeyFileError, match="an Ed25519 key; seqr accepts only ECDSA P-256"):
            call()
    with pytest.raises(SignatureError, match="Ed25519"):
        signing.verify(der, b"payload", bytes(64))


@pytest.mark.parametrize("curve", [ec.SECP384R1(), ec.SECP256K1(), ec.SECP521R1()])
def test_public_key_on_other_curve_rejected(curve: ec.EllipticCurve) -> None:
    public = ec.generate_private_key(curve).public_key()
    with pytest.raises(KeyFileError, match=f"curve {curve.name}; seqr accepts only ECDSA P-256"):
        signing.parse_public_key(public.public_bytes(serialization.Encoding.PEM, SPKI))
    with pytest.raises(KeyFileError, match=curve.name):
        signing.check_public_key(public.public_bytes(serialization.Encoding.DER, SPKI))


def test_point_not_on_the_curve_rejected() -> None:
    der = bytearray(signing.public_key_bytes(signing.generate_private_key()))
    der[-1] ^= 0x01  # y + 1 (or - 1): no longer on P-256
    with pytest.raises(KeyFileError, match="not a valid public key"):
        signing.check_public_key(bytes(der))
    with pytest.raises(KeyFileError, match="not a valid public key"):
        signing.parse_public_key(bytes(der).hex())
    with pytest.raises(SignatureError, match="not a valid public key"):
        signing.verify(bytes(der), b"payload", bytes(64))


def test_compressed_point_is_not_canonical() -> None:
    """One key, one byte string: a compressed point would give the same key a second id."""
    public = signing.generate_private_key().public_key()
    point = public.public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.CompressedPoint
    )
    compressed = bytes.fromhex("3039301306072a8648ce3d020106082a8648ce3d030107032200") + point
    assert serialization.load_der_public_key(compressed) == public  # the same key to OpenSSL
    with pytest.raises(KeyFileError, match="canonical"):
        signing.check_public_key(compressed)


def test_trailing_bytes_after_key_rejected() -> None:
    der = signing.public_key_bytes(signing.generate_private_key())
    with pytest.raises(KeyFileError):
        signing.check_public_key(der + b"\x00")


def test_private_key_given_as_public_key_error_has_no_key_material(tmp_path: Path) -> None:
    key_files.write_keypair(tmp_path)
    pem = (tmp_path / signing.PRIVATE_KEY_NAME).read_text()
    lines = [line for line in pem.splitlines() if line and not line.startswith("-----")]
    for call in (
        lambda: signing.parse_public_key(pem),
        lambda: signing.parse_public_key(pem.encode()),
        lambda: key_files.load_public_key(tmp_path / signing.PRIVATE_KEY_NAME),
    ):
        with pytest.raises(KeyFileError) as info:
            call()
        message = str(info.value)
        assert "PRIVATE key" in message and signing.PUBLIC_KEY_NAME in message
        assert not any(line in message for line in lines)
        assert not any(line[:16] in message for line in lines)


@pytest.mark.parametrize(
    "text", ["", "abc", "zz" * 91, "00" * 91, "-----BEGIN PUBLIC KEY-----\nxx\n"]
)
def test_malformed_public_key_text_rejected_without_echo(text: str) -> None:
    with pytest.raises(KeyFileError) as info:
        signing.parse_public_key(text)
    if len(text) > 3:
        assert text.strip() not in str(info.value)


# --- signatures ----------------------------------------------------------------------------


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


def test_malleated_high_s_signature_rejected() -> None:
    """(r, n - s) verifies for raw ECDSA; seqr accepts only the low-s form it makes."""
    key = signing.generate_private_key()
    sig = signing.sign(key, b"payload")
    r, s = int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big")
    assert s <= P256_ORDER // 2
    key.public_key().verify(
        encode_dss_signature(r, P256_ORDER - s), b"payload", ec.ECDSA(hashes.SHA256())
    )
    high = sig[:32] + (P256_ORDER - s).to_bytes(32, "big")
    with pytest.raises(SignatureError, match="canonical form"):
        signing.verify(signing.public_key_bytes(key), b"payload", high)


def test_sign_makes_r_s_over_the_exact_bytes() -> None:
    key = signing.generate_private_key()
    sig = signing.sign(key, b"payload")
    r, s = int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big")
    key.public_key().verify(encode_dss_signature(r, s), b"payload", ec.ECDSA(hashes.SHA256()))
    der = key.sign(b"payload", ec.ECDSA(hashes.SHA256()))
    assert len(decode_dss_signature(der)) == 2  # the DER form is not what seqr stores


@pytest.mark.parametrize("length", [0, 63, 65, 72, 128])
def test_wrong_length_signature_rejected(length: int) -> None:
    public = signing.public_key_bytes(signing.generate_private_key())
    with pytest.raises(SignatureError, match="64 bytes"):
        signing.verify(public, b"payload", b"\x01" * length)


def test_zero_signature_rejected() -> None:
    public = signing.public_key_bytes(signing.generate_private_key())
    with pytest.raises(SignatureError, match="canonical form"):
        signing.verify(public, b"payload", bytes(64))


def test_public_key_as_hex_text_in_verify_rejected() -> None:
    key = signing.generate_private_key()
    sig = signing.sign(key, b"payload")
    with pytest.raises(SignatureError, match="not a valid public key"):
        signing.verify(signing.public_key_bytes(key).hex().encode(), b"payload", sig)


def test_fingerprint_is_full_sha256_and_rejects_short_keys() -> None:
    public = signing.public_key_bytes(signing.generate_private_key())
    fp = signing.fingerprint(public)
    assert fp.startswith("sha256:") and len(fp) == len("sha256:") + 64
    with pytest.raises(KeyFileError):
        signing.fingerprint(public[:32])


def test_signing_key_file_repr_shows_no_secret(tmp_path: Path) -> None:
    key_files.write_keypair(tmp_path, PASS)
    key = key_files.SigningKeyFile.open(tmp_path / signing.PRIVATE_KEY_NAME, PASS)
    assert PASS.decode() not in repr(key) and "EllipticCurve" not in repr(key)
    assert key.public == key_files.load_public_key(tmp_path / signing.PUBLIC_KEY_NAME)


# --- seqr keys generate -------------------------------------------------------------------


def test_keys_generate_cli_prints_full_fingerprint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert keys_cli.main(["--out", str(tmp_path / "k")]) == 0
    out = capsys.readouterr().out.strip()
    public = key_files.load_public_key(tmp_path / "k" / signing.PUBLIC_KEY_NAME)
    assert out == signing.fingerprint(public) == "sha256:" + hashlib.sha256(public).hexdigest()


def test_keys_generate_cli_passphrase_env(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("SEQR_TEST_PASS", PASS.decode())
    assert keys_cli.main(["--out", str(tmp_path), "--passphrase-env", "SEQR_TEST_PASS"]) == 0
    key_files.load_private_key(tmp_path / signing.PRIVATE_KEY_NAME, PASS)


def test_keys_generate_cli_passphrase_file(tmp_path: Path) -> None:
    secret = tmp_path / "pass.txt"
    secret.write_bytes(PASS + b"\n")
    out = tmp_path / "keys"
    assert keys_cli.main(["--out", str(out), "--passphrase-file", str(secret)]) == 0
    key_files.load_private_key(out / signing.PRIVATE_KEY_NAME, PASS)


def test_keys_generate_cli_refuses_overwrite(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert keys_cli.main(["--out", str(tmp_path)]) == 0
    capsys.readouterr()
    before = _tree(tmp_path)
    assert keys_cli.main(["--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "already exists" in err and "Traceback" not in err
    assert err.count("\n") == 1
    assert _tree(tmp_path) == before


@pytest.mark.parametrize("target", ["file", "file/sub"])
def test_keys_generate_out_existing_file_is_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], target: str
) -> None:
    (tmp_path / "file").write_text("not a folder")
    before = sorted(p.name for p in tmp_path.iterdir())
    assert keys_cli.main(["--out", str(tmp_path / target)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("seqr keys generate: error: ") and err.count("\n") == 1
    assert "Errno" not in err and "Traceback" not in err and "folder" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert (tmp_path / "file").read_text() == "not a folder"


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
    assert result.stdout.strip().startswith("sha256:") and len(result.stdout.strip()) == 71
    assert _mode(tmp_path / signing.PRIVATE_KEY_NAME) == 0o600


def test_server_enrol_with_private_key_file_leaks_nothing_and_changes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 14 item 12: `seqr server enrol --client signing_key.pem` (the private key)."""
    key_files.write_keypair(tmp_path / "server-key")
    key_files.write_keypair(tmp_path / "client")
    registry = tmp_path / "registry"
    common = ["--registry", str(registry), "--key", str(tmp_path / "server-key")]
    assert seqr_main(["server", "init", *common]) == 0
    capsys.readouterr()
    before = _tree(registry)
    private = tmp_path / "client" / signing.PRIVATE_KEY_NAME
    pem = private.read_text()
    for value in (str(private), pem):  # the file, or its text pasted
        assert seqr_main(["server", "enrol", *common, "--client", value]) == 2
        captured = capsys.readouterr()
        out = captured.out + captured.err
        assert "PRIVATE key" in out and signing.PUBLIC_KEY_NAME in out and "Traceback" not in out
        for line in pem.splitlines():
            if line and not line.startswith("-----"):
                assert line[:12] not in out
        assert _tree(registry) == before
