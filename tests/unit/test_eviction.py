"""The disk budget: least recently used images go first, shared layers and pins stay."""

from __future__ import annotations

import json

import pytest_twisted
from proxyharness import settle

from registryproxy.config import ConfigError, parse_config, parse_size

KB = 1000


async def pull(proxy, repo, tag="1"):
    reply = await proxy.get(f"/v2/{repo}/manifests/{tag}")
    assert reply.code == 200
    layers = [layer["digest"] for layer in json.loads(reply.body)["layers"]]
    for layer in layers:
        assert (await proxy.get(f"/v2/{repo}/blobs/{layer}")).code == 200
    await settle()
    return layers


def cached(proxy, digests):
    return [proxy.blob_path(d).exists() for d in digests]


@pytest_twisted.ensureDeferred
async def test_least_recently_used_image_goes_first(fake_registry, make_proxy):
    base = b"b" * (20 * KB)
    for name in ("one", "two", "three"):
        fake_registry.add_image(
            f"library/{name}", "1", [base, (name.encode() * 30 * KB)[: 30 * KB]]
        )
    proxy = await make_proxy(fake_registry.url, cache={"max_size": "100KB", "low_water": 0.9})
    one = await pull(proxy, "one")
    two = await pull(proxy, "two")
    await proxy.get("/v2/one/manifests/1")  # one is now more recent than two
    three = await pull(proxy, "three")
    assert cached(proxy, one) == [True, True]
    assert cached(proxy, two) == [True, False]  # shared base layer kept
    assert cached(proxy, three) == [True, True]
    assert proxy.proxy.index.total_size() <= 90 * KB
    reply = await proxy.get("/v2/two/manifests/1")
    assert reply.header("X-Cache") == "MISS"


@pytest_twisted.ensureDeferred
async def test_pinned_images_are_never_evicted(fake_registry, make_proxy):
    for name in ("pinned", "other", "third"):
        fake_registry.add_image(f"library/{name}", "1", [(name.encode() * 40 * KB)[: 40 * KB]])
    proxy = await make_proxy(
        fake_registry.url, cache={"max_size": 100 * KB, "pinned": ["docker.io/library/pinned:1"]}
    )
    pinned = await pull(proxy, "pinned")
    other = await pull(proxy, "other")
    third = await pull(proxy, "third")
    assert cached(proxy, pinned) == [True]
    assert cached(proxy, other) == [False]
    assert cached(proxy, third) == [True]


@pytest_twisted.ensureDeferred
async def test_idle_images_are_swept(fake_registry, make_proxy):
    fake_registry.add_image("library/app", "1", [b"x" * KB])
    proxy = await make_proxy(fake_registry.url, cache={"max_idle": 0})
    layers = await pull(proxy, "app")
    assert cached(proxy, layers) == [True]
    assert proxy.proxy.evictor.sweep() > 0
    assert cached(proxy, layers) == [False]
    assert proxy.proxy.index.totals()["manifests"] == 0


def test_sizes_and_their_errors():
    assert parse_size("250MB") == 250_000_000
    assert parse_size("50GiB") == 50 * 1024**3
    assert parse_size(" 1.5 kib ") == 1536
    assert parse_config("cache: {max_size: 10GB}").cache.max_bytes == 10**10
    for bad in ("lots", "10 parsecs", "-1GB"):
        try:
            parse_config(f"cache: {{max_size: '{bad}'}}")
        except ConfigError as e:
            assert "max_size" in str(e)
        else:
            raise AssertionError(bad)
