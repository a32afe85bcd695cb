"""A real ``kill -9``: a publisher subprocess staging and publishing in a loop is SIGKILLed,
several times: at random moments (killed from outside) and exactly inside each window of a
publish (it SIGKILLs itself there, so every window is hit on every run). After each kill the
registry must audit cleanly on its last complete version with the same trusted state
throughout (no rollback, no fork, no restart needed), the next publisher must continue from
the stored state, and no adapter it had durably staged or published may be lost."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from registry_fixtures import FEDERATION, make_export

from seqr.core import key_files, signing
from seqr.registry import repository
from seqr.registry.audit import audit_registry
from seqr.registry.config import PublisherConfig
from seqr.registry.publish import Publisher

TESTS = Path(__file__).resolve().parent
RANDOM_KILLS = 2
ADAPTERS_PER_VERSION = 3
# Where the worker SIGKILLs itself during its first publish (see WORKER).
KILL_POINTS = ("after-targets", "after-snapshot", "mid-timestamp-write", "after-timestamp")

# Stages ADAPTERS_PER_VERSION fresh adapters, publishes, repeats; reports each durable step.
WORKER = """
import os, signal, sys
from pathlib import Path
from registry_fixtures import FEDERATION, make_export
from seqr.core import key_files, signing
from seqr.registry import store
from seqr.registry.config import PublisherConfig
from seqr.registry.publish import Publisher

reg, keys, seed, point = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
per_version = int(sys.argv[5])
armed = False  # only the worker's own publishes die, not the recovery at start-up

def die():
    if armed:
        os.kill(os.getpid(), signal.SIGKILL)

real_new_file, real_write_file = store.write_new_file, store.write_file

def write_new_file(path, data):
    real_new_file(path, data)
    if point == "after-targets" and path.name.endswith(".targets.json"):
        die()
    if point == "after-snapshot" and path.name.endswith(".snapshot.json"):
        die()

def write_file(path, data):
    if path.name == "timestamp.json" and point == "mid-timestamp-write" and armed:
        os.replace = lambda *a: die()  # the temp file is written and fsynced, never renamed
    real_write_file(path, data)
    if path.name == "timestamp.json" and point == "after-timestamp":
        die()  # committed, staging records not yet dropped

store.write_new_file, store.write_file = write_new_file, write_file
server = key_files.load_private_key(keys / "server" / signing.PRIVATE_KEY_NAME)
client = key_files.load_private_key(keys / "client" / signing.PRIVATE_KEY_NAME)
pub = Publisher(reg, [server], PublisherConfig(federation=FEDERATION))
print("ready", pub.version, flush=True)
armed = True
while True:
    for _ in range(per_version):
        print("staged", pub.stage_adapter(make_export(client, seed=seed)), flush=True)
        seed += 1
    print("published", pub.publish().version, flush=True)
"""


def _run_worker(
    reg: Path, keys: Path, seed: int, point: str, delay: float
) -> tuple[int, list[str]]:
    """Run the worker until it is killed; returns the version it found and its output lines."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(TESTS.parent)])}
    argv = [str(reg), str(keys), str(seed), point, str(ADAPTERS_PER_VERSION)]
    proc = subprocess.Popen(
        [sys.executable, "-c", WORKER, *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stderr is not None
        ready = proc.stdout.readline()  # imports and crash recovery are done
        assert ready.startswith("ready"), ready + proc.stderr.read()
        if point == "random":
            time.sleep(delay)
            os.kill(proc.pid, signal.SIGKILL)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL, f"worker exited {proc.returncode}: {err}"
    return int(ready.split()[1]), out.splitlines()


def _pointer(reg: Path) -> int:
    """The committed targets version (timestamp.json -> snapshot -> targets)."""
    return repository.load(reg).targets.signed.version


def test_kill_9_mid_publish_loses_nothing(tmp_path: Path) -> None:
    reg, keys, state = tmp_path / "registry", tmp_path / "keys", tmp_path / "state"
    key_files.write_keypair(keys / "server")
    key_files.write_keypair(keys / "client")
    server = key_files.load_private_key(keys / "server" / signing.PRIVATE_KEY_NAME)
    client = key_files.load_private_key(keys / "client" / signing.PRIVATE_KEY_NAME)
    config = PublisherConfig(federation=FEDERATION)
    with Publisher.create(reg, [server], config=config) as pub:
        pub.enrol_client(signing.public_key_bytes(client))
        pub.publish()
    rng = random.Random(9162)
    staged: set[str] = set()
    published, seed, last = 0, 0, _pointer(reg)
    plan = ["random"] * RANDOM_KILLS + list(KILL_POINTS) + ["random"]
    for point in plan:
        found, lines = _run_worker(reg, keys, seed, point, delay=rng.uniform(0.05, 0.6))
        seed += 10_000  # fresh adapters each run
        staged |= {line.split()[1] for line in lines if line.startswith("staged")}
        published = max(
            [published, *(int(x.split()[1]) for x in lines if x.startswith("published"))]
        )
        # A restarted publisher rolled forward any version fully written before the last kill.
        assert found >= last, f"the publisher lost committed version {last} (found {found})"
        pointer = _pointer(reg)
        if point in ("after-targets", "after-snapshot", "mid-timestamp-write"):
            assert pointer == found, f"{point}: the commit point moved too early"
            written = reg / "metadata" / f"{found + 1}.targets.json"
            assert written.exists(), f"{point}: window not hit"
        if point == "after-timestamp":
            assert pointer == found + 1 and any((reg / "staging").glob("*.json"))
        # The last complete version audits cleanly, before any restart.
        report = audit_registry(reg, state).report
        assert report.version == pointer >= published
        last = pointer
    # A new publisher continues from the stored state: everything staged gets published.
    with Publisher(reg, [server], config) as pub:
        pub.stage_adapter(make_export(client, seed=seed))
        final = pub.publish()
    report = audit_registry(reg, state).report
    assert report.version == final.version > last
    assert staged, "the worker never staged anything before being killed"
    missing = staged - {e.adapter_sha256 for e in report.entries}
    assert not missing, f"{len(missing)} durably staged adapter(s) were lost: {sorted(missing)[:3]}"
    assert not any((reg / "staging").glob("*.json"))
    assert not list(reg.rglob(".*.tmp")), "temp files of interrupted writes were left behind"
