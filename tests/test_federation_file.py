"""A federation file that is a folder, missing, a FIFO, oversized or not UTF-8 is a clear
error in words (never a raw errno or a traceback), from the library and from the CLIs that
load one (`seqr client train --federation`, `seqr server init --federation`)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from seqr.cli.client import main as client_main
from seqr.cli.server import init_main
from seqr.core import key_files
from seqr.core.errors import ConfigError
from seqr.core.federation import MAX_FEDERATION_BYTES, FederationConfig


def _case(tmp_path: Path, case: str) -> Path:
    path = tmp_path / "fed.toml"
    if case == "folder":
        path.mkdir()
    elif case == "fifo":
        os.mkfifo(path)
    elif case == "huge":
        path.write_bytes(b"# " + b"x" * MAX_FEDERATION_BYTES + b"\n")
    elif case == "latin1":
        path.write_bytes("base-model = 'caf\xe9'\n".encode("latin-1"))
    return path


CASES = {
    "folder": "is a folder; give the TOML file itself",
    "missing": "does not exist; check the path",
    "fifo": "is not a regular file",
    "huge": "is over 1048576 bytes",
    "latin1": "is not UTF-8 text",
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_federation_file_is_a_clear_error(tmp_path: Path, case: str) -> None:
    path = _case(tmp_path, case)
    with pytest.raises(ConfigError, match=CASES[case]) as info:
        FederationConfig.from_toml(path)
    assert "Errno" not in str(info.value) and str(path) in str(info.value)


def test_unreadable_federation_file_names_the_reason_in_words(tmp_path: Path) -> None:
    path = tmp_path / "fed.toml"
    path.write_text("lora-rank = 8\n")
    path.chmod(0)
    if os.access(path, os.R_OK):  # root reads anything: make it a folder of the same name
        path.unlink()
        path.mkdir()
    with pytest.raises(ConfigError) as info:
        FederationConfig.from_toml(path)
    assert "Errno" not in str(info.value)


@pytest.mark.parametrize("case", ["folder", "missing"])
def test_client_train_with_a_bad_federation_path_leaves_nothing(
    tmp_path: Path, case: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _case(tmp_path, case)
    out = tmp_path / "export"
    code = client_main(["--data", str(tmp_path), "--key", str(tmp_path / "k.pem"),
                        "--out", str(out), "--federation", str(path), "--quiet"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and CASES[case] in err
    assert "Errno" not in err and "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize("case", ["folder", "missing"])
def test_server_init_with_a_bad_federation_path_creates_no_registry(
    tmp_path: Path, case: str, capsys: pytest.CaptureFixture[str]
) -> None:
    key_files.write_keypair(tmp_path / "server-key")
    path = _case(tmp_path, case)
    registry = tmp_path / "registry"
    code = init_main(["--registry", str(registry), "--key", str(tmp_path / "server-key"),
                      "--federation", str(path)])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and CASES[case] in err and "Errno" not in err
    assert not registry.exists()
