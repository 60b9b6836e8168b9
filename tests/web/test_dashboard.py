"""The dashboard in a real headless Chromium, against regproxy under twistd
with real pulls done through it (skopeo from a docker-registry upstream)."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from integration import harness, images

pytestmark = pytest.mark.web

TOKEN = "dashboard-test-token"
#: where the README's screenshot is written when REGPROXY_UPDATE_SCREENSHOT=1
DOCS_SCREENSHOT = Path(__file__).parents[2] / "docs" / "dashboard.png"


def _request(
    port: int, method: str, path: str, token: str | None = None
) -> tuple[http.client.HTTPResponse, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(method, path, headers={"Authorization": f"Bearer {token}"} if token else {})
        response = conn.getresponse()
        return response, response.read()
    finally:
        conn.close()


def x_cache(proxy: harness.RegProxy, path: str) -> str | None:
    return _request(proxy.port, "HEAD", path)[0].getheader("X-Cache")


def admin_get(proxy: harness.RegProxy, path: str) -> Any:
    response, body = _request(proxy.admin_port, "GET", path, TOKEN)
    assert response.status == 200, (path, body)
    return json.loads(body)


def wait_for(browser: Any, check: Callable[[Any], Any], what: str, timeout: float = 20) -> Any:
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(browser, timeout, poll_frequency=0.1).until(check)
    except TimeoutException:
        raise AssertionError(f"timed out waiting for {what}") from None


def value(browser: Any, element_id: str) -> str:
    from selenium.webdriver.common.by import By

    return str(browser.find_element(By.ID, element_id).get_attribute("data-value"))


def asked_for(browser: Any, path: str) -> list[str]:
    """The URLs the page fetched since it was loaded whose path (and query,
    if *path* ends in ?) begin with *path*, or are *path*."""
    urls = browser.execute_script(
        "return performance.getEntriesByType('resource').map((e) => e.name)"
    )
    found = []
    for url in urls:
        rest = url.split("//", 1)[-1]
        at = rest[rest.index("/") :] if "/" in rest else "/"
        if at.startswith(path) if path.endswith("?") else at == path:
            found.append(url)
    return found


def console_errors(browser: Any) -> list[dict[str, Any]]:
    return [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]


def sign_in(browser: Any, token: str) -> None:
    from selenium.webdriver.common.by import By

    field = wait_for(browser, lambda b: b.find_element(By.ID, "token"), "the token field")
    wait_for(browser, lambda b: field.is_displayed(), "the login form")
    field.clear()
    field.send_keys(token)
    browser.find_element(By.CSS_SELECTOR, "#login button[type=submit]").click()


def test_dashboard_shows_the_stats_purges_and_asks_again_for_a_wrong_token(
    regproxy: Callable[..., harness.RegProxy],
    dashboard_image: images.Image,
    skopeo: harness.Skopeo,
    workdir: Path,
    browser: Any,
    tmp_path: Path,
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions

    image = dashboard_image
    proxy = regproxy(extra_config={"admin": {"token": TOKEN}})
    # a miss, then a hit of every blob, and an error, through the proxy
    skopeo.pull(image.docker_ref(proxy.host_port), workdir / "first")
    skopeo.pull(image.docker_ref(proxy.host_port), workdir / "second")
    assert _request(proxy.port, "GET", "/v2/library/nothing-here/manifests/1")[0].status == 404
    stats = admin_get(proxy, "/api/v1/stats")
    assert stats["hits"] > 0 and stats["misses"] > 0 and stats["bytes_from_cache"] > 0

    browser.get(proxy.admin_url + "/")
    assert browser.find_element(By.ID, "dashboard").is_displayed() is False
    sign_in(browser, TOKEN)
    wait_for(browser, lambda b: b.find_element(By.ID, "dashboard").is_displayed(), "the dashboard")
    assert TOKEN not in browser.current_url
    assert browser.execute_script("return sessionStorage.getItem('regproxy-admin-token')") == TOKEN

    # the numbers are /api/v1/stats's (nothing is pulled any more, so they hold still)
    wait_for(browser, lambda b: value(b, "requests") == str(stats["requests"]), "the requests")
    assert admin_get(proxy, "/api/v1/stats")["requests"] == stats["requests"]
    assert int(value(browser, "hits")) == stats["hits"]
    assert int(value(browser, "misses")) == stats["misses"]
    assert float(value(browser, "hit-ratio")) == pytest.approx(stats["hit_ratio"])
    assert int(value(browser, "bytes-from-cache")) == stats["bytes_from_cache"]
    assert int(value(browser, "bytes-from-upstream")) == stats["bytes_from_upstream"]
    assert int(value(browser, "errors")) == sum(stats["errors"].values()) >= 1
    assert int(value(browser, "cache-size")) == stats["cache"]["size_bytes"]
    upstream = browser.find_element(By.ID, "upstreams").text
    assert "docker.io" in upstream and "yes" in upstream and "closed" in upstream
    errors = browser.find_element(
        By.XPATH, "//tbody[@id='upstreams']/tr[th='docker.io']/td[@data-value]"
    )
    assert int(str(errors.get_attribute("data-value"))) == stats["upstream_errors"]["docker.io"]
    pulled = f"docker.io/{image.repository}:{image.tag}"
    pulls = {p["image"]: p["pulls"] for p in stats["top_pulls"]}
    assert pulls[pulled] >= 2
    row = browser.find_element(By.CSS_SELECTOR, f'#top-pulls tr[data-image="{pulled}"]')
    assert row.find_element(By.CSS_SELECTOR, "td[data-value]").get_attribute("data-value") == str(
        pulls[pulled]
    )
    recent = browser.find_element(By.ID, "recent-errors").text
    assert "404" in recent and "/v2/library/nothing-here/manifests/1" in recent
    name = f"docker.io/{image.repository}"
    row = browser.find_element(By.CSS_SELECTOR, f'#images tr[data-image="{name}"]')
    assert int(row.find_element(By.CSS_SELECTOR, "td[data-value]").get_attribute("data-value")) > 0
    # the chart has a point for the pulls made
    assert browser.find_elements(By.CSS_SELECTOR, "#chart-bytes rect")
    assert "%" in str(browser.find_element(By.ID, "chart-ratio").get_attribute("aria-label"))

    # the search narrows the list: the API is asked for the largest 50 that match
    search = browser.find_element(By.ID, "search")
    search.send_keys("no-such_image")
    wait_for(
        browser,
        lambda b: "no cached image matches" in b.find_element(By.ID, "images").text,
        "no image found",
    )
    pages = asked_for(browser, "/api/v1/cache?")
    assert pages and all("sort=size&n=50" in url for url in pages), pages
    assert any(url.endswith("&q=no-such_image") for url in pages), pages
    assert not asked_for(browser, "/api/v1/cache"), "the whole listing was asked for"
    search.clear()
    search.send_keys(image.repository.split("/")[-1])
    wait_for(
        browser,
        lambda b: b.find_elements(By.CSS_SELECTOR, f'#images tr[data-image="{name}"]'),
        "the image found again",
    )

    # a reload keeps the session: no login form
    browser.refresh()
    wait_for(browser, lambda b: b.find_element(By.ID, "dashboard").is_displayed(), "the reload")
    wait_for(browser, lambda b: value(b, "requests") == str(stats["requests"]), "the numbers")
    # while the cache holds still, its images are not asked for at each refresh
    wait_for(browser, lambda b: len(asked_for(b, "/api/v1/stats")) >= 3, "three refreshes")
    assert len(asked_for(browser, "/api/v1/cache?")) == 1

    # a screenshot, full height; then the page at a phone's width
    height = browser.execute_script("return document.documentElement.scrollHeight")
    browser.set_window_size(1280, min(int(height) + 150, 4000))
    browser.save_screenshot(str(tmp_path / "dashboard.png"))
    if os.environ.get("REGPROXY_UPDATE_SCREENSHOT"):
        DOCS_SCREENSHOT.parent.mkdir(exist_ok=True)
        shutil.copyfile(tmp_path / "dashboard.png", DOCS_SCREENSHOT)
    browser.set_window_size(390, 844)
    wait_for(
        browser,
        lambda b: b.execute_script(
            "return document.documentElement.scrollWidth <= window.innerWidth"
        ),
        "no sideways scrolling at a phone's width",
        timeout=5,
    )
    browser.save_screenshot(str(tmp_path / "dashboard-phone.png"))
    browser.set_window_size(1280, 1000)
    assert console_errors(browser) == []

    # pin, confirmed: one pin of the whole repository
    button = browser.find_element(By.CSS_SELECTOR, f'button[aria-label="Pin {name}"]')
    browser.execute_script("arguments[0].scrollIntoView()", button)
    button.click()
    wait_for(browser, expected_conditions.alert_is_present(), "the pin's confirmation")
    browser.switch_to.alert.accept()
    wait_for(browser, lambda b: "Pinned" in b.find_element(By.ID, "message").text, "the pin")
    pins = admin_get(proxy, "/api/v1/pins")
    assert [p["image"] for p in pins["pins"] if p["source"] == "api"] == [name], pins
    assert len(asked_for(browser, f"/api/v1/cache/{name}")) == 0  # no detail asked for

    # purge, confirmed: the next pull is a miss
    manifest = f"/v2/{image.repository}/manifests/{image.tag}"
    assert x_cache(proxy, manifest) == "HIT"
    button = browser.find_element(By.CSS_SELECTOR, f'button[aria-label="Purge {name}"]')
    browser.execute_script("arguments[0].scrollIntoView()", button)
    button.click()
    wait_for(browser, expected_conditions.alert_is_present(), "the confirmation")
    alert = browser.switch_to.alert
    assert name in alert.text
    alert.accept()
    wait_for(
        browser,
        lambda b: "Purged" in b.find_element(By.ID, "message").text,
        "the purge's message",
    )
    assert not browser.find_elements(By.CSS_SELECTOR, f'#images tr[data-image="{name}"]')
    assert admin_get(proxy, "/api/v1/cache")["repositories"] == []
    assert x_cache(proxy, manifest) == "MISS"
    assert console_errors(browser) == []

    # signed out, a wrong token shows the login form again, and keeps nothing
    browser.find_element(By.ID, "logout").click()
    sign_in(browser, "not-the-token")
    wait_for(
        browser,
        lambda b: "refused" in b.find_element(By.ID, "login-error").text,
        "the refusal",
    )
    assert browser.find_element(By.ID, "login").is_displayed()
    assert not browser.find_element(By.ID, "dashboard").is_displayed()
    assert browser.execute_script("return sessionStorage.getItem('regproxy-admin-token')") is None
    # the only console errors: the browser's note of the refused requests
    assert all("401" in e["message"] for e in console_errors(browser))


def test_page_needs_no_token_but_its_data_does(
    regproxy: Callable[..., harness.RegProxy], browser: Any
) -> None:
    from selenium.webdriver.common.by import By

    proxy = regproxy(extra_config={"admin": {"token": TOKEN}})
    started = time.monotonic()
    browser.get(proxy.admin_url + "/")
    wait_for(browser, lambda b: b.find_element(By.ID, "login").is_displayed(), "the login form")
    assert time.monotonic() - started < 10
    # nothing was asked of the API before a token was given
    assert console_errors(browser) == []
    assert _request(proxy.admin_port, "GET", "/api/v1/stats")[0].status == 401
    assert _request(proxy.admin_port, "GET", "/api/v1/stats", "wrong")[0].status == 401
