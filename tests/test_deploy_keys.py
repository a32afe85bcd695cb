"""`seqr deploy certs` and `seqr deploy node-key`: real TLS handshakes against the certificate,
the node key read by Flower's own loaders, and files that are never overwritten."""

from __future__ import annotations

import socket
import ssl
import stat
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key

from seqr.core.errors import ConfigError, KeyFileError
from seqr.deploy import certs, node_keys
from seqr.deploy.certs import CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY, CertConfig, make_certs
from seqr.deploy.node_keys import make_node_key


def handshake(folder: Path, ca_folder: Path, server_hostname: str) -> None:
    """One TLS handshake: server with folder's certificate, client trusting ca_folder's CA."""
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(folder / SERVER_CERT, folder / SERVER_KEY)
    client_ctx = ssl.create_default_context(cafile=str(ca_folder / CA_CERT))
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        conn, _ = listener.accept()
        try:
            with server_ctx.wrap_socket(conn, server_side=True):
                pass
        except (ssl.SSLError, OSError):
            pass  # the client's verdict is what the test checks

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
            client_ctx.wrap_socket(raw, server_hostname=server_hostname) as tls,
        ):
            assert tls.version() in ("TLSv1.2", "TLSv1.3")
    finally:
        thread.join(timeout=10)
        listener.close()


def test_server_certificate_verifies_for_localhost_and_loopback_addresses(tmp_path: Path) -> None:
    make_certs(tmp_path / "pki")
    for name in ("localhost", "127.0.0.1"):
        handshake(tmp_path / "pki", tmp_path / "pki", name)


def test_a_name_not_in_the_certificate_is_rejected(tmp_path: Path) -> None:
    make_certs(tmp_path / "pki")
    with pytest.raises(ssl.SSLCertVerificationError, match="mismatch|doesn't match"):
        handshake(tmp_path / "pki", tmp_path / "pki", "superlink.example.org")


def test_a_certificate_from_another_ca_is_rejected(tmp_path: Path) -> None:
    make_certs(tmp_path / "pki")
    make_certs(tmp_path / "other")
    with pytest.raises(ssl.SSLCertVerificationError, match="unable to get local issuer"):
        handshake(tmp_path / "pki", tmp_path / "other", "localhost")


def test_extra_hosts_land_in_the_subject_alternative_names(tmp_path: Path) -> None:
    paths = make_certs(tmp_path, CertConfig(hosts=("superlink.lan", "10.0.0.7"), days=2))
    cert = x509.load_pem_x509_certificate(paths[SERVER_CERT].read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["superlink.lan"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["10.0.0.7"]
    days = (cert.not_valid_after_utc - cert.not_valid_before_utc).days
    assert days == 2
    ca = x509.load_pem_x509_certificate(paths[CA_CERT].read_bytes())
    cert.verify_directly_issued_by(ca)


def test_private_keys_are_owner_only_and_nothing_is_overwritten(tmp_path: Path) -> None:
    paths = make_certs(tmp_path)
    modes = {name: stat.S_IMODE(path.stat().st_mode) for name, path in paths.items()}
    assert modes == {CA_CERT: 0o644, CA_KEY: 0o600, SERVER_CERT: 0o644, SERVER_KEY: 0o600}
    before = {name: path.read_bytes() for name, path in paths.items()}
    with pytest.raises(KeyFileError, match="refusing to overwrite"):
        make_certs(tmp_path)
    assert {name: path.read_bytes() for name, path in paths.items()} == before
    assert certs.main(["--out", str(tmp_path)]) == 1


@pytest.mark.parametrize(
    ("changes", "field"),
    [({"hosts": ()}, "hosts"), ({"hosts": ("bad host",)}, "hosts"),
     ({"hosts": ("a", "a")}, "hosts"), ({"days": 0}, "days"), ({"days": 4000}, "days"),
     ({"ca_name": ""}, "ca_name")],
)  # fmt: skip
def test_cert_config_names_the_bad_field(changes: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigError, match=f"CertConfig.{field}"):
        CertConfig(**changes)  # type: ignore[arg-type]


def test_node_key_is_read_by_flowers_own_loaders(tmp_path: Path) -> None:
    from flwr.cli.supernode.register import try_load_public_key
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes

    private, public = make_node_key(tmp_path / "node-keys")
    key = load_ssh_private_key(private.read_bytes(), None)  # what flower-supernode does
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
    assert try_load_public_key(public) == public_key_to_bytes(key.public_key())
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert public.read_text().startswith("ecdsa-sha2-nistp384 ")


def test_node_key_cli_prints_the_fingerprint_and_never_overwrites(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert node_keys.main(["--out", str(tmp_path), "--name", "alice"]) == 0
    out = capsys.readouterr().out
    first = (tmp_path / "alice").read_bytes()
    assert node_keys.ssh_fingerprint((tmp_path / "alice.pub").read_bytes()) in out
    assert node_keys.main(["--out", str(tmp_path), "--name", "alice"]) == 1
    assert (tmp_path / "alice").read_bytes() == first
    with pytest.raises(ConfigError, match="node key name"):
        make_node_key(tmp_path, "../escape")
