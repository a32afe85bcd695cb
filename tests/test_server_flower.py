"""End to end through Flower: our own SuperLink (simulation), `flwr run` with 3 simulated
SuperNodes training the tiny model, then the registry's own audit of what was published.

The app runs from a folder built here (the seqr packages plus a pyproject.toml whose
[tool.flwr.app.config] lists every key the run uses: Flower refuses --run-config keys that
pyproject does not declare).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tiny import build_tiny_llama, copy_texts

from seqr_core import signing
from seqr_core.base_model import load_base_model
from seqr_core.registry.audit import audit_registry
from seqr_core.signing import PRIVATE_KEY_NAME, PUBLIC_KEY_NAME
from server.federation_setup import setup_federation
from server.registry_ops import init_registry, open_publisher
from server.round import ReplayStore
from server.settings import federation_from_run_config, state_dir_for

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
FEDERATION = {  # the federation keys of the run config (tiny and fast)
    "lora-rank": 4,
    "lora-alpha": 8,
    "train-steps": 4,
    "train-batch-size": 4,
    "train-seq-len": 32,
    "calib-max-sequences": 8,
}
PYPROJECT = """\
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "seqr-e2e"
version = "0.1.0"
description = "seqr end-to-end test app"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "seqr"

[tool.flwr.app.components]
serverapp = "server.server_app:app"
clientapp = "client.client_app:app"

[tool.flwr.app.config]
registry-dir = ""
server-keys = ""
base-model = ""
data-dir = ""
signing-key = ""
num-server-rounds = 1
train-timeout-s = 240.0
{federation}
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _app_folder(dest: Path) -> Path:
    for package in ("seqr_core", "client", "server"):
        for path in (REPO / package).rglob("*.py"):
            target = dest / path.relative_to(REPO)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
    federation = "\n".join(f"{k} = {v}" for k, v in FEDERATION.items())
    (dest / "pyproject.toml").write_text(PYPROJECT.format(federation=federation))
    return dest


def _process_groups(root_pid: int) -> set[int]:
    """Process groups of ``root_pid`` and its descendants (Flower's SuperExec starts its own
    group, and Ray actors outlive their parent inside it)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                parents[int(entry.name)] = int(fields[1])
    tree, frontier = {root_pid}, [root_pid]
    while frontier:
        pid = frontier.pop()
        for child, parent in parents.items():
            if parent == pid and child not in tree:
                tree.add(child)
                frontier.append(child)
    groups = set()
    for pid in tree:
        with contextlib.suppress(OSError):
            groups.add(os.getpgid(pid))
    return groups


def _stop(process: subprocess.Popen[bytes]) -> None:
    groups = _process_groups(process.pid) | {process.pid}  # its own session: pgid == pid
    for group in groups:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(group, signal.SIGTERM)
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        for group in groups:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(group, signal.SIGKILL)
        process.wait(timeout=15)


def _wait_for_port(port: int, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"flower-superlink exited: {log.read_text()[-2000:]}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
            return
        time.sleep(0.3)
    raise AssertionError(f"flower-superlink did not listen on {port}: {log.read_text()[-2000:]}")


@pytest.mark.flower
def test_flower_run_admits_enrolled_clients_and_publishes_an_auditable_registry(
    tmp_path: Path,
) -> None:
    # Prepare: tiny model, 3 data partitions with their keys, a registry with 2 enrolled.
    model = build_tiny_llama(tmp_path / "tiny-llama")
    data, keys = tmp_path / "data", tmp_path / "keys"
    for i, names in enumerate([("bisect.py", "heapq.py"), ("textwrap.py",), ("colorsys.py",)]):
        copy_texts(data / f"p{i}", names)
        signing.write_keypair(keys / f"p{i}")
    signing.write_keypair(tmp_path / "server-key")
    server_keys = [signing.load_private_key(tmp_path / "server-key" / PRIVATE_KEY_NAME)]
    base = load_base_model(str(model))
    fed = federation_from_run_config({**FEDERATION, "base-model": str(model)})
    registry = tmp_path / "registry"
    init_registry(registry, server_keys, setup=setup_federation(fed, base.model, base.sha256))
    with open_publisher(registry, server_keys, None) as publisher:
        for i in (0, 1):  # p2 is not enrolled: its adapter must be refused
            publisher.enrol_client(bytes.fromhex((keys / f"p{i}" / PUBLIC_KEY_NAME).read_text()))
        publisher.publish()
    app = _app_folder(tmp_path / "app")
    home = tmp_path / "flwr-home"
    home.mkdir()
    port = _free_port()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "e2e"\n\n[superlink.e2e]\naddress = "127.0.0.1:{port}"\n'
        "insecure = true\n"
    )
    env = {**os.environ, "FLWR_HOME": str(home), "FLWR_TELEMETRY_ENABLED": "0",
           "FLWR_DISABLE_UPDATE_CHECK": "1"}  # fmt: skip
    log = tmp_path / "superlink.log"
    with log.open("wb") as out:
        superlink = subprocess.Popen(
            [str(BIN / "flower-superlink"), "--insecure", "--simulation",
             "--disable-runtime-dependency-installation", "--host", "127.0.0.1",
             "--port", str(port)],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        _wait_for_port(port, superlink, log)
        run_config = " ".join(
            f'{k}="{v}"'
            for k, v in {
                "registry-dir": registry,
                "server-keys": tmp_path / "server-key",
                "base-model": model,
                "data-dir": data,
                "signing-key": keys,
            }.items()
        )
        # Execute
        run = subprocess.run(
            [str(BIN / "flwr"), "run", str(app), "e2e", "--stream",
             "--federation-config", "num-supernodes=3 client-resources-num-cpus=1",
             "--run-config", run_config],
            env=env, capture_output=True, text=True, timeout=240,
        )  # fmt: skip
        listing = subprocess.run(
            [str(BIN / "flwr"), "ls", "e2e", "--format", "json"],
            env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    finally:
        _stop(superlink)
    # Assert: the run completed (flwr run exits 0 even when the ServerApp crashed).
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-3000:]
    runs = json.loads(listing.stdout)["runs"]
    assert [r["status"] for r in runs] == ["finished:completed"], output[-3000:]
    assert output.count("admitted  adapter") == 2 and "rejected unknown_key" in output
    assert "verdicts acknowledged by 3 of 3 node(s)" in output, output[-3000:]
    report = audit_registry(registry)
    assert (report.version, report.clients) == (3, 2)
    assert sorted(e.name for e in report.entries) == ["p0", "p1"]
    seen = ReplayStore(state_dir_for(registry)).load()
    assert len(seen.manifest_hashes) == 2
