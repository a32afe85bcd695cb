"""``seqr deploy certs``: a test CA and a SuperLink TLS certificate signed by it.

Flower encrypts SuperLink <-> SuperNode traffic with TLS, and SuperNode authentication is only
available over TLS (Flower docs, "Enable TLS connections"). The SuperLink takes
``--ssl-ca-certfile ca.crt --ssl-certfile server.pem --ssl-keyfile server.key``; every SuperNode
and ``flwr`` connection trusts ``ca.crt`` (``--root-certificates``). Clients check the server
certificate's subject alternative names (RFC 6125), so it lists every name and address clients
dial: by default localhost, 127.0.0.1 and ::1. For a real deployment use your organisation's CA;
this one is for tests and first trials (its key sits next to the certificates).

Keys are ECDSA P-384, signatures SHA-384. The CA may sign end-entity certificates only
(basicConstraints pathLen 0, keyCertSign); the server certificate is for serverAuth only.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from seqr.cli.help import DefaultsHelpFormatter
from seqr.core.errors import ConfigError, SeqrError
from seqr.deploy.files import PRIVATE_MODE, PUBLIC_MODE, write_new_files

__all__ = ["CertConfig", "CA_CERT", "CA_KEY", "SERVER_CERT", "SERVER_KEY", "make_certs", "main"]

CA_CERT, CA_KEY = "ca.crt", "ca.key"
SERVER_CERT, SERVER_KEY = "server.pem", "server.key"
DEFAULT_HOSTS = ("localhost", "127.0.0.1", "::1")
_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"  # RFC 1123 host name label
_HOSTNAME = re.compile(rf"^(?=.{{1,253}}$){_LABEL}(\.{_LABEL})*$")


@dataclass(frozen=True)
class CertConfig:
    """What the test PKI holds: the names the server answers to and how long it lasts."""

    hosts: tuple[str, ...] = DEFAULT_HOSTS  # DNS names and IP addresses (subjectAltName)
    days: int = 365  # validity of both certificates
    ca_name: str = "seqr test CA"

    def __post_init__(self) -> None:
        hosts = tuple(self.hosts)
        if not hosts:
            raise ConfigError("CertConfig.hosts is empty; give the names clients dial")
        for host in hosts:
            if not isinstance(host, str) or not (_is_ip(host) or _HOSTNAME.match(host)):
                raise ConfigError(
                    f"CertConfig.hosts: {host!r} is neither an IP address nor a DNS name"
                )
        if len(set(hosts)) != len(hosts):
            raise ConfigError(f"CertConfig.hosts has duplicates: {hosts}")
        object.__setattr__(self, "hosts", hosts)
        if isinstance(self.days, bool) or not isinstance(self.days, int) or self.days < 1:
            raise ConfigError(f"CertConfig.days = {self.days!r} must be an integer >= 1")
        if self.days > 3650:
            raise ConfigError(f"CertConfig.days = {self.days} is over 3650 (ten years)")
        if not isinstance(self.ca_name, str) or not 0 < len(self.ca_name) <= 64:
            raise ConfigError(f"CertConfig.ca_name = {self.ca_name!r} must be 1-64 characters")


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _san(hosts: Sequence[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = [
        x509.IPAddress(ipaddress.ip_address(h)) if _is_ip(h) else x509.DNSName(h) for h in hosts
    ]
    return x509.SubjectAlternativeName(names)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),  # the SuperLink reads it unattended; protect by 0600
    )


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    """A CA signs certificates and CRLs only; the server signs and agrees keys (ECDHE)."""
    return x509.KeyUsage(
        digital_signature=not ca,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=not ca,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def build_certs(config: CertConfig, now: dt.datetime | None = None) -> dict[str, bytes]:
    """The four PEM files by name (nothing written)."""
    now = now or dt.datetime.now(dt.UTC)
    start, end = now - dt.timedelta(minutes=5), now + dt.timedelta(days=config.days)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, config.ca_name)])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_subject)
        .issuer_name(ca_subject)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(ca=True), critical=True)
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, config.hosts[0])]))
        .issuer_name(ca_subject)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(_san(config.hosts), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(ca=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(server_key.public_key()), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
        )
        .sign(ca_key, hashes.SHA384())
    )
    return {
        CA_CERT: ca_cert.public_bytes(serialization.Encoding.PEM),
        CA_KEY: _pem_key(ca_key),
        SERVER_CERT: server_cert.public_bytes(serialization.Encoding.PEM),
        SERVER_KEY: _pem_key(server_key),
    }


def make_certs(out_dir: Path, config: CertConfig | None = None) -> dict[str, Path]:
    """Write ca.crt, ca.key, server.pem, server.key into ``out_dir`` (never overwriting)."""
    files = build_certs(config or CertConfig())
    modes = {CA_CERT: PUBLIC_MODE, CA_KEY: PRIVATE_MODE, SERVER_CERT: PUBLIC_MODE,
             SERVER_KEY: PRIVATE_MODE}  # fmt: skip
    write_new_files(Path(out_dir), {n: (data, modes[n]) for n, data in files.items()})
    return {name: Path(out_dir) / name for name in files}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="seqr deploy certs",
        description="Create a test CA (ca.crt, ca.key) and a SuperLink TLS certificate "
        "(server.pem, server.key) with the given subject alternative names. Refuses to "
        "overwrite existing files.",
        formatter_class=DefaultsHelpFormatter,
    )
    parser.add_argument("--out", type=Path, required=True, help="folder for the four files")
    parser.add_argument("--host", action="append", default=None, metavar="NAME_OR_IP",
                        help="a name or address clients dial (repeatable; default: localhost, "
                        "127.0.0.1, ::1)")  # fmt: skip
    parser.add_argument("--days", type=int, default=365, help="validity in days")
    args = parser.parse_args(argv)
    try:
        config = CertConfig(hosts=tuple(args.host or DEFAULT_HOSTS), days=args.days)
    except ConfigError as exc:
        parser.error(str(exc))
    try:
        paths = make_certs(args.out, config)
    except SeqrError as exc:
        print(f"seqr deploy certs: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"seqr deploy certs: error: cannot write to {args.out}: {exc}", file=sys.stderr)
        return 1
    cert = x509.load_pem_x509_certificate(paths[CA_CERT].read_bytes())
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    print(f"server names: {', '.join(config.hosts)}; valid {config.days} days")
    print(
        f"CA SHA-256 fingerprint (check it out of band): {cert.fingerprint(hashes.SHA256()).hex()}"
    )
    return 0
