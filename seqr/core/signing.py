"""Ed25519 signing keys for adapter submissions and registry metadata (RFC 8032).

Keys are the `cryptography` package's Ed25519; public keys travel as the 32 raw bytes
(hex in text formats). Private keys live in a PKCS8 PEM file created with mode 0600 from the
first byte written (never world-readable, not even between create and chmod), optionally
encrypted with a passphrase. Signatures are the raw 64 bytes over the EXACT bytes given:
no re-serialisation, no canonical form (DSSE's approach; see SECURITY.md).

These keys are not Flower's transport keys: SuperNode authentication leaves no signature
that anyone can check later, so adapters carry their own.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from seqr.core.atomic_write import create_new_file
from seqr.core.errors import KeyFileError, SignatureError

__all__ = [
    "PRIVATE_KEY_NAME",
    "PUBLIC_KEY_NAME",
    "PUBLIC_KEY_BYTES",
    "SIGNATURE_BYTES",
    "generate_private_key",
    "write_keypair",
    "load_private_key",
    "public_key_bytes",
    "load_public_key_hex",
    "fingerprint",
    "sign",
    "verify",
]

PRIVATE_KEY_NAME = "signing_key.pem"
PUBLIC_KEY_NAME = "signing_key.pub"
PUBLIC_KEY_BYTES = 32  # RFC 8032 section 5.1.5
SIGNATURE_BYTES = 64  # RFC 8032 section 5.1.6
MAX_KEY_FILE_BYTES = 16 * 1024  # bytes; an Ed25519 PKCS8 PEM is ~120 (encrypted ~300)
_FINGERPRINT_HEX_CHARS = 16


def generate_private_key() -> Ed25519PrivateKey:
    """A fresh Ed25519 key from the OS CSPRNG."""
    return Ed25519PrivateKey.generate()


def public_key_bytes(key: Ed25519PrivateKey | Ed25519PublicKey) -> bytes:
    """The 32 raw public-key bytes of a private or public Ed25519 key."""
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def fingerprint(public: bytes) -> str:
    """Short stable name of a public key: ``ed25519:`` + 16 hex chars of SHA-256(raw key)."""
    _check_public_length(public)
    return "ed25519:" + hashlib.sha256(public).hexdigest()[:_FINGERPRINT_HEX_CHARS]


def load_public_key_hex(text: str) -> bytes:
    """Parse a hex public key (as in ``signing_key.pub`` or a manifest) into 32 raw bytes.

    Surrounding whitespace is ignored; anything else that is not 64 hex digits of a valid
    Ed25519 point raises KeyFileError.
    """
    stripped = text.strip()
    if len(stripped) != 2 * PUBLIC_KEY_BYTES:
        raise KeyFileError(
            f"public key must be {2 * PUBLIC_KEY_BYTES} hex characters "
            f"({PUBLIC_KEY_BYTES} bytes), got {len(stripped)} characters"
        )
    try:
        raw = bytes.fromhex(stripped)
    except ValueError:
        raise KeyFileError(
            f"public key is not hexadecimal: {stripped[:16]!r}...; "
            f"expected the contents of {PUBLIC_KEY_NAME}"
        ) from None
    try:
        Ed25519PublicKey.from_public_bytes(raw)
    except ValueError as exc:
        raise KeyFileError(
            f"public key {stripped[:16]}... is not a valid Ed25519 key: {exc}"
        ) from None
    return raw


def sign(key: Ed25519PrivateKey, data: bytes) -> bytes:
    """The raw 64-byte Ed25519 signature over exactly ``data``."""
    return key.sign(data)


def verify(public: bytes, data: bytes, signature: bytes) -> None:
    """Raise SignatureError unless ``signature`` is ``public``'s signature over exactly ``data``.

    A malformed key or a signature of the wrong length is a SignatureError too: the caller
    treats every failure to verify the same way (reject the bytes).
    """
    if len(public) != PUBLIC_KEY_BYTES:
        raise SignatureError(
            f"public key must be {PUBLIC_KEY_BYTES} raw bytes, got {len(public)}; "
            "pass the bytes from load_public_key_hex, not the hex text"
        )
    if len(signature) != SIGNATURE_BYTES:
        raise SignatureError(
            f"signature must be {SIGNATURE_BYTES} bytes, got {len(signature)}; "
            "is the signature file truncated or hex-encoded?"
        )
    try:
        Ed25519PublicKey.from_public_bytes(bytes(public)).verify(bytes(signature), bytes(data))
    except InvalidSignature:
        raise SignatureError(
            f"signature does not verify for key {fingerprint(bytes(public))} over "
            f"{len(data)} bytes: the data was changed or signed by another key"
        ) from None
    except ValueError as exc:
        raise SignatureError(f"public key is not a valid Ed25519 key: {exc}") from None


def write_keypair(out_dir: Path, passphrase: bytes | None = None) -> str:
    """Create ``signing_key.pem`` (0600, PKCS8) and ``signing_key.pub`` in ``out_dir``.

    Refuses to overwrite an existing key (KeyFileError): losing a signing key would orphan
    every adapter signed with it. With ``passphrase`` the PEM is encrypted with the best
    available PKCS8 encryption. Returns the fingerprint of the new key.
    """
    out_dir = Path(out_dir)
    if passphrase is not None and len(passphrase) == 0:
        raise KeyFileError("passphrase is empty; give a non-empty passphrase or none at all")
    out_dir.mkdir(mode=0o700, parents=True, exist_ok=True)  # a new key folder: owner only
    private_path = out_dir / PRIVATE_KEY_NAME
    public_path = out_dir / PUBLIC_KEY_NAME
    for path in (private_path, public_path):
        if path.exists() or path.is_symlink():
            raise KeyFileError(
                f"{path} already exists; refusing to overwrite a signing key. "
                "Move it away first or choose another --out directory"
            )
    key = generate_private_key()
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase)
        if passphrase is not None
        else serialization.NoEncryption()
    )
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )
    public = public_key_bytes(key)
    # Private key first: a public key without its private half would be useless.
    _create_key_file(private_path, pem, mode=0o600)
    try:
        _create_key_file(public_path, (public.hex() + "\n").encode("ascii"), mode=0o644)
    except BaseException:
        with contextlib.suppress(OSError):
            private_path.unlink()
        raise
    return fingerprint(public)


def load_private_key(path: Path, passphrase: bytes | None = None) -> Ed25519PrivateKey:
    """Load an Ed25519 private key from a PKCS8 PEM file written by ``write_keypair``.

    Refuses (KeyFileError) a missing file, a file readable or writable by group/others
    (like ssh: a key others could read is no longer private), a malformed PEM, a key of
    another algorithm, and a wrong or missing passphrase.
    """
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        raise KeyFileError(
            f"signing key {path} does not exist; create one with `seqr keys generate --out DIR`"
        ) from None
    except OSError as exc:
        raise KeyFileError(f"cannot open signing key {path}: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise KeyFileError(f"signing key {path} is not a regular file")
        mode = stat.S_IMODE(info.st_mode)
        if mode & 0o077:
            raise KeyFileError(
                f"signing key {path} has permissions {mode:04o}, which lets other users read or "
                f"change it; it must be 0600 or stricter: run `chmod 600 {path}`"
            )
        pem = handle.read(MAX_KEY_FILE_BYTES + 1)
    if len(pem) > MAX_KEY_FILE_BYTES:
        raise KeyFileError(
            f"signing key {path} is larger than {MAX_KEY_FILE_BYTES} bytes; not an Ed25519 PEM key"
        )
    try:
        key = serialization.load_pem_private_key(pem, password=passphrase)
    except TypeError:
        # cryptography raises TypeError for "encrypted but no password" and the reverse.
        if passphrase is None:
            raise KeyFileError(
                f"signing key {path} is encrypted; give its passphrase "
                "(--passphrase-env VAR or --passphrase-file FILE)"
            ) from None
        raise KeyFileError(
            f"signing key {path} is not encrypted but a passphrase was given; "
            "drop the passphrase option"
        ) from None
    except UnsupportedAlgorithm as exc:
        raise KeyFileError(f"signing key {path} uses an unsupported algorithm: {exc}") from None
    except ValueError:
        if passphrase is not None and b"ENCRYPTED" in pem:
            raise KeyFileError(
                f"wrong passphrase for signing key {path} (decryption failed)"
            ) from None
        raise KeyFileError(
            f"signing key {path} is not a valid PEM private key; expected the "
            f"{PRIVATE_KEY_NAME} written by `seqr keys generate`"
        ) from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(
            f"signing key {path} is a {type(key).__name__.removeprefix('_')}, not Ed25519; "
            "seqr signs only with Ed25519 keys from `seqr keys generate`"
        )
    return key


def _check_public_length(public: bytes) -> None:
    if len(public) != PUBLIC_KEY_BYTES:
        raise KeyFileError(f"public key must be {PUBLIC_KEY_BYTES} raw bytes, got {len(public)}")


def _create_key_file(path: Path, data: bytes, *, mode: int) -> None:
    # Created with its final mode and never replacing an existing file (see atomic_write).
    try:
        create_new_file(path, data, mode=mode)
    except FileExistsError:
        raise KeyFileError(f"{path} already exists; refusing to overwrite a signing key") from None
