"""Bytes that rot on disk after they were verified are never served."""

from __future__ import annotations

import json

import pytest_twisted
from proxyharness import until
from twisted.internet import reactor

from registryproxy.cache.scrub import Scrubber


def flip(path) -> bytes:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    return bytes(data)


def quarantined(proxy) -> set[bytes]:
    folder = proxy.cache_dir / "quarantine"
    return {p.read_bytes() for p in folder.iterdir()} if folder.exists() else set()


@pytest_twisted.ensureDeferred
async def test_a_rotten_manifest_is_fetched_again(fake_registry, make_proxy):
    digest, body = fake_registry.add_image("library/app", "1", [b"layer"])
    proxy = await make_proxy(fake_registry.url)
    assert (await proxy.get("/v2/app/manifests/1")).header("X-Cache") == "MISS"
    for path in ("/v2/app/manifests/1", f"/v2/app/manifests/{digest}"):
        rotten = flip(proxy.blob_path(digest))
        reply = await proxy.get(path)
        assert (reply.code, reply.body, reply.header("X-Cache")) == (200, body, "MISS")
        assert rotten in quarantined(proxy)
        assert proxy.blob_path(digest).read_bytes() == body
    assert (await proxy.get("/v2/app/manifests/1")).header("X-Cache") == "HIT"


@pytest_twisted.ensureDeferred
async def test_a_blob_is_hashed_again_on_its_first_read_after_a_restart(
    fake_registry, make_proxy, tmp_path
):
    _, body = fake_registry.add_image("library/app", "1", [b"layer that will rot"])
    layer = json.loads(body)["layers"][0]["digest"]
    cache = tmp_path / "cache"
    first = await make_proxy(fake_registry.url, cache_dir=cache)
    await first.get(f"/v2/app/blobs/{layer}")
    await first.stop()
    rotten = flip(first.blob_path(layer))

    again = await make_proxy(fake_registry.url, cache_dir=cache, cache={"scrub_rate": 0})
    reply = await again.get(f"/v2/app/blobs/{layer}")
    assert (reply.code, reply.body, reply.header("X-Cache")) == (
        200,
        b"layer that will rot",
        "MISS",
    )
    assert rotten in quarantined(again)
    assert fake_registry.count("GET", f"/blobs/{layer}") == 2
    # fetched and verified again: a hit now, not hashed again
    reply = await again.get(f"/v2/app/blobs/{layer}")
    assert (reply.code, reply.header("X-Cache")) == (200, "HIT")


@pytest_twisted.ensureDeferred
async def test_a_blob_whose_check_is_due_is_hashed_before_it_is_served(fake_registry, make_proxy):
    _, body = fake_registry.add_image("library/app", "1", [b"a layer"])
    layer = json.loads(body)["layers"][0]["digest"]
    proxy = await make_proxy(fake_registry.url, cache={"verify_after": 0})
    await proxy.get(f"/v2/app/blobs/{layer}")
    reply = await proxy.get(f"/v2/app/blobs/{layer}")
    assert (reply.header("X-Cache"), reply.body) == ("HIT", b"a layer")
    flip(proxy.blob_path(layer))
    for method in ("HEAD", "GET"):
        reply = await proxy.request(method, f"/v2/app/blobs/{layer}", {})
        assert reply.code == 200
        assert reply.header("X-Cache") == "MISS"
    assert reply.body == b"a layer"


@pytest_twisted.ensureDeferred
async def test_the_scrub_finds_rot_in_blobs_nobody_reads(fake_registry, make_proxy, tmp_path):
    _, body = fake_registry.add_image("library/app", "1", [b"good layer", b"bad layer"])
    good, bad = (d["digest"] for d in json.loads(body)["layers"])
    cache = tmp_path / "cache"
    first = await make_proxy(fake_registry.url, cache_dir=cache)
    for layer in (good, bad):
        await first.get(f"/v2/app/blobs/{layer}")
    await first.stop()
    rotten = flip(first.blob_path(bad))

    again = await make_proxy(fake_registry.url, cache_dir=cache)
    scrub = Scrubber(again.proxy.verifier, again.proxy.access, reactor, 50 * 1024 * 1024)
    scrub.startService()
    try:
        await until(lambda: scrub.rotten == 1 and scrub.scrubbed == 2, timeout=10)
    finally:
        scrub.stopService()
    assert rotten in quarantined(again)
    assert not again.blob_path(bad).exists()
    assert again.blob_path(good).exists()
    verifier = again.proxy.verifier
    assert not verifier.due(good)
    # the rotten layer is fetched again on its next pull
    reply = await again.get(f"/v2/app/blobs/{bad}")
    assert (reply.body, reply.header("X-Cache")) == (b"bad layer", "MISS")


@pytest_twisted.ensureDeferred
async def test_a_client_does_not_wait_for_the_scrubs_pace(fake_registry, make_proxy, tmp_path):
    """The scrub hashes slowly; a client asking for the same blob meanwhile
    lifts it to full speed rather than waiting at 64 KiB a second."""
    layer_bytes = b"z" * (3 * 1024 * 1024)
    _, body = fake_registry.add_image("library/app", "1", [layer_bytes])
    layer = json.loads(body)["layers"][0]["digest"]
    cache = tmp_path / "cache"
    first = await make_proxy(fake_registry.url, cache_dir=cache)
    await first.get(f"/v2/app/blobs/{layer}")
    await first.stop()

    again = await make_proxy(fake_registry.url, cache_dir=cache)
    scrub = Scrubber(again.proxy.verifier, again.proxy.access, reactor, 64 * 1024)
    scrub.startService()
    try:
        await until(lambda: bool(again.proxy.verifier._throttles), timeout=5)
        started = reactor.seconds()
        reply = await again.get(f"/v2/app/blobs/{layer}")
        assert (reply.code, reply.header("X-Cache")) == (200, "HIT")
        assert reply.body == layer_bytes
        assert reactor.seconds() - started < 10  # 48 s at the scrub's pace
    finally:
        scrub.stopService()


def test_the_checks_remembered_are_bounded():
    from twisted.internet.task import Clock

    from registryproxy.cache.scrub import Verifier

    verifier = Verifier(None, None, Clock(), None, None, remember=3)  # type: ignore[arg-type]
    for n in range(5):
        verifier.mark(f"sha256:{n:064x}")
    assert [verifier.due(f"sha256:{n:064x}") for n in range(5)] == [True, True, False, False, False]
