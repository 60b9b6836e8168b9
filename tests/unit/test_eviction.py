"""The disk budget: least recently used images go first, shared layers and pins stay."""

from __future__ import annotations

import json
import os
import threading

import pytest_twisted
from proxyharness import partial_get, swept, until
from twisted.internet.threads import deferToThread

from registryproxy.config import ConfigError, parse_config, parse_size

KB = 1000


async def pull(proxy, repo, tag="1"):
    reply = await proxy.get(f"/v2/{repo}/manifests/{tag}")
    assert reply.code == 200
    layers = [layer["digest"] for layer in json.loads(reply.body)["layers"]]
    for layer in layers:
        assert (await proxy.get(f"/v2/{repo}/blobs/{layer}")).code == 200
    await swept(proxy)
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
    assert await proxy.proxy.evictor.sweep() > 0
    assert cached(proxy, layers) == [False]
    assert proxy.proxy.index.totals()["manifests"] == 0


def small_disk(proxy, capacity):
    """Make the store's disk *capacity* bytes, of which what it holds is used."""

    def room():
        files = [*(proxy.cache_dir / "blobs").rglob("*"), *(proxy.cache_dir / "tmp").iterdir()]
        return capacity - sum(f.stat().st_size for f in files if f.is_file())

    proxy.proxy.store.room = room


@pytest_twisted.ensureDeferred
async def test_a_full_disk_makes_room_for_new_images(fake_registry, make_proxy):
    # no max_size: only the disk limits the cache
    for name in ("one", "two", "three"):
        fake_registry.add_image(f"library/{name}", "1", [(name.encode() * 40 * KB)[: 40 * KB]])
    proxy = await make_proxy(fake_registry.url)
    small_disk(proxy, 100 * KB)
    one = await pull(proxy, "one")
    two = await pull(proxy, "two")
    three = await pull(proxy, "three")  # 20 KB free: "one" makes way
    assert cached(proxy, one + two + three) == [False, True, True]
    assert (await proxy.get("/v2/one/manifests/1")).header("X-Cache") == "MISS"
    assert (await proxy.get("/v2/two/manifests/1")).header("X-Cache") == "HIT"


@pytest_twisted.ensureDeferred
async def test_making_room_spares_pins_and_never_empties_the_cache_in_vain(
    fake_registry, make_proxy
):
    fake_registry.add_image("library/pinned", "1", [b"p" * 40 * KB])
    fake_registry.add_image("library/other", "1", [b"o" * 40 * KB])
    fake_registry.add_image("library/huge", "1", [b"h" * 150 * KB])
    fake_registry.add_image("library/new", "1", [b"n" * 40 * KB])
    proxy = await make_proxy(fake_registry.url, cache={"pinned": ["docker.io/library/pinned"]})
    small_disk(proxy, 100 * KB)
    pinned = await pull(proxy, "pinned")
    other = await pull(proxy, "other")
    huge = await pull(proxy, "huge")  # cannot fit even with the cache gone: relayed
    assert cached(proxy, pinned + other + huge) == [True, True, False]
    new = await pull(proxy, "new")  # fits once "other" is gone; the pin stays
    assert cached(proxy, pinned + other + new) == [True, False, True]


@pytest_twisted.ensureDeferred
async def test_making_room_passes_over_images_being_read(fake_registry, make_proxy):
    MiB = 1024 * 1024
    for name in ("one", "two", "three"):
        fake_registry.add_image(f"library/{name}", "1", [os.urandom(16 * MiB)])
    proxy = await make_proxy(fake_registry.url)
    small_disk(proxy, 40 * MiB)
    one = await pull(proxy, "one")
    two = await pull(proxy, "two")
    # a slow client is reading one's layer: evicting it would free nothing yet
    done = threading.Event()
    reading = deferToThread(partial_get, proxy.url, f"/v2/one/blobs/{one[0]}", 1, done, True)
    await until(lambda: proxy.proxy.blobs.in_use())
    try:
        three = await pull(proxy, "three")
        assert cached(proxy, one + two + three) == [True, False, True]
    finally:
        done.set()
    status, body, short = await reading
    assert (status, len(body), short) == (200, 16 * MiB, False)


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
