"""The admin backend over a real proxy: stats, inspect, purge, prefetch, upstreams."""

from __future__ import annotations

import http.client
import json
import os
from urllib.parse import urlsplit

import pytest
import pytest_twisted
from fakeregistry import Fault, Override
from proxyharness import swept, until
from twisted.internet import reactor
from twisted.internet.threads import blockingCallFromThread, deferToThread

from registryproxy.admin.backend import AdminError, PurgeSelector
from registryproxy.cache.index import Page
from registryproxy.names import Digest


def layers(body: bytes) -> list[str]:
    return [layer["digest"] for layer in json.loads(body)["layers"]]


@pytest_twisted.ensureDeferred
async def test_stats_count_hits_misses_and_bytes(fake_registry, make_proxy):
    _, body = fake_registry.add_image("library/app", "1", [b"x" * 1000])
    proxy = await make_proxy(fake_registry.url)
    control = proxy.proxy.control
    for _ in range(2):
        await proxy.get("/v2/app/manifests/1")
        await proxy.get(f"/v2/app/blobs/{layers(body)[0]}")
    await proxy.get("/v2/app/manifests/nope")
    stats = await control.stats()
    assert (stats["hits"], stats["misses"]) == (2, 2)
    assert stats["hit_ratio"] == 0.5
    assert stats["bytes_from_upstream"] == len(body) + 1000
    assert stats["bytes_from_cache"] == len(body) + 1000
    assert stats["errors"] == {"404": 1}
    assert stats["upstream_requests"]["docker.io"]["get_manifest"] == 2
    assert stats["upstream_requests"]["docker.io"]["get_blob"] == 1
    assert stats["cache"]["manifests"] == 1 and stats["cache"]["blobs"] == 2
    assert stats["cache"]["size_bytes"] == len(body) + 1000
    assert stats["cache"]["free_disk_bytes"] > 0
    text, content_type = await control.metrics()
    assert content_type.startswith("text/plain")
    assert b'regproxy_requests_total{cache="hit",kind="blob"} 1.0' in text


@pytest_twisted.ensureDeferred
async def test_inspect_a_repository(fake_registry, make_proxy):
    digest, body = fake_registry.add_image("library/app", "1", [b"a" * 10, b"b" * 20])
    proxy = await make_proxy(fake_registry.url)
    control = proxy.proxy.control
    await proxy.get("/v2/app/manifests/1")
    await proxy.get(f"/v2/app/blobs/{layers(body)[0]}")
    (summary,) = (await control.repositories(None, Page())).repositories
    assert (summary.upstream, summary.repository, summary.tags, summary.manifests) == (
        "docker.io",
        "library/app",
        1,
        1,
    )
    assert summary.size == len(body) + 10
    detail = await control.repository("docker.io", "library/app")
    assert [t.digest for t in detail.tags] == [digest]
    assert detail.tags[0].expires_at == detail.tags[0].checked_at + 3600
    (manifest,) = detail.manifests
    assert [(b.size, b.cached) for b in manifest.blobs][1:] == [(10, True), (None, False)]
    with pytest.raises(AdminError) as e:
        await control.repository("docker.io", "library/none")
    assert e.value.status == 404
    with pytest.raises(AdminError):
        await control.repositories("nope.example", Page())


@pytest_twisted.ensureDeferred
async def test_purge_a_tag_frees_its_blobs_and_the_next_pull_misses(fake_registry, make_proxy):
    _, one = fake_registry.add_image("library/app", "1", [b"shared", b"only in one"])
    _, two = fake_registry.add_image("library/app", "2", [b"shared", b"only in two"])
    proxy = await make_proxy(fake_registry.url)
    control = proxy.proxy.control
    for tag, body in (("1", one), ("2", two)):
        await proxy.get(f"/v2/app/manifests/{tag}")
        for layer in layers(body):
            await proxy.get(f"/v2/app/blobs/{layer}")
    result = await control.purge(
        PurgeSelector(upstream="docker.io", repository="library/app", tag="1")
    )
    assert result.manifests == 1 and result.tags == 1
    only_one = layers(one)[1]
    assert only_one in result.blobs
    assert layers(one)[0] not in result.blobs  # still listed by tag 2
    assert result.bytes_freed == len(one) + len(b"only in one")
    assert not proxy.blob_path(only_one).exists()
    assert proxy.blob_path(layers(one)[0]).exists()
    reply = await proxy.get("/v2/app/manifests/1")
    assert reply.header("X-Cache") == "MISS"
    reply = await proxy.get("/v2/app/manifests/2")
    assert reply.header("X-Cache") == "HIT"


@pytest_twisted.ensureDeferred
async def test_purge_selectors_are_checked(fake_registry, make_proxy):
    proxy = await make_proxy(fake_registry.url)
    control = proxy.proxy.control
    for selector in [
        PurgeSelector(),
        PurgeSelector(tag="1"),
        PurgeSelector(upstream="docker.io", tag="1"),
        PurgeSelector(repository="library/x"),
        PurgeSelector(upstream="docker.io", repository="x", digest="sha256:nope"),
        PurgeSelector(upstream="nope.example"),
        PurgeSelector(everything=True, upstream="docker.io"),
    ]:
        with pytest.raises(AdminError) as e:
            await control.purge(selector)
        assert e.value.status == 400, selector
    assert (await control.purge(PurgeSelector(everything=True))).manifests == 0


def read_around(url: str, path: str, between) -> bytes:
    """GET in a thread, calling *between* in the reactor after the first bytes."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        first = response.read(1000)
        blockingCallFromThread(reactor, between)
        return first + response.read()
    finally:
        conn.close()


@pytest_twisted.ensureDeferred
async def test_purge_never_cuts_a_download_in_progress(fake_registry, make_proxy):
    data = os.urandom(32 * 1024 * 1024)
    digest = fake_registry.add_blob(data)
    proxy = await make_proxy(fake_registry.url)
    path = f"/v2/library/x/blobs/{digest}"
    await proxy.get(path)
    control = proxy.proxy.control

    def purge():
        # the blob is listed by no manifest, so purge it as the purge code would
        assert control.checker._store.delete(Digest.parse(digest))

    body = await deferToThread(read_around, proxy.url, path, purge)
    assert body == data
    assert not proxy.blob_path(digest).exists()


@pytest_twisted.ensureDeferred
async def test_prefetch_chosen_platforms(fake_registry, make_proxy):
    amd64, amd64_body = fake_registry.add_image(
        "library/multi", None, [b"amd"], architecture="amd64"
    )
    arm64, arm64_body = fake_registry.add_image(
        "library/multi", None, [b"arm"], architecture="arm64"
    )
    fake_registry.add_index("library/multi", "1", [amd64, arm64])
    fake_registry.blob_faults["*"] = Fault.slow(chunk=1, delay=0.001)
    proxy = await make_proxy(fake_registry.url)
    control = proxy.proxy.control
    job = control.prefetch("docker.io", "multi", "1", ("linux/amd64",))
    assert job.state in ("queued", "running")
    await until(lambda: control.prefetch_jobs()[0].state != "running")
    (job,) = control.prefetch_jobs()
    assert (job.state, job.error) == ("done", None)
    assert (job.manifests_done, job.blobs_done, job.blobs_total) == (2, 2, 2)
    assert job.bytes_fetched > 0
    assert all(proxy.blob_path(d).exists() for d in layers(amd64_body))
    assert not any(proxy.blob_path(d).exists() for d in layers(arm64_body))
    assert (await control.stats())["prefetch"][0]["state"] == "done"
    reply = await proxy.get(f"/v2/multi/manifests/{amd64}")
    assert reply.header("X-Cache") == "HIT"


@pytest_twisted.ensureDeferred
async def test_prefetch_fetches_a_file_on_disk_the_index_does_not_know(fake_registry, make_proxy):
    """A crash can leave a verified file in place without its rows (killed
    between its rename and its row): a pull would not serve it without the
    upstream, so a prefetch does not count it as cached."""
    _, body = fake_registry.add_image("library/app", "1", [b"layer"])
    (layer,) = layers(body)
    config = json.loads(body)["config"]["digest"]
    proxy = await make_proxy(fake_registry.url)
    for blob in (config, layer):
        assert (await proxy.get(f"/v2/library/app/blobs/{blob}")).code == 200
        await until(lambda blob=blob: proxy.blob_path(blob).exists())
    proxy.proxy.index.forget_blobs([layer])  # the file stays, as after such a crash
    control = proxy.proxy.control
    control.prefetch("docker.io", "library/app", "1", None)
    await until(lambda: control.prefetch_jobs()[0].state not in ("queued", "running"))
    (job,) = control.prefetch_jobs()
    assert (job.state, job.bytes_fetched) == ("done", len(b"layer"))
    fake_registry.status_override["/v2/"] = Override(503)  # the upstream is down
    reply = await proxy.get(f"/v2/library/app/blobs/{layer}")
    assert (reply.code, reply.body, reply.header("X-Cache")) == (200, b"layer", "HIT")


@pytest_twisted.ensureDeferred
async def test_prefetch_failure_is_reported(fake_registry, make_proxy):
    proxy = await make_proxy(fake_registry.url)
    control = proxy.proxy.control
    control.prefetch("docker.io", "library/none", "1", None)
    await until(lambda: control.prefetch_jobs()[0].state not in ("queued", "running"))
    (job,) = control.prefetch_jobs()
    assert job.state == "failed" and "NAME_UNKNOWN" in job.error
    with pytest.raises(AdminError):
        control.prefetch("nope.example", "x", "1", None)


@pytest_twisted.ensureDeferred
async def test_upstream_added_at_run_time_serves_at_once_and_survives_restart(
    make_fake_registry, make_proxy, tmp_path
):
    hub = await make_fake_registry()
    extra = await make_fake_registry(auth="basic", username="u", password="s3cret")
    digest, _ = extra.add_image("team/app", "1", [b"x"])
    cache = tmp_path / "cache"
    proxy = await make_proxy(hub.url, cache_dir=cache)
    control = proxy.proxy.control
    assert (await proxy.get("/v2/extra.example/team/app/manifests/1")).code == 404

    view = control.set_upstream(
        "extra.example",
        {"url": extra.url, "username": "u", "password": "s3cret", "share_private": True},
    )
    assert view["password"] == "<set>" and "s3cret" not in json.dumps(control.upstreams())
    reply = await proxy.get("/v2/extra.example/team/app/manifests/1")
    assert (reply.code, reply.header("Docker-Content-Digest")) == (200, digest)

    view = control.set_upstream("extra.example", {"tag_ttl": 5}, merge=True)
    assert (view["tag_ttl"], view["username"], view["password"]) == (5, "u", "<set>")
    await proxy.stop()
    again = await make_proxy(hub.url, cache_dir=cache)
    assert again.proxy.control.upstreams()["extra.example"]["tag_ttl"] == 5
    reply = await again.get("/v2/extra.example/team/app/manifests/1?x=1")
    assert reply.code == 200

    again.proxy.control.remove_upstream("extra.example")
    assert (await again.get("/v2/extra.example/team/app/manifests/1")).code == 404


@pytest_twisted.ensureDeferred
async def test_upstream_changes_are_validated(fake_registry, make_proxy):
    proxy = await make_proxy(fake_registry.url)
    control = proxy.proxy.control
    for name, settings, status in [
        ("x.example", {}, 400),  # no url
        ("x.example", {"url": "ftp://x"}, 400),
        ("x.example", {"url": "http://x", "bogus": 1}, 400),
        ("x.example", {"url": "http://x", "fallbacks": ["nope.example"]}, 400),
        ("bad name!", {"url": "http://x"}, 400),
    ]:
        with pytest.raises(AdminError) as e:
            control.set_upstream(name, settings)
        assert e.value.status == status, (name, settings)
    with pytest.raises(AdminError) as e:
        control.set_upstream("x.example", {"tag_ttl": 1}, merge=True)
    assert e.value.status == 404
    for name, status in [("docker.io", 409), ("ghcr.io", 409), ("nope.example", 404)]:
        with pytest.raises(AdminError) as e:
            control.remove_upstream(name)
        assert e.value.status == status, name
    # a preset changes only what is given
    view = control.set_upstream("ghcr.io", {"username": "me", "password": "s3cret"})
    assert view["url"] == "https://ghcr.io" and view["preset"] is True
    # files and environment variables of the machine are the config file's business
    for key in ("password_file", "password_env", "ca_file"):
        with pytest.raises(AdminError) as e:
            control.set_upstream("ghcr.io", {"username": "me", key: "/etc/shadow"})
        assert (e.value.status, key in e.value.message) == (400, True)
    # moving an upstream elsewhere does not take its credentials along
    view = control.set_upstream("ghcr.io", {"url": "https://elsewhere.example"}, merge=True)
    assert (view["username"], view["password"]) == (None, None)


@pytest_twisted.ensureDeferred
async def test_readiness(fake_registry, make_proxy, tmp_path):
    proxy = await make_proxy(fake_registry.url)
    ready = await proxy.proxy.control.ready()
    assert ready["ready"] is True, ready
    dead = await make_proxy("http://127.0.0.1:9", cache_dir=tmp_path / "dead")
    ready = await dead.proxy.control.ready()
    assert ready["ready"] is False
    assert ready["checks"]["storage"]["ok"] is True
    assert "docker.io" in ready["checks"]["upstream"]["error"]


@pytest_twisted.ensureDeferred
async def test_pins_from_config_and_api_keep_images_from_eviction(
    fake_registry, make_proxy, tmp_path
):
    for name in ("config", "api", "other", "last"):
        fake_registry.add_image(f"library/{name}", "1", [(name.encode() * 40_000)[:40_000]])
    cache = tmp_path / "cache"
    proxy = await make_proxy(
        fake_registry.url,
        cache_dir=cache,
        cache={"max_size": 150_000, "pinned": ["config:1"]},
    )
    control = proxy.proxy.control
    pin = control.pin("api:1")
    assert (pin.image, pin.source) == ("docker.io/library/api:1", "api")
    assert [p.image for p in control.pins()] == [
        "docker.io/library/config:1",
        "docker.io/library/api:1",
    ]
    for name in ("config", "api", "other", "last"):
        reply = await proxy.get(f"/v2/{name}/manifests/1")
        for layer in layers(reply.body):
            await proxy.get(f"/v2/{name}/blobs/{layer}")
        await swept(proxy)  # eviction runs just after
    cached = {r.repository for r in (await control.repositories(None, Page())).repositories}
    assert cached == {"library/config", "library/api", "library/last"}
    with pytest.raises(AdminError) as e:
        control.unpin("config:1")
    assert e.value.status == 409
    with pytest.raises(AdminError) as e:
        control.unpin("nope:1")
    assert e.value.status == 404
    with pytest.raises(AdminError) as e:
        control.pin("Not An Image")
    assert e.value.status == 400
    # pins added through the API survive a restart
    await proxy.stop()
    again = await make_proxy(fake_registry.url, cache_dir=cache, cache={"pinned": ["config:1"]})
    assert [p.source for p in again.proxy.control.pins()] == ["config", "api"]
    again.proxy.control.unpin("docker.io/library/api:1")
    assert [p.source for p in again.proxy.control.pins()] == ["config"]


@pytest_twisted.ensureDeferred
async def test_fsck_through_the_backend(fake_registry, make_proxy):
    digest = fake_registry.add_blob(b"will rot")
    proxy = await make_proxy(fake_registry.url)
    await proxy.get(f"/v2/library/x/blobs/{digest}")
    proxy.blob_path(digest).write_bytes(b"has rotted")
    result = await proxy.proxy.control.fsck()
    assert result.quarantined == (digest,)
    assert result.checked == 1


@pytest_twisted.ensureDeferred
async def test_moving_an_upstream_drops_the_credentials_not_given_again(fake_registry, make_proxy):
    proxy = await make_proxy(fake_registry.url)
    control = proxy.proxy.control
    control.set_upstream("ghcr.io", {"username": "me", "password": "s3cret"})
    new = {"url": "https://elsewhere.example", "username": "me"}
    # the old password is not sent to the new host: a username alone is not enough
    with pytest.raises(AdminError) as e:
        control.set_upstream("ghcr.io", new, merge=True)
    assert e.value.status == 400 and "username and a password" in e.value.message
    assert control.upstreams()["ghcr.io"]["url"] == "https://ghcr.io"
    view = control.set_upstream("ghcr.io", {**new, "password": "other"}, merge=True)
    assert (view["url"], view["username"]) == ("https://elsewhere.example", "me")
    assert proxy.proxy.upstreams.configs["ghcr.io"].credentials() == ("me", "other")
    # staying put keeps them
    view = control.set_upstream("ghcr.io", {"tag_ttl": 5}, merge=True)
    assert proxy.proxy.upstreams.configs["ghcr.io"].credentials() == ("me", "other")


@pytest_twisted.ensureDeferred
async def test_dashboard_numbers_and_the_day_history_surviving_a_restart(
    fake_registry, make_proxy, tmp_path
):
    _, body = fake_registry.add_image("library/app", "1", [b"x" * 1000])
    cache = tmp_path / "cache"
    proxy = await make_proxy(fake_registry.url, cache_dir=cache)
    control = proxy.proxy.control
    control.sample_history()  # the first sample is a day's too, and saved
    await proxy.get("/v2/app/manifests/1")
    await proxy.get("/v2/app/manifests/nope")
    stats = await control.stats()
    assert stats["fetching"] == []
    assert stats["upstreams"]["docker.io"]["breaker_open"] is False
    assert stats["upstreams"]["docker.io"]["last_answer"] is not None
    assert stats["cache"]["max_bytes"] is None
    (error,) = control.recent_errors()
    assert (error["status"], error["method"], error["path"]) == (
        404,
        "GET",
        "/v2/app/manifests/nope",
    )
    assert error["client"] == "127.0.0.1"
    control.sample_history()  # an hour's sample only: 10 s later is not 5 min later
    history = control.history()
    assert [s["misses"] for s in history["hour"]] == [0, stats["misses"]] == [0, 1]
    assert [s["misses"] for s in history["day"]] == [0]
    assert json.loads((cache / "history.json").read_text()) == history["day"]

    await proxy.stop()
    again = await make_proxy(fake_registry.url, cache_dir=cache)
    after = again.proxy.control.history()
    assert after["day"] == history["day"] and after["hour"] == []
    assert again.proxy.control.recent_errors() == []
