"""`seqr client train`: one command from a text folder to a verified, signed export."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from tiny import copy_texts, tiny_model_dir

from seqr.cli.main import main as seqr
from seqr.core.export_folder import read_export
from seqr.core.key_files import write_keypair
from seqr.core.manifest import verify_export_files
from seqr.core.signing import PRIVATE_KEY_NAME


@pytest.fixture
def setup(tmp_path: Path) -> dict[str, Path]:
    write_keypair(tmp_path / "keys")
    federation = tmp_path / "federation.toml"
    federation.write_text(
        f'base-model = "{tiny_model_dir()}"\nlora-rank = 4\ntrain-batch-size = 2\n'
        "train-seq-len = 32\ncalib-max-sequences = 4\n"
    )
    return {
        "data": copy_texts(tmp_path / "shakespeare", ("bisect.py",)),
        "key": tmp_path / "keys" / PRIVATE_KEY_NAME,
        "federation": federation,
        "out": tmp_path / "export",
    }


def _argv(s: dict[str, Path], *extra: str) -> list[str]:
    paths = [
        "--data",
        s["data"],
        "--key",
        s["key"],
        "--out",
        s["out"],
        "--federation",
        s["federation"],
    ]
    return ["client", "train", *map(str, paths), "--quiet", *extra]


@pytest.mark.parametrize("key", ["file", "folder"])
def test_client_train_writes_a_verified_export(setup, capsys, key: str) -> None:  # type: ignore[no-untyped-def]
    if key == "folder":  # --key KEYDIR reads KEYDIR/signing_key.pem, as in the server commands
        setup["key"] = setup["key"].parent
    assert seqr(_argv(setup, "--steps", "2", "--name", "bard")) == 0
    summary = json.loads(capsys.readouterr().out)
    manifest = verify_export_files(read_export(setup["out"]))
    assert manifest.name == "bard" and summary["name"] == "bard"
    assert summary["steps"] == 2 and summary["train_tokens"] == 2 * 2 * 32
    assert summary["adapter_bytes"] == (setup["out"] / "adapter_model.safetensors").stat().st_size
    assert summary["privacy"] is None


def test_unknown_federation_key_exits_2_naming_it(setup, capsys) -> None:  # type: ignore[no-untyped-def]
    setup["federation"].write_text("lora-rank = 4\nlearning-rate = 0.1\n")
    assert seqr(_argv(setup)) == 2
    err = capsys.readouterr().err
    assert "learning-rate" in err and "federation.toml" in err
    assert not setup["out"].exists()


def test_out_of_range_steps_exits_2(setup, capsys) -> None:  # type: ignore[no-untyped-def]
    assert seqr(_argv(setup, "--steps", "0")) == 2
    assert "train-steps = 0" in capsys.readouterr().err
    assert not setup["out"].exists()


def test_missing_key_exits_2_with_the_fix(setup, capsys) -> None:  # type: ignore[no-untyped-def]
    setup["key"].unlink()
    assert seqr(_argv(setup)) == 2
    assert "seqr keys generate" in capsys.readouterr().err
    assert not setup["out"].exists()


def _tree(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.mark.parametrize("case", ["folder", "fifo", "symlink"])
def test_key_that_is_not_a_key_file_exits_2_without_traceback_or_leftovers(
    setup, capsys, case: str
) -> None:  # type: ignore[no-untyped-def]
    """Issue 14 item 16: `client train --key DIR` (and a FIFO or a symlink) gave a traceback.
    A key folder is read as KEYDIR/signing_key.pem (--key means the same in every command);
    a folder without one is named."""
    keys = setup["key"].parent
    if case == "folder":
        setup["key"] = keys / "empty"  # a folder that holds no signing_key.pem
        setup["key"].mkdir()
    elif case == "fifo":
        setup["key"] = keys / "fifo.pem"
        os.mkfifo(setup["key"], 0o600)  # nobody writes: opening it must not hang
    else:
        setup["key"] = keys / "link.pem"
        setup["key"].symlink_to(keys / PRIVATE_KEY_NAME)
    root = setup["out"].parent
    before = _tree(root)
    assert seqr(_argv(setup)) == 2
    err = capsys.readouterr().err
    assert err.startswith("seqr client train: error: ") and err.count("\n") == 1
    what = {"folder": "does not exist", "fifo": "not a regular file", "symlink": "symlink"}[case]
    assert "signing key" in err and what in err
    assert "Traceback" not in err and "Errno" not in err and PRIVATE_KEY_NAME in err
    assert _tree(root) == before  # no export, no checkpoints, nothing else
