"""Fixtures for the dashboard's tests: a real headless Chromium driven by
selenium, against regproxy under twistd pulling from a real registry.

Debian's ``chromium`` and ``chromium-driver`` are used as installed: nothing
is downloaded at run time.  Without them (or without selenium) the tests
skip with the line that installs them; with ``REGPROXY_WEB_REQUIRED=1`` or
``REGPROXY_CLUSTER_REQUIRED=1`` (``.ci/run`` sets the latter) that is a
failure instead, so CI never skips them silently.

Fixture API:

``browser`` (function) -> a ``selenium.webdriver.Chrome``, headless, its
    console kept (``browser.get_log("browser")``); quit after the test.
``dashboard_image`` (session) -> ``images.Image``: ``multilayer``, pushed to
    the upstream registry once (without building every other test image).

From ``tests/integration/conftest.py``: ``regproxy``, ``skopeo``,
``upstream_registry``, ``workdir`` and what they need.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from integration import harness, images
from integration.conftest import (  # noqa: F401 (fixtures, shared with the integration tests)
    ensure_upstream_running,
    integration_dir,
    push_image,
    regproxy,
    skopeo,
    token_server,
    upstream_registry,
    workdir,
)

_INSTALL = (
    "the dashboard's tests need Debian's chromium and chromium-driver, and selenium: "
    "apt-get install -y --no-install-recommends chromium chromium-driver && "
    "pip install '.[test]'"
)


def _missing(what: str) -> None:
    if os.environ.get("REGPROXY_WEB_REQUIRED") or os.environ.get("REGPROXY_CLUSTER_REQUIRED"):
        pytest.fail(f"{what} is missing: {_INSTALL}")
    pytest.skip(f"{what} is missing: {_INSTALL}")


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        _missing("selenium")
    chromium = shutil.which("chromium")
    driver = shutil.which("chromedriver")
    if chromium is None or driver is None:
        _missing("chromium" if chromium is None else "chromedriver")
    assert chromium is not None and driver is not None
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in (
        "--headless=new",
        "--no-sandbox",  # as root
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--no-first-run",
        "--disable-extensions",
        "--disable-background-networking",
        "--disable-component-update",
        "--window-size=1280,1000",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
    ):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # an explicit driver path: selenium does not look for (or fetch) one
    service = Service(executable_path=driver, log_output=str(tmp_path / "chromedriver.log"))
    chrome = webdriver.Chrome(options=options, service=service)
    chrome.set_page_load_timeout(30)
    try:
        yield chrome
    finally:
        chrome.quit()


@pytest.fixture(scope="session")
def dashboard_image(  # the fixtures imported above, as arguments
    integration_dir: Path,  # noqa: F811
    upstream_registry: harness.UpstreamRegistry,  # noqa: F811
    skopeo: harness.Skopeo,  # noqa: F811
) -> images.Image:
    (spec,) = [s for s in images.IMAGE_SPECS if s.name == "multilayer"]
    return push_image(skopeo, upstream_registry, spec, integration_dir / "web-layouts" / spec.name)
