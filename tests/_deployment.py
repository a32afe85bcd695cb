"""A real Flower deployment on loopback for tests: TLS SuperLink with SuperNode authentication,
SuperNodes with registered node keys, the operator's registry and `flwr run`.

Only Flower's own commands are used (flower-superlink, flower-supernode, flwr supernode
register, flwr run, flwr ls), as README's deployment section tells a user to. Every process
started here is recorded and stopped by its PID (and its process groups: SuperExec and the
ClientApp / ServerApp processes it starts) by ``Deployment.stop_all``.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from tiny import copy_texts

from seqr.cli.server import enrol_main, init_main
from seqr.core import key_files, signing
from seqr.deploy.certs import CA_CERT, SERVER_CERT, SERVER_KEY, make_certs
from seqr.deploy.node_keys import make_node_key
from seqr.sim.flower_local import descendants, free_port, stop_process_tree, write_app

BIN = Path(sys.executable).parent
CONNECTION = "deploy"
# The federation, tiny and fast (the operator's fed.toml; the registry pins it).
FEDERATION = {
    "lora-rank": 4,
    "lora-alpha": 8,
    "train-steps": 2,
    "train-batch-size": 4,
    "train-seq-len": 32,
    "calib-max-sequences": 4,
}
CLIENT_FILES = (("bisect.py", "heapq.py"), ("textwrap.py",), ("colorsys.py",), ("keyword.py",))


@dataclass
class Node:
    """One client: its private data, its adapter-signing key and its SuperNode key."""

    name: str
    data: Path
    signing_key: Path  # signing_key.pem (seqr keys generate)
    node_key: Path  # OpenSSH private key (seqr deploy node-key)
    process: subprocess.Popen[bytes] | None = None
    log: Path | None = None


@dataclass
class Deployment:
    root: Path
    model: Path
    pki: Path
    port: int
    env: dict[str, str]
    app: Path
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    # ---- processes ---------------------------------------------------------------------
    def start(self, args: list[str], log: Path) -> subprocess.Popen[bytes]:
        with log.open("wb") as out:
            process = subprocess.Popen(args, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                       start_new_session=True)  # fmt: skip
        self.processes.append(process)
        return process

    def stop(self, process: subprocess.Popen[bytes]) -> None:
        stop_process_tree(process)
        if process in self.processes:
            self.processes.remove(process)

    def stop_all(self) -> None:
        for process in reversed(list(self.processes)):
            self.stop(process)

    def flwr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(BIN / "flwr"), *args], env=self.env, capture_output=True,
                              text=True, timeout=timeout)  # fmt: skip

    # ---- the operator ------------------------------------------------------------------
    def start_superlink(self) -> subprocess.Popen[bytes]:
        process = self.start(
            [str(BIN / "flower-superlink"),
             "--ssl-ca-certfile", str(self.pki / CA_CERT),
             "--ssl-certfile", str(self.pki / SERVER_CERT),
             "--ssl-keyfile", str(self.pki / SERVER_KEY),
             "--enable-supernode-auth", "--disable-runtime-dependency-installation",
             "--host", "127.0.0.1", "--port", str(self.port)],
            self.root / "superlink.log",
        )  # fmt: skip
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"flower-superlink exited: {self.tail('superlink.log')}")
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), 1),
            ):
                return process
            time.sleep(0.3)
        raise RuntimeError(f"flower-superlink is not listening: {self.tail('superlink.log')}")

    def register(self, *nodes: Node) -> None:
        """`flwr supernode register node.pub deploy` for each node (the operator's step; the
        CLI calls run side by side, as several operators' terminals would)."""
        calls = [
            (node, subprocess.Popen(
                [str(BIN / "flwr"), "supernode", "register", f"{node.node_key}.pub", CONNECTION],
                env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            ))
            for node in nodes
        ]  # fmt: skip
        for node, call in calls:
            out, _ = call.communicate(timeout=120)
            if call.returncode != 0 or "registered successfully" not in out:
                raise RuntimeError(f"register {node.name}: {out[-800:]}")

    def new_registry(self, folder: Path, nodes: list[Node]) -> tuple[Path, Path]:
        """`seqr keys generate` + `seqr server init --federation` + `seqr server enrol`."""
        key = folder / "server-key"
        key_files.write_keypair(key)
        registry = folder / "registry"
        args = ["--registry", str(registry), "--key", str(key)]
        if init_main([*args, "--federation", str(self.federation_file)]) != 0:
            raise RuntimeError("seqr server init failed")
        clients = [a for n in nodes for a in ("--client", str(n.signing_key.with_suffix(".pub")))]
        if enrol_main([*args, *clients]) != 0:
            raise RuntimeError("seqr server enrol failed")
        return registry, key

    @property
    def federation_file(self) -> Path:
        return self.root / "fed.toml"

    # ---- the clients -------------------------------------------------------------------
    def new_node(self, name: str, files: tuple[str, ...]) -> Node:
        """A client's keys and data (`seqr keys generate`, `seqr deploy node-key`)."""
        folder = self.root / "nodes" / name
        key_files.write_keypair(folder / "signing-key")
        private, _ = make_node_key(folder, "node")
        return Node(name, copy_texts(folder / "data", files),
                    folder / "signing-key" / signing.PRIVATE_KEY_NAME, private)  # fmt: skip

    def start_supernode(self, node: Node, *extra: str) -> subprocess.Popen[bytes]:
        config = (
            f'data-dir="{node.data}" signing-key="{node.signing_key}" adapter-name="{node.name}"'
        )
        node.log = self.root / "nodes" / node.name / f"supernode-{time.monotonic_ns()}.log"
        node.process = self.start(
            [str(BIN / "flower-supernode"),
             "--root-certificates", str(self.pki / CA_CERT),
             "--superlink", f"127.0.0.1:{self.port}",
             "--auth-supernode-private-key", str(node.node_key),
             "--port", str(free_port()),
             "--node-config", config, *extra],
            node.log,
        )  # fmt: skip
        return node.process

    # ---- runs --------------------------------------------------------------------------
    def run(self, registry: Path, server_key: Path, *, min_nodes: int,
            train_timeout_s: float = 240.0, background: bool = False,
            log: Path | None = None) -> subprocess.Popen[str]:  # fmt: skip
        """`flwr run APP deploy --stream --run-config ...` (the ServerApp's settings)."""
        config = {
            "registry-dir": str(registry),
            "server-keys": str(server_key),
            "federation-file": str(self.federation_file),
            "probe-max-tokens": 1024,
            "min-nodes": min_nodes,
            "node-wait-s": 90.0,
            "train-timeout-s": train_timeout_s,
        }
        rc = " ".join(f"{k}={json.dumps(v)}" for k, v in config.items())
        out = (log or registry.with_name("flwr-run.log")).open("w")
        return subprocess.Popen(
            [str(BIN / "flwr"), "run", str(self.app), CONNECTION, "--stream", "--run-config", rc],
            env=self.env, stdout=out, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip

    def run_status(self) -> str:
        listing = self.flwr("ls", CONNECTION, "--format", "json")
        return str(json.loads(listing.stdout)["runs"][-1]["status"])

    def tail(self, name: str, chars: int = 3000) -> str:
        path = self.root / name
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""


def has_clientapp(process: subprocess.Popen[bytes]) -> bool:
    """Whether a SuperNode is running a ClientApp now (a `flwr-clientapp` process below it)."""
    for pid in descendants(process.pid) - {process.pid}:
        with contextlib.suppress(OSError):
            if b"flwr-clientapp" in Path(f"/proc/{pid}/cmdline").read_bytes():
                return True
    return False


def make_deployment(root: Path, model: Path) -> Deployment:
    """Certificates, FLWR_HOME with the TLS connection, the app folder and fed.toml."""
    pki = root / "pki"
    make_certs(pki)
    home = root / "flwr-home"
    home.mkdir(parents=True)
    port = free_port()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
        f'address = "127.0.0.1:{port}"\nroot-certificates = "{pki / CA_CERT}"\n'
    )
    # SuperLink and SuperNode start flower-superexec by name: this environment's bin must be on
    # PATH even when the venv is not activated (make test, CI).
    path = os.pathsep.join([str(BIN), os.environ.get("PATH", "")])
    env = {**os.environ, "PATH": path, "FLWR_HOME": str(home), "FLWR_TELEMETRY_ENABLED": "0",
           "FLWR_DISABLE_UPDATE_CHECK": "1"}  # fmt: skip
    fed = {"base-model": str(model), **FEDERATION}
    (root / "fed.toml").write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in fed.items()))
    return Deployment(root, model, pki, port, env, write_app(root / "app"))
