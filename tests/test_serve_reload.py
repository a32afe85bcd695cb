"""`seqr serve` as a process: SIGHUP swaps in a newly published registry version under
concurrent load with zero failed requests (requests in flight finish on the old version), and
a version that fails its audit is refused: the old one keeps serving and /metrics counts it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from _serve_world import ServeWorld, held_out_prompts, registry_copy, serve_world
from _server_world import federation_setup
from prometheus_client.parser import text_string_to_metric_families

from seqr.core import key_files, signing
from seqr.core.export_folder import read_export
from seqr.core.manifest import parse_manifest
from seqr.operator.registry_ops import open_publisher
from seqr.registry import audit_registry

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def start_cli(registry: Path, world: ServeWorld, tmp: Path) -> tuple[subprocess.Popen, str]:
    args = [
        sys.executable,
        "-m",
        "seqr.cli.main",
        "serve",
        "--registry",
        str(registry),
        "--base-model",
        str(world.model_dir),
        "--port",
        "0",
        "--max-tokens",
        "1000",
        "--trusted-state",
        str(tmp / "trusted"),
    ]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("listening on "):
            url = line.split()[2]
            threading.Thread(target=lambda: lines.extend(proc.stdout or []), daemon=True).start()
            return proc, url
    raise AssertionError(f"seqr serve did not start:\n{''.join(lines)}")


def publish_upper(registry: Path, key_dir: Path, world: ServeWorld) -> None:
    keys = [key_files.load_private_key(key_dir / signing.PRIVATE_KEY_NAME)]
    with open_publisher(registry, keys, federation_setup()) as publisher:
        files = read_export(world.route.exports["upper"])
        publisher.enrol_client(parse_manifest(files["manifest.json"]).public_key_bytes)
        publisher.stage_adapter(files)
        publisher.publish()


def metrics(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = float(s.value)
    return out


def wait_for(url: str, check: Any, timeout: float = 120.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        health = httpx.get(f"{url}/health").json()
        if check(health):
            return health
        time.sleep(0.05)
    raise AssertionError(f"the server never reached the expected state: {health}")


def test_sighup_swaps_versions_under_load_and_a_failing_audit_keeps_the_old_one(
    tmp_path: Path,
) -> None:
    world = serve_world()
    registry = registry_copy(world, tmp_path, names=("code", "digits"))  # version 2
    proc, url = start_cli(registry, world, tmp_path)
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
    try:
        assert [m.id for m in client.models.list().data] == ["auto", "base", "code", "digits"]
        failures: list[str] = []
        versions: list[int] = []
        stop = threading.Event()
        prompts = [text for _, text in held_out_prompts()]

        def load(worker: int) -> None:
            i = worker
            while not stop.is_set():
                i += 1
                try:
                    kw: dict[str, Any] = {"prompt": prompts[i % len(prompts)], "max_tokens": 8}
                    if i % 3 == 0:
                        chunks = list(client.completions.create(model="auto", stream=True, **kw))
                        versions.append(chunks[0].model_extra["seqr"]["registry_version"])
                    else:
                        out = client.completions.create(
                            model="code" if i % 3 == 1 else "auto", **kw
                        )
                        versions.append(out.model_extra["seqr"]["registry_version"])
                except Exception as exc:  # noqa: BLE001 - every failure counts
                    failures.append(repr(exc))

        long: dict[str, Any] = {}

        def long_request() -> None:
            out = client.completions.create(
                model="digits", prompt="12 34", max_tokens=1000, extra_body={"ignore_eos": True}
            )
            seqr = out.model_extra["seqr"]
            long.update(
                version=seqr["registry_version"],
                ended=time.time(),
                tokens=out.usage.completion_tokens,
            )

        workers = [threading.Thread(target=load, args=(w,)) for w in range(4)]
        slow = threading.Thread(target=long_request)
        slow.start()
        wait_for(url, lambda h: h["running"] >= 1)
        for w in workers:
            w.start()
        time.sleep(0.3)
        publish_upper(registry, tmp_path / "server-key", world)
        os.kill(proc.pid, signal.SIGHUP)
        swapped = wait_for(url, lambda h: h["registry_version"] == 3)
        swapped_at = time.time()
        assert swapped["adapters"] == ["code", "digits", "upper"]
        while versions.count(3) < 5 and not failures:
            time.sleep(0.1)
        stop.set()
        for w in workers:
            w.join(120)
        slow.join(300)
        assert failures == []
        assert 2 in versions and 3 in versions
        assert long == {"version": 2, "ended": long["ended"], "tokens": 1000}
        assert long["ended"] > swapped_at  # it was generating during the swap, on version 2
        assert [m.id for m in client.models.list().data][-1] == "upper"
        m = metrics(url)
        assert m[("seqr_registry_version", ())] == 3
        assert m[("seqr_registry_reloads_total", (("outcome", "loaded"),))] == 1
        assert m[("seqr_registry_load_seconds", ())] > 0

        # A tampered copy fails its audit: version 3 keeps serving, the failure is counted.
        entries = audit_registry(registry).report.entries
        sha = next(e.adapter_sha256 for e in entries if e.name == "code")
        (stats,) = (registry / "targets" / "adapters" / sha).glob("*.norm_stats.json")
        stats.write_bytes(stats.read_bytes().replace(b'"mean":[', b'"mean":[-', 1))
        os.kill(proc.pid, signal.SIGHUP)
        health = wait_for(url, lambda h: h["last_reload"]["outcome"] == "failed")
        assert (
            health["registry_version"] == 3
            and "norm_stats.json" in health["last_reload"]["message"]
        )
        m = metrics(url)
        assert m[("seqr_registry_failed_reloads_total", ())] == 1
        assert m[("seqr_registry_reloads_total", (("outcome", "failed"),))] == 1
        out = client.completions.create(model="auto", prompt=prompts[0], max_tokens=2)
        assert out.model_extra["seqr"]["registry_version"] == 3
        assert "reload failed" in httpx.get(f"{url}/").text
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(60)
    assert code == 0  # a clean stop (outside `finally`: a failure above is not masked)


def test_reload_keeps_an_unchanged_version_and_refuses_a_rollback(tmp_path: Path) -> None:
    """In-process LiveRegistry: re-reading the same version changes nothing; a mirror that goes
    back to an older version (the rollback attack) is refused and the served version stays."""
    import shutil

    from seqr.consumer.router import RouterConfig
    from seqr.consumer.serve.live import LiveRegistry
    from seqr.consumer.serve.source import RegistrySource
    from seqr.core.base_model import load_base_model

    world = serve_world()
    registry = registry_copy(world, tmp_path, names=("code", "digits"))  # version 2
    old = tmp_path / "version-2"
    shutil.copytree(registry, old)
    base = load_base_model(str(world.model_dir))
    live = LiveRegistry(RegistrySource(str(registry)), base, RouterConfig())
    first = live.current
    status = live.reload()
    assert status.outcome == "unchanged" and live.current is first
    publish_upper(registry, tmp_path / "server-key", world)
    status = live.reload()
    assert status.outcome == "loaded" and live.current.version == 3
    served = live.current
    shutil.rmtree(registry)
    shutil.copytree(old, registry)  # the mirror now serves version 2 again
    status = live.reload()
    assert status.outcome == "failed" and "rollback" in status.message.lower()
    assert live.current is served and live.last_reload is status
