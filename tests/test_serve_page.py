"""GET / in headless Chromium: the registry (adapters, full client key fingerprints, admission
times, audit status, transparency log), live routing counts, and a prompt box that shows the
routed adapter and the continuation; everything from the registry is escaped."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from _serve_world import ServeWorld, held_out_prompts, serve_world, start_server

from seqr.consumer.router import RouterConfig
from seqr.consumer.serve import SeqrServer
from seqr.consumer.serve.live import ReloadStatus, build_version
from seqr.consumer.serve.page import render
from seqr.consumer.serve.source import RegistrySource
from seqr.core.base_model import load_base_model
from seqr.registry import audit_registry

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def world() -> ServeWorld:
    return serve_world()


@pytest.fixture(scope="module")
def server(world: ServeWorld) -> Iterator[SeqrServer]:
    srv = start_server(world.registry, world.model_dir)
    yield srv
    srv.stop()


def test_page_shows_the_registry_and_routes_a_typed_prompt(
    server: SeqrServer, world: ServeWorld, browser: Any, screenshot: Any
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    report = audit_registry(world.registry).report
    browser.get(f"{server.url}/")
    page = browser.find_element(By.TAG_NAME, "body").text
    for entry in report.entries:
        assert entry.name in page and entry.client in page and entry.adapter_sha256 in page
        assert entry.admitted.isoformat() in page
    assert browser.find_element(By.ID, "audit-status").text == "passed"
    assert browser.find_element(By.ID, "log-size").text == str(report.tree_size)
    assert browser.find_element(By.ID, "log-root").text == report.tree_root
    assert browser.find_element(By.ID, "registry-version").text.startswith(str(report.version))
    digits = held_out_prompts()[1][1]
    browser.find_element(By.ID, "prompt").send_keys(digits)
    browser.find_element(By.ID, "send").click()
    wait = WebDriverWait(browser, 60)
    wait.until(lambda b: b.find_element(By.ID, "routed-adapter").text not in ("-", "..."))
    assert browser.find_element(By.ID, "routed-adapter").text == "digits"
    assert "margin" in browser.find_element(By.ID, "why").text
    continuation = browser.find_element(By.ID, "continuation").text
    expected = httpx.post(
        f"{server.url}/v1/completions",
        timeout=60,
        json={"model": "auto", "prompt": digits, "max_tokens": 32, "temperature": 0},
    ).json()["choices"][0]["text"]
    assert continuation.strip() == expected.strip() != ""
    counts = {n: i for i, n in enumerate(sorted(e.name for e in report.entries))}  # by name
    wait.until(lambda b: b.find_element(By.ID, f"count-{counts['digits']}").text not in ("", "0"))
    screenshot()


def test_everything_from_the_registry_is_escaped(world: ServeWorld) -> None:
    base = load_base_model(str(world.model_dir))
    version = build_version(
        base, RegistrySource(str(world.registry)).audited(), RouterConfig(), ("auto", "base")
    )
    hostile = "<script>alert(1)</script>&\"'"
    version = dataclasses.replace(version, names=(hostile, *version.names[1:]))
    reload = ReloadStatus(version.loaded_at, "failed", 2, f"reload failed: {hostile}", 0.1)
    html, nonce = render(version, version.own, {hostile: 3}, 0, reload)
    assert "<script>alert(1)" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;&amp;&quot;&#x27;" in html
    assert "\\u003cscript\\u003ealert(1)\\u003c/script\\u003e\\u0026" in html  # JSON block
    assert html.count("<script") == 2 and f'<script nonce="{nonce}">' in html
