"""Run the seqr Flower app on this machine: our own SuperLink, `flwr run`, clean shutdown.

Flower's deployment advice, in code: a private SuperLink on a free loopback port (never the
machine-wide detached one), FLWR_HOME in the work folder, runtime dependency installation
off (it would `uv sync` a CUDA torch), and every process it started stopped by PID at the
end, Ray actors included. `flwr run --stream` exits 0 even when the ServerApp crashed, so
the run's status is read back with `flwr ls --format json`.
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
from collections.abc import Iterator, Mapping
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any

from seqr.core.errors import SeqrError
from seqr.core.federation import FederationConfig

BIN = Path(sys.executable).parent
APP_PACKAGES = ("seqr",)
# A simulation runs its clients in waves of (cores / client cpus), so one round's replies arrive
# over ALL the waves: its server waits as long as the whole run may take, not the per-round
# default (3600 s) that suits a real federation where every node trains at once. On a slower
# machine, 3600 s timed out the last waves of the 10-domain run.
SIMULATION_TIMEOUT_S = 6 * 3600


class FlowerRunError(SeqrError):
    """A Flower process failed to start, or the run did not finish as completed."""


def run_config_defaults() -> dict[str, Any]:
    """Every run-config key the app reads, with its default (Flower refuses undeclared keys)."""
    from seqr.node.settings import NodeSettings
    from seqr.operator.groups import GroupSettings
    from seqr.operator.settings import ServerSettings

    server = {
        f.name.replace("_", "-"): "" if f.default is MISSING else f.default
        for cls in (ServerSettings, GroupSettings)
        for f in fields(cls)
    }
    node = dict.fromkeys(NodeSettings.names(), "")  # node settings a run config may carry
    return {**server, **FederationConfig().to_run_config(), **node}


def _toml_value(value: Any) -> str:
    return json.dumps(value) if not isinstance(value, bool) else str(value).lower()


def write_app(dest: Path) -> Path:
    """A Flower app folder: the seqr packages plus a pyproject declaring every config key."""
    repo = Path(__file__).resolve().parents[2]  # the folder that holds the seqr package
    for package in APP_PACKAGES:
        for path in (repo / package).rglob("*.py"):
            target = dest / path.relative_to(repo)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
    config = "\n".join(f"{k} = {_toml_value(v)}" for k, v in run_config_defaults().items())
    (dest / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools>=68"]\nbuild-backend = "setuptools.build_meta"\n\n'
        '[project]\nname = "seqr-app"\nversion = "0.1.0"\ndescription = "seqr Flower app"\n'
        'license = "Apache-2.0"\ndependencies = []\n\n'
        '[tool.flwr.app]\npublisher = "seqr"\n\n[tool.flwr.app.components]\n'
        'serverapp = "seqr.operator.server_app:app"\nclientapp = "seqr.node.client_app:app"\n\n'
        f"[tool.flwr.app.config]\n{config}\n"
    )
    return dest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def descendants(root_pid: int) -> set[int]:
    """``root_pid`` and every process below it, from /proc."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                parents[int(entry.name)] = int(stat[1])
    tree, frontier = {root_pid}, [root_pid]
    while frontier:
        pid = frontier.pop()
        for child, parent in parents.items():
            if parent == pid and child not in tree:
                tree.add(child)
                frontier.append(child)
    return tree


class MemorySampler:
    """Peak resident memory of the processes under a root, by command name, sampled twice a
    second (Ray's client actors are not our children, so getrusage cannot see them)."""

    def __init__(self, root_pid: int, interval_s: float = 0.5) -> None:
        import threading

        self.root_pid, self.interval_s = root_pid, interval_s
        self.peak_by_name: dict[str, int] = {}
        self.peak_total = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            total = 0
            for pid in descendants(self.root_pid):
                with contextlib.suppress(OSError, ValueError, IndexError):
                    status = Path(f"/proc/{pid}/status").read_text()
                    rss = int(status.split("VmRSS:")[1].split()[0]) * 1024
                    name = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]
                    label = Path(name.decode(errors="replace")).name or "?"
                    comm = Path(f"/proc/{pid}/comm").read_text().strip()
                    key = comm if comm.startswith("ray::") else label
                    self.peak_by_name[key] = max(self.peak_by_name.get(key, 0), rss)
                    total += rss
            self.peak_total = max(self.peak_total, total)


def _descendant_groups(root_pid: int) -> set[int]:
    """Process groups of ``root_pid`` and its descendants (SuperExec and Ray start their own)."""
    groups = set()
    for pid in descendants(root_pid):
        with contextlib.suppress(OSError):
            groups.add(os.getpgid(pid))
    return groups


def stop_process_tree(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM the process and every group it spawned; SIGKILL what is left after 15 s."""
    groups = _descendant_groups(process.pid) | {process.pid}
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for group in groups:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(group, sig)
        try:
            process.wait(timeout=15)
            return
        except subprocess.TimeoutExpired:
            continue


@dataclass
class LocalSuperLink:
    connection: str
    port: int
    env: dict[str, str]
    process: subprocess.Popen[bytes]
    log: Path


@contextlib.contextmanager
def local_superlink(work: Path, *, name: str = "local-sim") -> Iterator[LocalSuperLink]:
    """A private simulation SuperLink on a free loopback port, stopped on exit."""
    home = work / "flwr-home"
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{name}"\n\n[superlink.{name}]\n'
        f'address = "127.0.0.1:{port}"\ninsecure = true\n'
    )
    # The SuperLink starts flower-superexec by name: this environment's bin must be on PATH
    # even when the venv is not activated (make test, cron, CI).
    path = os.pathsep.join([str(BIN), os.environ.get("PATH", "")])
    env = {**os.environ, "PATH": path, "FLWR_HOME": str(home), "FLWR_TELEMETRY_ENABLED": "0",
           "FLWR_DISABLE_UPDATE_CHECK": "1"}  # fmt: skip
    log = work / "superlink.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [str(BIN / "flower-superlink"), "--insecure", "--simulation",
             "--disable-runtime-dependency-installation", "--host", "127.0.0.1",
             "--port", str(port)],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        _wait_for_port(port, process, log)
        yield LocalSuperLink(name, port, env, process, log)
    finally:
        stop_process_tree(process)


def _wait_for_port(port: int, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise FlowerRunError(f"flower-superlink exited: {log.read_text()[-2000:]}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
            return
        time.sleep(0.3)
    raise FlowerRunError(f"flower-superlink did not listen on port {port}; see {log}")


def flwr_run(
    link: LocalSuperLink,
    app: Path,
    run_config: Mapping[str, Any],
    federation_config: Mapping[str, Any],
    *,
    timeout_s: float,
    log: Path,
) -> str:
    """`flwr run APP CONN --stream`; FlowerRunError unless the run finished as completed."""
    rc = " ".join(f"{k}={_toml_value(str(v) if isinstance(v, Path) else v)}"
                  for k, v in run_config.items())  # fmt: skip
    fc = " ".join(f"{k}={v}" for k, v in federation_config.items())
    with log.open("w") as out:
        proc = subprocess.Popen(
            [str(BIN / "flwr"), "run", str(app), link.connection, "--stream",
             "--federation-config", fc, "--run-config", rc],
            env=link.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        assert proc.stdout is not None
        for line in proc.stdout:  # stream the server's log to the user and to the log file
            out.write(line)
            print(line, end="", flush=True)
        proc.wait(timeout=timeout_s)
    listing = subprocess.run(
        [str(BIN / "flwr"), "ls", link.connection, "--format", "json"],
        env=link.env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    try:
        status = json.loads(listing.stdout)["runs"][-1]["status"]
    except (ValueError, KeyError, IndexError):
        raise FlowerRunError(f"`flwr ls` gave no run status: {listing.stdout[-500:]}") from None
    if proc.returncode != 0 or status != "finished:completed":
        raise FlowerRunError(
            f"flwr run ended with exit {proc.returncode}, status {status}; see {log}"
        )
    return status
