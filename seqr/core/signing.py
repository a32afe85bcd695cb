"""ECDSA P-256 signing keys: adapter exports, group records and registry metadata.

Why P-256: OpenSSF model signing (model-signing 1.x, which signs adapter exports) signs with
elliptic-curve keys only, and one key type everywhere means one parser and one set of checks.
Every key seqr makes or accepts is NIST P-256 (FIPS 186-5; SEC 2 secp256r1); every other key
type, Ed25519 included, is refused by type, so small-order Ed25519 points (issue 14) cannot
appear at all, and the curve library (OpenSSL via ``cryptography``) checks that each point is
on the curve.

Public keys travel as bytes: DER SubjectPublicKeyInfo with an uncompressed point (RFC 5480),
always ``PUBLIC_KEY_BYTES`` long; files hold the same as PEM (``signing_key.pub``, the file
``model_signing verify key --public_key`` takes). Encodings are canonical (parsed, re-encoded and
compared), so one key has exactly one byte string and keys are compared as whole bytes, never by
a short id. A key's name is its full fingerprint, ``sha256:`` + 64 hex of SHA-256(DER).

``sign`` makes ECDSA-SHA256 signatures as r || s (32 bytes each, IEEE P1363; JWS ES256, RFC 7518
section 3.4) with low s (s <= n/2): a fixed length, and nobody can turn a signature into a
second valid one by replacing s with n - s. ``verify`` accepts only that form. Signatures cover
the EXACT bytes given (DSSE's approach, docs/THREATS.md).

Private keys live in a PKCS8 PEM file created with mode 0600 from the first byte written,
optionally encrypted with a passphrase (key_files.py reads and writes key files; this module
does no file I/O). No error message ever contains key material: messages name the file and
the mistake, never its content.

These keys are not Flower's transport keys: SuperNode authentication leaves no signature that
anyone can check later, so adapters carry their own.
"""

from __future__ import annotations

import binascii
import hashlib

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

from seqr.core.errors import KeyFileError, SignatureError

__all__ = [
    "PRIVATE_KEY_NAME",
    "PUBLIC_KEY_NAME",
    "PUBLIC_KEY_BYTES",
    "SIGNATURE_BYTES",
    "FINGERPRINT_PREFIX",
    "KEY_TYPE",
    "MAX_KEY_FILE_BYTES",
    "generate_private_key",
    "public_key_bytes",
    "public_key_pem",
    "check_public_key",
    "parse_public_key",
    "fingerprint",
    "sign",
    "verify",
    "describe_key",
]

PRIVATE_KEY_NAME = "signing_key.pem"
PUBLIC_KEY_NAME = "signing_key.pub"
KEY_TYPE = "ECDSA P-256"
CURVE = ec.SECP256R1()
PUBLIC_KEY_BYTES = 91  # DER SubjectPublicKeyInfo of a P-256 key, uncompressed point (RFC 5480)
SIGNATURE_BYTES = 64  # r || s, 32 bytes each (IEEE P1363)
FINGERPRINT_PREFIX = "sha256:"
MAX_KEY_FILE_BYTES = 16 * 1024  # bytes; a P-256 PKCS8 PEM is ~240 (encrypted ~400)
# The group order n of P-256 (FIPS 186-5 / SEC 2 section 2.4.2): low s means s <= n // 2.
_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
_HALF_BYTES = SIGNATURE_BYTES // 2


def generate_private_key() -> ec.EllipticCurvePrivateKey:
    """A fresh P-256 key from the OS CSPRNG (OpenSSL)."""
    return ec.generate_private_key(CURVE)


def public_key_bytes(key: ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey) -> bytes:
    """The DER SubjectPublicKeyInfo bytes of a P-256 private or public key."""
    public = key.public_key() if isinstance(key, ec.EllipticCurvePrivateKey) else key
    if not isinstance(public, ec.EllipticCurvePublicKey) or public.curve.name != CURVE.name:
        raise KeyFileError(f"seqr uses only {KEY_TYPE} keys; got {describe_key(public)}")
    return public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def check_public_key(public: bytes, *, what: str = "public key") -> ec.EllipticCurvePublicKey:
    """The key object of canonical DER bytes of a P-256 public key; KeyFileError otherwise.

    Refuses other key types (Ed25519, RSA, ...), other curves, points not on the curve and
    non-canonical encodings (a compressed point, trailing bytes), naming only what is wrong.
    """
    if not isinstance(public, bytes | bytearray | memoryview):
        raise KeyFileError(f"{what} must be bytes (DER SubjectPublicKeyInfo)")
    data = bytes(public)
    if len(data) > MAX_KEY_FILE_BYTES:
        raise KeyFileError(f"{what} is {len(data)} bytes; a {KEY_TYPE} key is {PUBLIC_KEY_BYTES}")
    try:
        key = serialization.load_der_public_key(data)
    except (ValueError, UnsupportedAlgorithm):
        # OpenSSL also refuses a point that is not on its curve here.
        raise KeyFileError(
            f"{what} is not a valid public key (DER SubjectPublicKeyInfo of a point on its "
            f"curve); seqr uses {KEY_TYPE} keys from `seqr keys generate`"
        ) from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != CURVE.name:
        raise KeyFileError(
            f"{what} is {describe_key(key)}; seqr accepts only {KEY_TYPE} keys "
            "(make one with `seqr keys generate`)"
        )
    if public_key_bytes(key) != data:
        raise KeyFileError(
            f"{what} is not in canonical form (DER with an uncompressed point, "
            f"{PUBLIC_KEY_BYTES} bytes); write it with `seqr keys generate`"
        )
    return key


def public_key_pem(public: bytes) -> bytes:
    """PEM text (``-----BEGIN PUBLIC KEY-----``) of DER public-key bytes, as in signing_key.pub."""
    return check_public_key(public).public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def parse_public_key(text: str | bytes, *, what: str = "public key") -> bytes:
    """Parse a public key given as text: PEM (signing_key.pub) or hex of its DER bytes.

    Returns the canonical DER bytes. A private key given by mistake, or anything else, is a
    KeyFileError that names the mistake and never repeats the text.
    """
    data = text.encode("utf-8", "replace") if isinstance(text, str) else bytes(text)
    if len(data) > MAX_KEY_FILE_BYTES:
        raise KeyFileError(f"{what} is over {MAX_KEY_FILE_BYTES} bytes; not a public key")
    if b"PRIVATE KEY" in data:
        raise KeyFileError(
            f"{what} is a PRIVATE key ({PRIVATE_KEY_NAME}); give the public key "
            f"{PUBLIC_KEY_NAME} instead, and keep the private key secret"
        )
    stripped = data.strip()
    if stripped.startswith(b"-----BEGIN"):
        try:
            key = serialization.load_pem_public_key(stripped)
        except (ValueError, UnsupportedAlgorithm):
            raise KeyFileError(
                f"{what} is not a valid PEM public key; expected the {PUBLIC_KEY_NAME} "
                "written by `seqr keys generate`"
            ) from None
        der = _der(key)
        check_public_key(der, what=what)
        return der
    try:
        der = binascii.unhexlify(stripped)
    except (binascii.Error, ValueError):
        raise KeyFileError(
            f"{what} is neither PEM (-----BEGIN PUBLIC KEY-----) nor hexadecimal DER; "
            f"expected the {PUBLIC_KEY_NAME} written by `seqr keys generate`"
        ) from None
    check_public_key(der, what=what)
    return der


def fingerprint(public: bytes) -> str:
    """The full name of a public key: ``sha256:`` + 64 hex of SHA-256 of its DER bytes."""
    check_public_key(public)
    return FINGERPRINT_PREFIX + hashlib.sha256(bytes(public)).hexdigest()


def sign(key: ec.EllipticCurvePrivateKey, data: bytes) -> bytes:
    """ECDSA-SHA256 over exactly ``data``: r || s, 64 bytes, low s."""
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != CURVE.name:
        raise KeyFileError(f"seqr signs only with {KEY_TYPE} keys; got {describe_key(key)}")
    r, s = decode_dss_signature(key.sign(bytes(data), ec.ECDSA(hashes.SHA256())))
    s = min(s, _ORDER - s)  # (r, s) and (r, n - s) both verify; keep the low one
    return r.to_bytes(_HALF_BYTES, "big") + s.to_bytes(_HALF_BYTES, "big")


def verify(public: bytes, data: bytes, signature: bytes) -> None:
    """Raise SignatureError unless ``signature`` is ``public``'s signature over exactly ``data``.

    A malformed key, a signature of the wrong length or with high s is a SignatureError too:
    the caller treats every failure to verify the same way (reject the bytes).
    """
    try:
        key = check_public_key(bytes(public))
    except KeyFileError as exc:
        raise SignatureError(f"cannot verify: {exc}") from None
    if len(signature) != SIGNATURE_BYTES:
        raise SignatureError(
            f"signature must be {SIGNATURE_BYTES} bytes (r || s), got {len(signature)}; "
            "is the signature truncated or hex-encoded?"
        )
    r = int.from_bytes(signature[:_HALF_BYTES], "big")
    s = int.from_bytes(signature[_HALF_BYTES:], "big")
    if not (0 < r < _ORDER and 0 < s <= _ORDER // 2):
        raise SignatureError(
            "signature is not in canonical form (0 < r < n, 0 < s <= n/2); "
            "it was not made by seqr's sign or was altered"
        )
    try:
        key.verify(encode_dss_signature(r, s), bytes(data), ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise SignatureError(
            f"signature does not verify for key {fingerprint(bytes(public))} over "
            f"{len(data)} bytes: the data was changed or signed by another key"
        ) from None


def _der(key: object) -> bytes:
    public_bytes = getattr(key, "public_bytes", None)
    if public_bytes is None:
        raise KeyFileError("not a public key")
    data: bytes = public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return data


def describe_key(key: object) -> str:
    """What kind of key this is, in words (never its content)."""
    if isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey):
        return f"an elliptic-curve key on curve {key.curve.name}"
    name = type(key).__name__.removeprefix("_")
    for kind in ("Ed25519", "Ed448", "X25519", "X448", "RSA", "DSA", "DH"):
        if name.startswith(kind):
            return f"an {kind} key" if kind[0] in "AEIRX" else f"a {kind} key"
    return "not a supported key"
