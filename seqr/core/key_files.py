"""Signing keys on disk: ``signing_key.pem`` (PKCS8, 0600) and ``signing_key.pub`` (PEM).

Reading and writing key files only; what a key is and how it signs is signing.py, which does
no file I/O. A private key file is created with mode 0600 from the first byte written
(atomic_write), never overwrites a key, and is refused when group or others may read it (like
ssh). Files are opened without following symlinks and without waiting on a FIFO, and read
within ``MAX_KEY_FILE_BYTES``. No error message ever contains key material: messages name the
file and the mistake, never its content.
"""

from __future__ import annotations

import contextlib
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from seqr.core.atomic_write import create_new_file
from seqr.core.errors import KeyFileError
from seqr.core.signing import (
    CURVE,
    KEY_TYPE,
    MAX_KEY_FILE_BYTES,
    PRIVATE_KEY_NAME,
    PUBLIC_KEY_NAME,
    describe_key,
    fingerprint,
    generate_private_key,
    parse_public_key,
    public_key_bytes,
    public_key_pem,
)

__all__ = ["SigningKeyFile", "write_keypair", "load_private_key", "load_public_key"]


@dataclass(frozen=True)
class SigningKeyFile:
    """A private key file that passed ``load_private_key``, with its passphrase.

    model-signing's signer reads its key from a path (``use_elliptic_key_signer``), so exports
    are signed from this; ``key`` is the same key, loaded and checked here. Neither the key nor
    the passphrase shows in ``repr``.
    """

    path: Path
    key: ec.EllipticCurvePrivateKey = field(repr=False)
    passphrase: bytes | None = field(default=None, repr=False)

    @classmethod
    def open(cls, path: str | Path, passphrase: bytes | None = None) -> SigningKeyFile:
        """Load and check the key at ``path`` (KeyFileError as ``load_private_key``)."""
        path = Path(path)
        return cls(path, load_private_key(path, passphrase), passphrase)

    @property
    def public(self) -> bytes:
        """The DER public key of this key file."""
        return public_key_bytes(self.key)


def load_public_key(path: str | Path) -> bytes:
    """The DER bytes of the public key in a file (PEM, like signing_key.pub, or hex DER).

    Reads at most a few KB of a regular file (no FIFO, folder or symlink); KeyFileError names
    the file and the mistake (a private key given by mistake included), never its content.
    """
    path = Path(path)
    data = _read_key_file(path, what="public key", private=False)
    return parse_public_key(data, what=f"public key file {path}")


def write_keypair(out_dir: Path, passphrase: bytes | None = None) -> str:
    """Create ``signing_key.pem`` (0600, PKCS8) and ``signing_key.pub`` (PEM) in ``out_dir``.

    Refuses to overwrite an existing key (KeyFileError): losing a signing key would orphan
    every adapter signed with it. ``out_dir`` may exist (a folder) or is created (0700); any
    other file there is refused before anything is written. With ``passphrase`` the PEM is
    encrypted with the best available PKCS8 encryption. Returns the new key's fingerprint.
    """
    out_dir = Path(out_dir)
    if passphrase is not None and len(passphrase) == 0:
        raise KeyFileError("passphrase is empty; give a non-empty passphrase or none at all")
    if out_dir.is_symlink() or (out_dir.exists() and not out_dir.is_dir()):
        raise KeyFileError(
            f"{out_dir} exists and is not a folder; --out names a folder for "
            f"{PRIVATE_KEY_NAME} and {PUBLIC_KEY_NAME} (choose a new or existing folder)"
        )
    private_path = out_dir / PRIVATE_KEY_NAME
    public_path = out_dir / PUBLIC_KEY_NAME
    for path in (private_path, public_path):
        if path.exists() or path.is_symlink():
            raise KeyFileError(
                f"{path} already exists; refusing to overwrite a signing key. "
                "Move it away first or choose another --out folder"
            )
    created = _make_key_folder(out_dir)
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
    try:
        # Private key first: a public key without its private half would be useless.
        _create_key_file(private_path, pem, mode=0o600)
        try:
            _create_key_file(public_path, public_key_pem(public), mode=0o644)
        except BaseException:
            with contextlib.suppress(OSError):
                private_path.unlink()
            raise
    except BaseException:
        for folder in created:  # a failed command leaves nothing behind
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    return fingerprint(public)


def key_file_in(path: str | Path) -> Path:
    """What ``--key`` names in every command: a private key file, or the key folder that holds
    it as ``signing_key.pem`` (as `seqr keys generate --out KEYDIR` writes it). A symlinked
    folder is not followed (load_private_key then refuses the symlink itself)."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        return path / PRIVATE_KEY_NAME
    return path


def load_private_key(path: Path, passphrase: bytes | None = None) -> ec.EllipticCurvePrivateKey:
    """Load a P-256 private key from a PKCS8 PEM file written by ``write_keypair``.

    Refuses (KeyFileError) a missing file, a folder, FIFO or symlink, a file readable or
    writable by group/others (like ssh: a key others could read is no longer private), a
    malformed PEM, a key of another type or curve, and a wrong or missing passphrase.
    """
    path = Path(path)
    pem = _read_key_file(path, what="signing key", private=True)
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
    except UnsupportedAlgorithm:
        raise KeyFileError(
            f"signing key {path} uses an algorithm seqr does not support; seqr signs only "
            f"with {KEY_TYPE} keys from `seqr keys generate`"
        ) from None
    except ValueError:
        if passphrase is not None and b"ENCRYPTED" in pem:
            raise KeyFileError(
                f"wrong passphrase for signing key {path} (decryption failed)"
            ) from None
        raise KeyFileError(
            f"signing key {path} is not a valid PEM private key; expected the "
            f"{PRIVATE_KEY_NAME} written by `seqr keys generate`"
        ) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != CURVE.name:
        raise KeyFileError(
            f"signing key {path} is {describe_key(key)}; seqr signs only with {KEY_TYPE} "
            "keys: make one with `seqr keys generate`"
        )
    return key


def _read_key_file(path: Path, *, what: str, private: bool) -> bytes:
    name = PRIVATE_KEY_NAME if private else PUBLIC_KEY_NAME
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer (it is refused just below).
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        raise KeyFileError(
            f"{what} {path} does not exist; create one with `seqr keys generate --out DIR`"
        ) from None
    except OSError as exc:
        why = "it is a symlink" if path.is_symlink() else exc.strerror
        raise KeyFileError(
            f"cannot open {what} {path}: {why}; give the {name} file itself"
        ) from None
    try:
        # fstat before fdopen: io refuses a folder with a raw IsADirectoryError.
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            kind = "a folder" if stat.S_ISDIR(info.st_mode) else "not a regular file"
            raise KeyFileError(
                f"{what} {path} is {kind}; give the {name} file (e.g. KEYDIR/{name})"
            )
        mode = stat.S_IMODE(info.st_mode)
        if private and mode & 0o077:
            raise KeyFileError(
                f"signing key {path} has permissions {mode:04o}, which lets other users read or "
                f"change it; it must be 0600 or stricter: run `chmod 600 {path}`"
            )
        os.set_blocking(fd, True)
        with os.fdopen(os.dup(fd), "rb") as handle:
            pem = handle.read(MAX_KEY_FILE_BYTES + 1)
    finally:
        os.close(fd)
    if len(pem) > MAX_KEY_FILE_BYTES:
        raise KeyFileError(f"{what} {path} is larger than {MAX_KEY_FILE_BYTES} bytes; not a key")
    return pem


def _make_key_folder(out_dir: Path) -> list[Path]:
    """Create ``out_dir`` and missing parents (0700: a new key folder is owner-only).

    Returns the folders created, deepest first, so a failure can remove exactly those.
    """
    missing: list[Path] = []
    probe = out_dir
    while not probe.exists() and not probe.is_symlink():
        missing.append(probe)
        if probe.parent == probe:
            break
        probe = probe.parent
    try:
        out_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise KeyFileError(f"cannot create key folder {out_dir}: {exc.strerror}") from None
    return missing


def _create_key_file(path: Path, data: bytes, *, mode: int) -> None:
    # Created with its final mode and never replacing an existing file (see atomic_write).
    try:
        create_new_file(path, data, mode=mode)
    except FileExistsError:
        raise KeyFileError(f"{path} already exists; refusing to overwrite a signing key") from None
    except OSError as exc:
        raise KeyFileError(f"cannot write {path}: {exc.strerror}") from None
