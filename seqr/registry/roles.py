"""TUF roles of a seqr registry, built and checked with python-tuf's Metadata API.

One set of server keys holds all four top-level roles with one k-of-n threshold (the
operator's keys; TUF spec 1.0 section 2.1 allows a key in several roles). A root rotation is
signed by a threshold of the old root AND of the new one (spec 5.3.4), which python-tuf's
``Root.get_root_verification_result`` checks. Every file the publisher writes is verified
with the same library calls a client makes before it reaches the disk (verify before use).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from securesystemslib.signer import CryptoSigner, Key, SSlibKey
from tuf.api.metadata import TOP_LEVEL_ROLE_NAMES, Metadata, MetaFile, Root, Signed
from tuf.api.serialization.json import JSONSerializer

from seqr.core import signing
from seqr.core.errors import ConfigError, FormatError, KeyFileError, RegistryError
from seqr.registry import layout

__all__ = [
    "signer_for",
    "tuf_key",
    "new_root",
    "sign",
    "parse",
    "check_signed",
    "check_root_keys",
    "meta_file",
    "role_keys",
    "check_signers",
    "sign_next_root",
]

MAX_SERVER_KEYS = 64
_SERIALIZER = JSONSerializer(compact=False)


def signer_for(private_key: Any) -> CryptoSigner:
    """A securesystemslib signer for a server key loaded by seqr.core.signing."""
    try:
        return CryptoSigner(private_key)
    except (ValueError, TypeError) as exc:
        raise KeyFileError(f"server key cannot sign TUF metadata: {exc}") from None


def tuf_key(public: bytes) -> Key:
    """The TUF key object of public key bytes (seqr.core.signing.public_key_bytes)."""
    return SSlibKey.from_crypto(signing.check_public_key(public))


def new_root(keys: Sequence[Key], threshold: int, expires: datetime) -> Metadata[Root]:
    """Root version 1: every key in every top-level role, ``threshold`` of them needed."""
    if not 1 <= len(keys) <= MAX_SERVER_KEYS:
        raise RegistryError(f"a root needs 1 to {MAX_SERVER_KEYS} keys, got {len(keys)}")
    if len({k.keyid for k in keys}) != len(keys):
        raise RegistryError("the same server key was given twice; each key counts once")
    if not 1 <= threshold <= len(keys):
        raise RegistryError(f"threshold {threshold} must be between 1 and {len(keys)} keys")
    root = Root(expires=expires, consistent_snapshot=True)
    for role in TOP_LEVEL_ROLE_NAMES:
        for key in keys:
            root.add_key(key, role)
        root.roles[role].threshold = threshold
    return Metadata(root)


def sign(metadata: Metadata[Any], signers: Sequence[CryptoSigner]) -> bytes:
    """Replace every signature with one per signer and return the file bytes."""
    metadata.signatures.clear()
    for signer in signers:
        metadata.sign(signer, append=True)
    return metadata.to_bytes(_SERIALIZER)


def parse(data: bytes, cls: type[Signed], what: str) -> Metadata[Any]:
    """Deserialise TUF metadata of one role type; FormatError on anything else."""
    try:
        metadata = Metadata[Any].from_bytes(data)
    except Exception as exc:  # the deserializer wraps every parse error differently
        raise FormatError(f"{what} is not valid TUF metadata: {exc}") from None
    if not isinstance(metadata.signed, cls):
        raise FormatError(f"{what} is {metadata.signed.type} metadata, expected {cls.type}")
    return metadata


def check_signed(root: Root, role: str, metadata: Metadata[Any], what: str) -> None:
    """A threshold of ``root``'s keys for ``role`` signed ``metadata`` (spec 5.4.2 etc.)."""
    result = root.get_verification_result(role, metadata.signed_bytes, metadata.signatures)
    if not result:
        raise RegistryError(
            f"{what} is signed by {len(result.signed)} of the {result.threshold} {role} keys "
            "it needs (wrong threshold or wrong keys)"
        )


def check_root_keys(root: Root, what: str) -> None:
    """Each key counts once toward a threshold (spec 4.3): python-tuf counts key ids, so
    one key listed under two key ids would count twice; refuse such a root."""
    seen: dict[str, str] = {}
    for keyid, key in root.keys.items():
        value = repr((key.keytype, sorted(key.keyval.items())))
        if value in seen:
            raise RegistryError(f"{what} lists one key under two key ids ({seen[value]}, {keyid})")
        seen[value] = keyid


def role_keys(root: Root, role: str) -> dict[str, Key]:
    return {keyid: root.get_key(keyid) for keyid in root.roles[role].keyids}


def meta_file(version: int, data: bytes) -> MetaFile:
    """Version, length and SHA-256 of a metadata file (spec 4.4: length and hashes optional;
    both given, so a client bounds the download and checks it before parsing)."""
    return MetaFile.from_data(version, data, ["sha256"])


def is_root_key(root: Root, public: bytes) -> bool:
    """Whether ``public`` (DER) is one of the root's keys: a server key of this registry."""
    try:
        key = tuf_key(public)
    except KeyFileError:
        return False
    return any(k.keytype == key.keytype and k.keyval == key.keyval for k in root.keys.values())


def check_signers(signers: Sequence[CryptoSigner], root: Root) -> None:
    """Every given key is a key of ``root`` and together they meet each role's threshold
    (the publisher checks this before anything is staged or written)."""
    for signer in signers:
        if signer.public_key.keyid not in root.keys:
            raise KeyFileError(
                f"server key {signer.public_key.keyid} is not one of the keys of root "
                f"{root.version} of this registry; give the registry's own server key"
            )
    mine = {s.public_key.keyid for s in signers}
    for role in TOP_LEVEL_ROLE_NAMES:
        have = len(mine & set(root.roles[role].keyids))
        if have < root.roles[role].threshold:
            raise KeyFileError(
                f"the registry's {role} role needs {root.roles[role].threshold} of its "
                f"keys; {have} given (repeat --key for k-of-n)"
            )


def sign_next_root(new: Metadata[Root], current: Root, signers: Sequence[CryptoSigner]) -> bytes:
    """The signed bytes of root N+1, checked as a client will check them: a threshold of
    root N's keys AND of its own (TUF spec 5.3.4), each key counted once."""
    unique = {s.public_key.keyid: s for s in signers}
    name = layout.root_name(new.signed.version)
    data = sign(new, list(unique.values()))
    parsed = parse(data, Root, name)
    check_root_keys(parsed.signed, name)
    if not parsed.signed.get_root_verification_result(
        current, parsed.signed_bytes, parsed.signatures
    ):
        raise ConfigError(
            f"root {new.signed.version} needs {current.roles[Root.type].threshold} "
            f"signature(s) of root {current.version}'s keys and "
            f"{new.signed.roles[Root.type].threshold} of its own; give those keys"
        )
    return data
