"""Clients that leave early, downloads that end while others join: nothing
leaks, nothing hangs, nobody gets a broken body."""

from __future__ import annotations

import os
import socket
from urllib.parse import urlsplit

import pytest_twisted
from proxyharness import cache_fds, settle, until
from twisted.internet.threads import deferToThread

from registryproxy.admin.backend import PurgeSelector


def slow_blobs(registry, delay: float, methods=("GET",)) -> None:
    """The fake answers blob requests *delay* seconds late."""
    for method in methods:
        registry.blob_delay[method] = delay


def hang_up_after(url: str, path: str, seconds: float) -> None:
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port)) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        sock.settimeout(seconds)
        try:
            sock.recv(1)
        except TimeoutError:
            pass


@pytest_twisted.ensureDeferred
async def test_clients_leaving_before_the_upstream_answers(fake_registry, make_proxy):
    data = os.urandom(3 * 1024 * 1024)
    digest = fake_registry.add_blob(data)
    slow_blobs(fake_registry, 0.5)
    proxy = await make_proxy(fake_registry.url)
    path = f"/v2/library/x/blobs/{digest}"
    await deferToThread(hang_up_after, proxy.url, path, 0.1)
    await deferToThread(hang_up_after, proxy.url, path, 0.1)
    patient = await proxy.get(path)
    assert (patient.code, patient.body) == (200, data)
    await until(lambda: proxy.proxy.blobs.in_flight == 0)
    assert proxy.blob_path(digest).read_bytes() == data
    assert cache_fds(proxy) == 0


@pytest_twisted.ensureDeferred
async def test_leaving_during_the_permission_check_leaks_nothing(make_fake_registry, make_proxy):
    registry = await make_fake_registry()
    data = os.urandom(100_000)
    digest = registry.add_blob(data)
    slow_blobs(registry, 0.5, methods=("HEAD",))
    proxy = await make_proxy(registry.url)
    await proxy.get(f"/v2/library/a/blobs/{digest}")  # cached, listed for library/a only
    for repo in ("b", "c", "d"):
        await deferToThread(hang_up_after, proxy.url, f"/v2/library/{repo}/blobs/{digest}", 0.1)
    await settle(0.8)
    assert cache_fds(proxy) == 0


@pytest_twisted.ensureDeferred
async def test_joining_a_download_that_ends_during_the_permission_check(fake_registry, make_proxy):
    data = os.urandom(2 * 1024 * 1024)
    digest = fake_registry.add_blob(data)
    slow_blobs(fake_registry, 0.3)
    slow_blobs(fake_registry, 1.0, methods=("HEAD",))
    proxy = await make_proxy(fake_registry.url)
    first = proxy.get(f"/v2/library/a/blobs/{digest}")
    await settle(0.1)
    second = proxy.get(f"/v2/library/b/blobs/{digest}")  # HEAD outlives the download
    a, b = await first, await second
    assert (a.code, a.body) == (200, data)
    assert (b.code, b.body) == (200, data)


@pytest_twisted.ensureDeferred
async def test_purged_during_the_permission_check_is_fetched_again(fake_registry, make_proxy):
    _, body = fake_registry.add_image("library/a", "1", [b"layer bytes"])
    import json

    layer = json.loads(body)["layers"][0]["digest"]
    proxy = await make_proxy(fake_registry.url)
    await proxy.get("/v2/a/manifests/1")
    await proxy.get(f"/v2/a/blobs/{layer}")
    slow_blobs(fake_registry, 0.5, methods=("HEAD",))
    pending = proxy.get(f"/v2/library/b/blobs/{layer}")
    await settle(0.1)
    await proxy.proxy.control.purge(PurgeSelector(upstream="docker.io", repository="library/a"))
    assert not proxy.blob_path(layer).exists()
    reply = await pending
    assert (reply.code, reply.body, reply.header("X-Cache")) == (200, b"layer bytes", "MISS")


@pytest_twisted.ensureDeferred
async def test_a_refused_repository_does_not_fail_another_repositorys_pull(
    make_fake_registry, make_proxy
):
    registry = await make_fake_registry()
    data = os.urandom(500_000)
    digest = registry.add_blob(data)
    slow_blobs(registry, 0.3)
    proxy = await make_proxy(registry.url)
    from fakeregistry import Override

    registry.status_override["/v2/private/"] = Override(401)
    refused = proxy.get(f"/v2/private/thing/blobs/{digest}")
    await settle(0.05)
    allowed = proxy.get(f"/v2/library/public/blobs/{digest}")
    assert (await refused).code in (401, 404)
    reply = await allowed
    assert (reply.code, reply.body) == (200, data)
