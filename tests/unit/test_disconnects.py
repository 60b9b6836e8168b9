"""Clients that leave early, downloads that end while others join: nothing
leaks, nothing hangs, nobody gets a broken body."""

from __future__ import annotations

import json
import os

import pytest_twisted
from fakeregistry import Override
from proxyharness import ProxyClock, advance_until, cache_fds, leave_once, settle, until

from registryproxy.admin.backend import PurgeSelector


def slow_blobs(registry, delay: float, methods=("GET",)) -> None:
    """The fake answers blob requests *delay* seconds late."""
    for method in methods:
        registry.blob_delay[method] = delay


def blobs_asked(registry, method: str, count: int):
    return lambda: registry.count(method, "/blobs/") >= count


@pytest_twisted.ensureDeferred
async def test_clients_leaving_before_the_upstream_answers(make_fake_registry, make_proxy):
    clock = ProxyClock()
    registry = await make_fake_registry(clock=clock)
    data = os.urandom(3 * 1024 * 1024)
    digest = registry.add_blob(data)
    slow_blobs(registry, 0.5)
    proxy = await make_proxy(registry.url, clock=clock)
    path = f"/v2/library/x/blobs/{digest}"
    await leave_once(proxy.url, path, blobs_asked(registry, "GET", 1))
    await leave_once(proxy.url, path, blobs_asked(registry, "GET", 1))
    asked = proxy.get(path)
    await advance_until(clock, 0.1, lambda: asked.called)
    patient = await asked
    assert (patient.code, patient.body) == (200, data)
    await until(lambda: proxy.proxy.blobs.in_flight == 0)
    assert proxy.blob_path(digest).read_bytes() == data
    assert cache_fds(proxy) == 0


@pytest_twisted.ensureDeferred
async def test_leaving_during_the_permission_check_leaks_nothing(make_fake_registry, make_proxy):
    clock = ProxyClock()
    registry = await make_fake_registry(clock=clock)
    data = os.urandom(100_000)
    digest = registry.add_blob(data)
    slow_blobs(registry, 0.5, methods=("HEAD",))
    proxy = await make_proxy(registry.url, clock=clock)
    await proxy.get(f"/v2/library/a/blobs/{digest}")  # cached, listed for library/a only
    for asked, repo in enumerate(("b", "c", "d"), 1):
        path = f"/v2/library/{repo}/blobs/{digest}"
        await leave_once(proxy.url, path, blobs_asked(registry, "HEAD", asked))
    clock.advance(0.5)  # the checks answered, their clients gone
    await settle(0.1)
    assert cache_fds(proxy) == 0


@pytest_twisted.ensureDeferred
async def test_joining_a_download_that_ends_during_the_permission_check(
    make_fake_registry, make_proxy
):
    clock = ProxyClock()
    registry = await make_fake_registry(clock=clock)
    data = os.urandom(2 * 1024 * 1024)
    digest = registry.add_blob(data)
    slow_blobs(registry, 0.3)
    slow_blobs(registry, 1.0, methods=("HEAD",))
    proxy = await make_proxy(registry.url, clock=clock)
    first = proxy.get(f"/v2/library/a/blobs/{digest}")
    await until(blobs_asked(registry, "GET", 1))
    second = proxy.get(f"/v2/library/b/blobs/{digest}")  # HEAD outlives the download
    await settle(0.05)
    await advance_until(clock, 0.1, lambda: first.called and second.called)
    a, b = await first, await second
    assert (a.code, a.body) == (200, data)
    assert (b.code, b.body) == (200, data)


@pytest_twisted.ensureDeferred
async def test_purged_during_the_permission_check_is_fetched_again(make_fake_registry, make_proxy):
    clock = ProxyClock()
    registry = await make_fake_registry(clock=clock)
    _, body = registry.add_image("library/a", "1", [b"layer bytes"])
    layer = json.loads(body)["layers"][0]["digest"]
    proxy = await make_proxy(registry.url, clock=clock)
    await proxy.get("/v2/a/manifests/1")
    await proxy.get(f"/v2/a/blobs/{layer}")
    slow_blobs(registry, 0.5, methods=("HEAD",))
    pending = proxy.get(f"/v2/library/b/blobs/{layer}")
    await until(blobs_asked(registry, "HEAD", 1))
    await proxy.proxy.control.purge(PurgeSelector(upstream="docker.io", repository="library/a"))
    assert not proxy.blob_path(layer).exists()
    await advance_until(clock, 0.1, lambda: pending.called)
    reply = await pending
    assert (reply.code, reply.body, reply.header("X-Cache")) == (200, b"layer bytes", "MISS")


@pytest_twisted.ensureDeferred
async def test_a_refused_repository_does_not_fail_another_repositorys_pull(
    make_fake_registry, make_proxy
):
    clock = ProxyClock()
    registry = await make_fake_registry(clock=clock)
    data = os.urandom(500_000)
    digest = registry.add_blob(data)
    slow_blobs(registry, 0.3)
    proxy = await make_proxy(registry.url, clock=clock)
    registry.status_override["/v2/private/"] = Override(401)
    refused = proxy.get(f"/v2/private/thing/blobs/{digest}")
    await settle(0.05)
    allowed = proxy.get(f"/v2/library/public/blobs/{digest}")
    await settle(0.05)
    await advance_until(clock, 0.1, lambda: refused.called and allowed.called)
    assert (await refused).code in (401, 404)
    reply = await allowed
    assert (reply.code, reply.body) == (200, data)
