"""The dashboard's files as the admin port serves them, and the numbers it
reads that the admin API had not given before (history, recent errors)."""

from __future__ import annotations

import itertools
import re

import pytest
import pytest_twisted
from test_admin_api import TOKEN, Admin
from twisted.internet.task import Clock

from registryproxy.admin.dashboard import ASSETS
from registryproxy.metrics import RECENT_ERRORS, History, Metrics, PullCounts


@pytest.fixture
def admin() -> Admin:
    return Admin()


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize(
    "path,content_type", [(p.decode(), t.decode()) for p, (_, t) in ASSETS.items()]
)
async def test_page_and_assets_are_served_without_the_token(admin, path, content_type):
    for token in (None, "wrong", TOKEN):
        reply = await admin("GET", path, token=token)
        assert reply.code == 200, reply.body
        assert reply.header("Content-Type") == content_type
        assert reply.header("X-Content-Type-Options") == "nosniff"
        assert "default-src 'none'" in (reply.header("Content-Security-Policy") or "")
        assert reply.body
    assert admin.backend.calls == []  # the files hold no data


@pytest_twisted.ensureDeferred
async def test_page_loads_only_its_own_files(admin):
    page = (await admin("GET", "/", token=None)).body.decode()
    assert "<title>regproxy dashboard</title>" in page
    linked = set(re.findall(r'(?:src|href)="([^"]+)"', page))
    assert linked == {"/static/dashboard.css", "/static/dashboard.js", "data:,"}
    script = (await admin("GET", "/static/dashboard.js", token=None)).body.decode()
    assert "sessionStorage" in script and "Authorization" in script
    assert "http://" not in script.replace("http://www.w3.org/2000/svg", "")
    assert "https://" not in script + page


@pytest_twisted.ensureDeferred
async def test_other_paths_and_methods_still_need_the_token(admin):
    for method, path in [
        ("POST", "/"),
        ("DELETE", "/static/dashboard.js"),
        ("GET", "/static/other.js"),
        ("GET", "/static/"),
        ("GET", "/favicon.ico"),
    ]:
        reply = await admin(method, path, token=None)
        assert reply.code == 401, (method, path)


@pytest_twisted.ensureDeferred
async def test_history_and_recent_errors_routes(admin):
    history = (await admin("GET", "/api/v1/history")).json()
    assert history["interval"] == 10.0 and len(history["hour"]) == 2
    errors = (await admin("GET", "/api/v1/errors")).json()
    assert errors["errors"][0]["status"] == 404
    assert (await admin("GET", "/api/v1/errors?n=1")).code == 400


def test_recent_errors_are_bounded_and_timed():
    clock = Clock()
    metrics = Metrics(clock)
    for i in range(RECENT_ERRORS + 5):
        clock.advance(1)
        metrics.error(404, "10.0.0.1", "GET", f"/v2/x/manifests/{i}")
    recent = list(metrics.recent_errors)
    assert len(recent) == RECENT_ERRORS
    assert recent[0]["path"] == "/v2/x/manifests/5" and recent[0]["time"] == 6
    assert recent[-1] == {
        "time": RECENT_ERRORS + 5,
        "status": 404,
        "client": "10.0.0.1",
        "method": "GET",
        "path": f"/v2/x/manifests/{RECENT_ERRORS + 4}",
    }
    assert metrics.summary()["errors"] == {"404": RECENT_ERRORS + 5}


def test_history_keeps_an_hour_and_a_day():
    clock = Clock()
    metrics = Metrics(clock)
    history = History(metrics, clock, interval=10, day_interval=300)
    for _ in range(8640 + 10):  # a day and a bit, every 10 s
        metrics.requests.labels("blob", "hit").inc()
        history.sample()
        clock.advance(10)
    snapshot = history.snapshot()
    assert len(snapshot["hour"]) == 361
    assert len(snapshot["day"]) == 289
    last = snapshot["hour"][-1]
    assert last["hits"] == last["requests"] == 8650 and last["misses"] == 0
    assert snapshot["hour"][0]["time"] == last["time"] - 3600
    times = [sample["time"] for sample in snapshot["day"]]
    assert {b - a for a, b in itertools.pairwise(times)} == {300}


def test_history_restores_a_well_formed_recent_day():
    clock = Clock()
    clock.advance(100_000)
    before = History(Metrics(clock), clock)
    for _ in range(3):
        assert before.sample() is True
        clock.advance(300)
    assert before.sample() is True and before.sample() is False
    clock.advance(600)  # a restart
    after = History(Metrics(clock), clock)
    too_old = {**before.day[0], "time": clock.seconds() - 90_000}
    broken = [{"time": "x"}, {**before.day[0], "hits": "1"}, None]
    after.restore([too_old, *before.day, *broken, before.day[0]])
    assert after.day == before.day
    after.restore("not a list")
    assert after.snapshot()["hour"] == []


def test_pull_counts_keep_the_most_pulled_when_full():
    pulls = PullCounts(keep=10)
    for _ in range(3):
        pulls.pulled("docker.io/library/a:1")
    pulls.pulled("docker.io/library/old:1")
    pulls.pulled("docker.io/library/b:1")
    pulls.pulled("docker.io/library/b:1")
    for i in range(7):
        pulls.pulled(f"ghcr.io/x/once:{i}")
    assert len(pulls) == 10
    pulls.pulled("ghcr.io/x/new:1")  # the eleventh: pruned to nine, least pulled and oldest out
    assert len(pulls) == 9
    top = pulls.top(3)
    assert top == [
        {"image": "docker.io/library/a:1", "pulls": 3},
        {"image": "docker.io/library/b:1", "pulls": 2},
        top[2],
    ]
    kept = {p["image"] for p in pulls.top(20)}
    assert "docker.io/library/old:1" not in kept and "ghcr.io/x/once:0" not in kept
    assert "ghcr.io/x/once:1" in kept and "ghcr.io/x/new:1" in kept
    assert len(pulls.top(20)) == 9


@pytest_twisted.ensureDeferred
async def test_stats_count_manifest_pulls_and_errors_per_upstream(fake_registry, make_proxy):
    digest, _ = fake_registry.add_image("library/app", "1", [b"x"])
    proxy = await make_proxy(fake_registry.url)
    for _ in range(3):
        assert (await proxy.get("/v2/app/manifests/1")).code == 200
    assert (await proxy.head("/v2/app/manifests/1")).code == 200  # a HEAD is no pull
    assert (await proxy.get(f"/v2/library/app/manifests/{digest}")).code == 200
    assert (await proxy.get("/v2/app/manifests/nope")).code == 404
    assert (await proxy.get("/v2/app/nothing")).code == 404  # no route: no upstream
    assert (await proxy.get("/v2/registry.invalid/x/manifests/1")).code == 404  # no such upstream
    stats = await proxy.proxy.control.stats()
    assert stats["top_pulls"] == [
        {"image": "docker.io/library/app:1", "pulls": 3},
        {"image": f"docker.io/library/app@{digest}", "pulls": 1},
    ]
    assert stats["upstream_errors"] == {"docker.io": 1, "none": 2}
    assert stats["errors"] == {"404": 3}
    assert set(stats["upstream_requests"]) == {"docker.io"}
    text = (await proxy.proxy.control.metrics())[0].decode()
    assert 'regproxy_errors_total{status="404",upstream="docker.io"} 1.0' in text
