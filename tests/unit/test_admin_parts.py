"""Each part of the admin backend alone, over a real index and real
upstream settings where it reads them, and small fakes where it reaches
the rest of the proxy (downloads, deletion, a cluster)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.web.client import HTTPConnectionPool

from registryproxy.admin import prefetch as prefetch_module
from registryproxy.admin.backend import AdminError, PurgeSelector, RepositoryPage
from registryproxy.admin.fsck import Fsck
from registryproxy.admin.listing import Listing
from registryproxy.admin.prefetch import Prefetcher
from registryproxy.admin.purge import Purge
from registryproxy.admin.readiness import Readiness
from registryproxy.admin.settings import Pins, SavedPins, SavedUpstreams, UpstreamSettings
from registryproxy.admin.stats import SavedHistory, Stats
from registryproxy.cache.index import Index, ManifestEntry, Page, Removed, TagEntry
from registryproxy.cache.keep import Keep
from registryproxy.cache.store import FileStore
from registryproxy.config import Config, parse_config
from registryproxy.errors import RegistryError
from registryproxy.metrics import Metrics
from registryproxy.runtime import Threads
from registryproxy.upstream.registry import Upstreams

MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def d(name: str) -> str:
    return "sha256:" + name.encode().hex().ljust(64, "0")[:64]


class Inline:
    """IndexAccess over one index, all of it inline (the worker thread's
    work is the same code: only where it runs differs)."""

    def __init__(self, index: Index) -> None:
        self.index = index

    def quick(self, work: Any) -> Deferred[Any]:
        return maybeDeferred(work, self.index)

    heavy = read = quick


def config_of(**upstreams: Any) -> Config:
    return parse_config(json.dumps({"upstreams": upstreams} if upstreams else {}))


@pytest.fixture
def index(tmp_path: Path):
    index = Index(str(tmp_path / "index.db"))
    yield index
    index.close()


@pytest.fixture
def upstreams():
    config = config_of(**{"quay.example": {"url": "https://quay.example", "tag_ttl": 60}})
    upstreams = Upstreams(
        config.upstreams, config.default_upstream, Clock(), HTTPConnectionPool(Clock())
    )
    yield upstreams
    upstreams.close()


def add_image(index: Index, upstream: str, repo: str, name: str, layers: list[str], tag: str):
    for layer in layers:
        index.put_blob(d(layer), 1000, 1.0)
    entry = ManifestEntry(d(name), MANIFEST, 10)
    index.put_manifest(upstream, repo, entry, 1.0, [(d(layer), "blob") for layer in layers])
    index.put_tag(upstream, repo, tag, TagEntry(d(name), MANIFEST, 5.0))


# -- listing -------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_listing_100_repositories_is_one_statement_and_one_in_detail_three(index, upstreams):
    for n in range(100):
        for m in range(2):
            add_image(index, "docker.io", f"r{n:03}", f"{n}/{m}", [f"{n}/{m}/a", "shared"], "1")
    listing = Listing(Inline(index), upstreams, tag_ttl=3600.0)
    statements: list[str] = []
    index._db.set_trace_callback(statements.append)
    found = (await listing.repositories(None, Page())).repositories
    index._db.set_trace_callback(None)
    assert len(found) == 100
    assert len(statements) == 1, statements
    # two manifests, their own layers and the shared one, counted once
    assert {r.size for r in found} == {2 * 10 + 3 * 1000}
    assert {(r.tags, r.manifests) for r in found} == {(1, 2)}
    # one repository in detail: manifests, tags, and what they all list
    statements.clear()
    index._db.set_trace_callback(statements.append)
    detail = await listing.repository("docker.io", "r000")
    index._db.set_trace_callback(None)
    assert len(statements) == 3, statements
    assert [len(m.blobs) for m in detail.manifests] == [2, 2]


@pytest_twisted.ensureDeferred
async def test_a_page_of_the_listing_is_one_statement_and_says_if_more_follow(index, upstreams):
    for n in range(30):
        add_image(index, "docker.io", f"r{n:03}", f"{n}", [f"{n}/a"], "1")
        index.put_blob(d(f"{n}/a"), 1000 + n, 1.0)
    listing = Listing(Inline(index), upstreams, tag_ttl=3600.0)
    statements: list[str] = []
    index._db.set_trace_callback(statements.append)
    first = await listing.repositories(None, Page(limit=10))
    index._db.set_trace_callback(None)
    assert len(statements) == 1, statements
    assert [r.repository for r in first.repositories] == [f"r{n:03}" for n in range(10)]
    assert first.more
    after = ("registry-1.docker.io", "r019")  # an alias's name: the upstream's own is meant
    last = await listing.repositories(None, Page(after=after, limit=10))
    assert [r.repository for r in last.repositories] == [f"r{n:03}" for n in range(20, 30)]
    assert not last.more
    largest = await listing.repositories("docker.io", Page(by_size=True, contains="r02", limit=3))
    assert [r.repository for r in largest.repositories] == ["r029", "r028", "r027"]
    assert largest.more


@pytest_twisted.ensureDeferred
async def test_listing_by_alias_unknown_upstreams_and_detail(index, upstreams):
    add_image(index, "docker.io", "library/a", "m1", ["l1", "l2"], "1")
    index.forget_blob(d("l2"))
    add_image(index, "quay.example", "b", "m2", ["l3"], "2")
    add_image(index, "gone.example", "c", "m3", ["l4"], "3")
    listing = Listing(Inline(index), upstreams, tag_ttl=3600.0)
    (a,) = (await listing.repositories("registry-1.docker.io", Page())).repositories
    assert (a.upstream, a.repository, a.size) == ("docker.io", "library/a", 1010)
    # configured with nothing cached: empty; not configured yet cached: listed
    assert await listing.repositories("ghcr.io", Page()) == RepositoryPage((), more=False)
    gone = await listing.repositories("gone.example", Page())
    assert [r.repository for r in gone.repositories] == ["c"]
    # narrowed to nothing, an upstream that is cached is still known
    for page in (Page(contains="nothing"), Page(after=("gone.example", "c"))):
        assert await listing.repositories("gone.example", page) == RepositoryPage((), False)
    with pytest.raises(AdminError) as e:
        await listing.repositories("nope.example", Page(contains="x"))
    assert e.value.status == 404
    detail = await listing.repository("index.docker.io", "library/a")
    assert detail.tags[0].expires_at == 5.0 + 3600.0
    (manifest,) = detail.manifests
    assert [(b.size, b.cached) for b in manifest.blobs] == [(1000, True), (None, False)]
    detail = await listing.repository("quay.example", "b")
    assert detail.tags[0].expires_at == 5.0 + 60  # the upstream's own tag_ttl
    with pytest.raises(AdminError) as e:
        await listing.repository("docker.io", "library/none")
    assert e.value.status == 404


# -- purge ---------------------------------------------------------------------


class FakeEvictor:
    def __init__(self, calls: list[Any]) -> None:
        self.calls = calls

    async def purge(self, **kwargs: Any) -> tuple[Removed, int]:
        self.calls.append(("purge", kwargs))
        return Removed(1, 2, [(d("l1"), 1000)]), 1000


class FakeCluster:
    def __init__(self, calls: list[Any]) -> None:
        self.calls = calls

    async def settle(self) -> None:
        self.calls.append("settle")

    async def forget_everywhere(self, after_removal: bool = False) -> None:
        self.calls.append("forget")


@pytest_twisted.ensureDeferred
async def test_purge_checks_the_selector_then_deletes(index, upstreams):
    calls: list[Any] = []
    add_image(index, "gone.example", "c", "m3", ["l4"], "3")
    purge = Purge(FakeEvictor(calls), Inline(index), upstreams, FakeCluster(calls))
    for selector in [
        PurgeSelector(),
        PurgeSelector(everything=True, upstream="docker.io"),
        PurgeSelector(upstream="docker.io", tag="1"),
        PurgeSelector(upstream="docker.io", repository="a", tag="1", digest=d("x")),
        PurgeSelector(repository="a"),
        PurgeSelector(upstream="docker.io", repository="a", digest="sha256:nope"),
        PurgeSelector(upstream="nope.example"),
    ]:
        with pytest.raises(AdminError) as e:
            await purge.purge(selector)
        assert e.value.status == 400, selector
    assert calls == []
    result = await purge.purge(PurgeSelector(upstream="registry-1.docker.io", repository="a"))
    assert (result.tags, result.manifests, result.blobs, result.bytes_freed) == (
        1,
        2,
        (d("l1"),),
        1000,
    )
    assert calls[0][1]["upstream"] == "docker.io" and calls[0][1]["repo"] == "a"
    # an upstream no longer configured, with something cached, can be purged
    await purge.purge(PurgeSelector(upstream="gone.example"))
    assert calls[1][1]["upstream"] == "gone.example"
    # on a cluster: what is being cached lands, and every node forgets, before and after
    calls.clear()
    clustered = Purge(
        FakeEvictor(calls), Inline(index), upstreams, FakeCluster(calls), FakeCluster(calls)
    )
    await clustered.purge(PurgeSelector(everything=True))
    assert [c if isinstance(c, str) else c[0] for c in calls] == [
        "settle",
        "forget",
        "purge",
        "forget",
    ]


# -- prefetch ------------------------------------------------------------------


class Unreachable:
    """The manifests of an upstream that has none."""

    async def get(self, client: Any, repository: str, reference: str, accept: Any) -> Any:
        raise RegistryError(404, "MANIFEST_UNKNOWN", f"{repository}:{reference} not found")


@pytest_twisted.ensureDeferred
async def test_prefetch_refuses_what_would_never_be_served_and_keeps_the_last_jobs():
    config = config_of(**{"quay.example": {"url": "https://quay.example", "deny": ["secret/*"]}})
    clock = Clock()
    upstreams = Upstreams(config.upstreams, "docker.io", clock, HTTPConnectionPool(clock))
    prefetcher = Prefetcher(upstreams, Unreachable(), None, clock, keep=2)
    for upstream, repository in [("nope.example", "x"), ("quay.example", "secret/x")]:
        with pytest.raises(AdminError) as e:
            prefetcher.prefetch(upstream, repository, "1", None)
        assert e.value.status == 400
    assert prefetcher.jobs() == []
    for n in range(3):
        clock.advance(1)
        job = prefetcher.prefetch("docker.io", f"app{n}", "1", None)
        assert job.repository == f"library/app{n}"
    jobs = prefetcher.jobs()
    assert [j.repository for j in jobs] == ["library/app1", "library/app2"]
    assert {(j.state, j.finished_at) for j in jobs} == {("failed", 2.0), ("failed", 3.0)}
    assert "not found" in str(jobs[0].error)


# -- fsck ----------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_fsck_only_on_a_single_nodes_files_one_at_a_time(index, tmp_path):
    threads = Threads(reactor, "test-files")
    store = FileStore(str(tmp_path / "cache"), threads)
    with pytest.raises(AdminError) as e:
        await Fsck(store, Inline(index), reactor, clustered=True).fsck()
    assert e.value.status == 409
    with pytest.raises(AdminError) as e:
        await Fsck(object(), Inline(index), reactor).fsck()
    assert e.value.status == 409
    checker = Fsck(store, Inline(index), reactor)
    first = Deferred.fromCoroutine(checker.fsck())
    with pytest.raises(AdminError) as e:
        await checker.fsck()
    assert (e.value.status, e.value.message) == (409, "an fsck is already running")
    assert (await first).checked == 0
    assert (await checker.fsck()).checked == 0
    threads.stop()


# -- pins and upstreams --------------------------------------------------------


def test_pins_reach_eviction_and_survive_in_their_store(tmp_path):
    keep = Keep()
    path = str(tmp_path / "pins.json")
    pins = Pins(["alpine:3"], SavedPins(path), keep)
    assert keep.pins == [("docker.io", "library/alpine", "3", None)]
    pin = pins.pin("ghcr.io/o/app:1")
    assert (pin.image, pin.source) == ("ghcr.io/o/app:1", "api")
    assert pins.pin("docker.io/library/alpine:3").source == "config"
    assert [p[1] for p in keep.pins] == ["library/alpine", "o/app"]
    for image, status in [("alpine:3", 409), ("nope:1", 404), ("Not An Image", 400)]:
        with pytest.raises(AdminError) as e:
            pins.unpin(image)
        assert e.value.status == status, image
    again = Pins(["alpine:3"], SavedPins(path), Keep())
    assert [(p.image, p.source) for p in again.pins()] == [
        ("docker.io/library/alpine:3", "config"),
        ("ghcr.io/o/app:1", "api"),
    ]
    again.unpin("ghcr.io/o/app:1")
    assert json.loads(Path(path).read_text()) == []


def test_upstream_settings_change_save_and_reload(tmp_path, upstreams):
    config = config_of(**{"quay.example": {"url": "https://quay.example", "tag_ttl": 60}})
    saved = SavedUpstreams(str(tmp_path / "upstreams.json"))
    settings = UpstreamSettings(config, upstreams, saved)
    view = settings.set_upstream(
        "extra.example", {"url": "https://extra.example", "password": "p", "username": "u"}
    )
    assert (view["password"], view["preset"], view["default"]) == ("<set>", False, False)
    assert saved.load()["extra.example"]["password"] == "p"
    assert settings.set_upstream("extra.example", {"tag_ttl": 5}, merge=True)["tag_ttl"] == 5
    with pytest.raises(AdminError) as e:
        settings.set_upstream("extra.example", {"ca_file": "/etc/shadow"}, merge=True)
    assert e.value.status == 400
    settings.remove_upstream("quay.example")
    assert "quay.example" not in settings.upstreams()
    assert "extra.example" in settings.upstreams()
    # another node changed the saved settings: reload applies them
    saved.put("extra.example", None)
    settings.reload()
    assert "extra.example" not in upstreams.configs
    assert "quay.example" not in upstreams.configs


# -- stats, history, readiness -------------------------------------------------


class Downloads:
    in_flight = 1

    def fetching(self) -> list[dict[str, Any]]:
        return [{"digest": d("l1"), "bytes": 5}] * 60


class Node:
    def __init__(self, name: str, status: str) -> None:
        self.name, self.status = name, status
        self.advertise, self.up_for, self.silent_for = f"http://{name}", 10.0, 1.0


class Nodes:
    name = "a"
    live = [
        Node("a", json.dumps({"requests": 3, "hits": 1, "misses": 1})),
        Node("b", "not json"),
        Node("c", json.dumps({"hits": 2})),
    ]


@pytest_twisted.ensureDeferred
async def test_stats_gauges_jobs_and_the_cluster_summed(index, upstreams, tmp_path):
    add_image(index, "docker.io", "library/a", "m1", ["l1", "l2"], "1")
    metrics = Metrics(Clock())
    jobs: list[Any] = []
    stats = Stats(
        metrics, Downloads(), Inline(index), str(tmp_path), 10**9, upstreams, lambda: jobs
    )
    got = await stats.stats()
    assert got["cache"]["blobs"] == 2 and got["cache"]["max_bytes"] == 10**9
    assert got["cache"]["free_disk_bytes"] > 0
    assert got["fetches_in_flight"] == 1 and len(got["fetching"]) == 50
    assert got["prefetch"] == [] and "cluster" not in got
    assert b"regproxy_cache_bytes 2000.0" in (await stats.metrics())[0]
    assert set(stats.status()) == {
        "requests",
        "hits",
        "misses",
        "bytes_from_cache",
        "bytes_from_upstream",
        "fetching",
    }
    clustered = Stats(
        metrics, Downloads(), Inline(index), str(tmp_path), None, upstreams, lambda: jobs, Nodes()
    )
    cluster = (await clustered.stats())["cluster"]
    assert cluster["node"] == "a" and [n["name"] for n in cluster["nodes"]] == ["a", "b", "c"]
    assert (cluster["summed"]["hits"], cluster["summed"]["hit_ratio"]) == (3, 0.75)


def test_the_days_history_survives_a_restart(tmp_path):
    clock = Clock()
    clock.advance(1_700_000_000)
    path = str(tmp_path / "history.json")
    history = SavedHistory(Metrics(clock).history, path)
    history.sample()
    assert len(json.loads(Path(path).read_text())) == 1
    again = SavedHistory(Metrics(clock).history, path)
    assert len(again.snapshot()["day"]) == 1 and again.snapshot()["hour"] == []
    # a file that cannot be written: logged, not raised
    lost = SavedHistory(Metrics(clock).history, str(tmp_path / "gone" / "history.json"))
    logged = []
    globalLogPublisher.addObserver(logged.append)
    try:
        lost.sample()
    finally:
        globalLogPublisher.removeObserver(logged.append)
    assert any("could not save" in e.get("log_format", "") for e in logged)


class Client:
    name = "docker.io"

    def __init__(self, last_answer: float | None, fails: bool) -> None:
        self.last_answer, self.fails, self.pings = last_answer, fails, 0

    def ping(self) -> Deferred[None]:
        self.pings += 1
        if self.fails:
            raise RegistryError(503, "UNAVAILABLE", "docker.io: connection refused")
        self.last_answer = 100.0
        return succeed(None)


class Default:
    def __init__(self, client: Client) -> None:
        self.client = client

    def default_client(self) -> Client:
        return self.client


class Engines:
    async def check(self) -> dict[str, dict[str, Any]]:
        return {"postgres": {"ok": False, "error": "down"}}


@pytest_twisted.ensureDeferred
async def test_readiness_pings_only_a_quiet_upstream(tmp_path):
    clock = Clock()
    clock.advance(100)
    (tmp_path / "tmp").mkdir()
    recent = Client(last_answer=90.0, fails=False)
    ready = await Readiness(str(tmp_path), Default(recent), clock).ready()
    assert ready["ready"] is True and recent.pings == 0
    quiet = Client(last_answer=None, fails=True)
    ready = await Readiness(str(tmp_path / "none"), Default(quiet), clock, Engines()).ready()
    assert ready["ready"] is False and quiet.pings == 1
    assert ready["checks"]["storage"]["ok"] is False
    assert "connection refused" in ready["checks"]["upstream"]["error"]
    assert ready["checks"]["postgres"]["ok"] is False


class Never:
    """The manifests of an upstream that never answers (until the test ends)."""

    def __init__(self) -> None:
        self.waiting: list[Deferred[Any]] = []

    async def get(self, client: Any, repository: str, reference: str, accept: Any) -> Any:
        d: Deferred[Any] = Deferred()
        self.waiting.append(d)
        return await d


@pytest_twisted.ensureDeferred
async def test_prefetches_under_way_are_bounded_and_do_not_keep_ended_ones(monkeypatch):
    """A long prefetch no longer keeps every later, ended, job in the list;
    and past RUNNING_JOBS under way, more are refused (409) until one ends."""
    monkeypatch.setattr(prefetch_module, "RUNNING_JOBS", 2)
    config = config_of()
    clock = Clock()
    upstreams = Upstreams(config.upstreams, "docker.io", clock, HTTPConnectionPool(clock))
    never = Never()
    long = Prefetcher(upstreams, never, None, clock, keep=2)
    long.prefetch("docker.io", "slow", "1", None)
    long._manifests = Unreachable()  # the later ones end at once
    for n in range(5):
        long.prefetch("docker.io", f"app{n}", "1", None)
    assert [j.repository for j in long.jobs()] == ["library/slow", "library/app4"]
    long._manifests = never
    long.prefetch("docker.io", "slow2", "1", None)
    with pytest.raises(AdminError) as e:
        long.prefetch("docker.io", "one-too-many", "1", None)
    assert e.value.status == 409
    for d in never.waiting:
        d.errback(RegistryError(404, "MANIFEST_UNKNOWN", "gone"))
    long.prefetch("docker.io", "after", "1", None)
