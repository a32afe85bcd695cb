"""Fixtures shared by the whole suite."""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

# Screenshots and other files a person may want to look at after a run (gitignored).
ARTIFACTS = Path(__file__).resolve().parent.parent / ".test-artifacts"


@pytest.fixture(scope="session")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """Headless Debian Chromium driven by selenium through Debian's chromedriver.

    Both paths are given explicitly so selenium never looks for (or downloads) a driver; the
    flags keep Chromium off the network (this machine has none but loopback).
    """
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if chromium is None or driver is None:
        raise RuntimeError("browser tests need Debian's chromium and chromium-driver (.ci/run)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--window-size=1280,1600",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}",
    ):
        options.add_argument(flag)
    drv = webdriver.Chrome(service=Service(driver), options=options)
    drv.set_page_load_timeout(60)
    try:
        yield drv
    finally:
        drv.quit()


@pytest.fixture
def screenshot(browser: Any, request: pytest.FixtureRequest) -> Any:
    """``screenshot()`` saves the browser's page as .test-artifacts/<test name>.png and
    prints the path, so the picture is part of the test output."""

    def take(suffix: str = "") -> Path:
        ARTIFACTS.mkdir(exist_ok=True)
        name = re.sub(r"[^A-Za-z0-9_.-]", "_", request.node.name + suffix)
        path = ARTIFACTS / f"{name}.png"
        browser.save_screenshot(str(path))
        print(f"screenshot: {path}")
        return path

    return take
