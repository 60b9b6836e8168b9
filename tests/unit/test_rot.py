"""Bytes that rot on disk after they were verified are never served."""

from __future__ import annotations

import json
import socket
from typing import Any

import pytest
import pytest_twisted
from proxyharness import partial_get, settle, until
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread

from registryproxy.cache.scrub import Scrubber


def flip(path) -> bytes:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    return bytes(data)


def quarantined(proxy) -> set[bytes]:
    folder = proxy.cache_dir / "quarantine"
    return {p.read_bytes() for p in folder.iterdir()} if folder.exists() else set()


async def cached_then_stopped(fake_registry, make_proxy, cache, layers: list[bytes]):
    """A first regproxy on *cache* that pulled an image of *layers* and
    stopped: (that proxy, for its blob paths; the layers' digests)."""
    _, body = fake_registry.add_image("library/app", "1", layers)
    digests = [d["digest"] for d in json.loads(body)["layers"]]
    first = await make_proxy(fake_registry.url, cache_dir=cache)
    for digest in digests:
        await first.get(f"/v2/app/blobs/{digest}")
    await first.stop()
    return first, digests


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
    """It is sent while hashed; a rotten one's reader is cut off before the
    last byte (never served whole), and the next try fetches it again."""
    cache = tmp_path / "cache"
    first, (layer,) = await cached_then_stopped(
        fake_registry, make_proxy, cache, [b"layer that will rot"]
    )
    rotten = flip(first.blob_path(layer))

    again = await make_proxy(fake_registry.url, cache_dir=cache, cache={"scrub_rate": 0})
    status, got, short = await deferToThread(partial_get, again.url, f"/v2/app/blobs/{layer}")
    assert (status, short) == (200, True)
    assert len(got) < len(rotten) and rotten.startswith(got)
    await until(lambda: rotten in quarantined(again))
    reply = await again.get(f"/v2/app/blobs/{layer}")
    assert (reply.code, reply.body, reply.header("X-Cache")) == (
        200,
        b"layer that will rot",
        "MISS",
    )
    assert fake_registry.count("GET", f"/blobs/{layer}") == 2
    # fetched and verified again: a hit now, not hashed again
    reply = await again.get(f"/v2/app/blobs/{layer}")
    assert (reply.code, reply.header("X-Cache")) == (200, "HIT")


def _read(sock: socket.socket, want: int) -> tuple[bytes, bytes]:
    """The response head and *want* bytes of its body (fewer if it ends)."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    while len(body) < want:
        more = sock.recv(want - len(body))
        if not more:
            break
        body += more
    return head, body


def _more(sock: socket.socket, seconds: float) -> bytes | None:
    """What comes within *seconds*: None for nothing, b"" for the end."""
    sock.settimeout(seconds)
    try:
        return sock.recv(65536)
    except TimeoutError:
        return None
    except ConnectionResetError:
        return b""


@pytest.mark.parametrize("sendfile", [True, False])
@pytest.mark.parametrize("sound", [True, False])
@pytest_twisted.ensureDeferred
async def test_all_but_the_last_byte_goes_out_while_the_hash_runs(
    fake_registry, make_proxy, tmp_path, sendfile, sound
):
    layer_bytes = bytes(range(256)) * 8192  # 2 MiB
    cache = tmp_path / "cache"
    _, (layer,) = await cached_then_stopped(fake_registry, make_proxy, cache, [layer_bytes])
    again = await make_proxy(
        fake_registry.url,
        cache_dir=cache,
        cache={"scrub_rate": 0},
        top={"proxy": {"sendfile": sendfile}},
    )
    verdict: Deferred[bool] = Deferred()

    async def held(digest: Any, fd: int) -> bool:
        return await verdict

    again.proxy.blobs.sound = held  # the hash, as slow as the test wants
    port = int(again.url.rsplit(":", 1)[1])
    sock = socket.create_connection(("127.0.0.1", port))
    try:
        sock.sendall(f"GET /v2/app/blobs/{layer} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        head, got = await deferToThread(_read, sock, len(layer_bytes) - 1)
        assert head.startswith(b"HTTP/1.1 200") and b"X-Cache: HIT" in head
        assert got == layer_bytes[:-1]
        assert await deferToThread(_more, sock, 0.2) is None  # the last byte waits
        verdict.callback(sound)
        rest = await deferToThread(_more, sock, 10)
        assert rest == (layer_bytes[-1:] if sound else b"")
    finally:
        sock.close()


@pytest_twisted.ensureDeferred
async def test_a_blob_whose_check_is_due_is_hashed_again(fake_registry, make_proxy):
    _, body = fake_registry.add_image("library/app", "1", [b"a layer"])
    layer = json.loads(body)["layers"][0]["digest"]
    proxy = await make_proxy(fake_registry.url, cache={"verify_after": 0})
    await proxy.get(f"/v2/app/blobs/{layer}")
    reply = await proxy.get(f"/v2/app/blobs/{layer}")
    assert (reply.header("X-Cache"), reply.body) == ("HIT", b"a layer")
    rotten = flip(proxy.blob_path(layer))
    # a HEAD is answered at once; the hash it starts finds the rot
    reply = await proxy.request("HEAD", f"/v2/app/blobs/{layer}", {})
    assert (reply.code, reply.header("X-Cache")) == (200, "HIT")
    await until(lambda: rotten in quarantined(proxy))
    reply = await proxy.get(f"/v2/app/blobs/{layer}")
    assert (reply.code, reply.header("X-Cache"), reply.body) == (200, "MISS", b"a layer")


@pytest_twisted.ensureDeferred
async def test_the_scrub_finds_rot_in_blobs_nobody_reads(fake_registry, make_proxy, tmp_path):
    cache = tmp_path / "cache"
    first, (good, bad) = await cached_then_stopped(
        fake_registry, make_proxy, cache, [b"good layer", b"bad layer"]
    )
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
    cache = tmp_path / "cache"
    _, (layer,) = await cached_then_stopped(fake_registry, make_proxy, cache, [layer_bytes])

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


@pytest_twisted.ensureDeferred
async def test_the_scrub_counts_a_small_file_as_file_cost(fake_registry, make_proxy, tmp_path):
    """Small blobs are walked at FILE_COST bytes each, not thousands a second."""
    from twisted.internet.task import Clock

    from registryproxy.cache.scrub import FILE_COST

    cache = tmp_path / "cache"
    await cached_then_stopped(fake_registry, make_proxy, cache, [b"one", b"two", b"three"])

    again = await make_proxy(fake_registry.url, cache_dir=cache, cache={"scrub_rate": 0})
    clock = Clock()  # the scrub's pauses; its hashes run in real threads
    scrub = Scrubber(again.proxy.verifier, again.proxy.access, clock, FILE_COST)  # 1 s a file
    scrub.startService()
    try:
        await until(lambda: scrub.scrubbed == 1)
        await settle(0.3)
        assert scrub.scrubbed == 1  # resting for the rest of its second
        clock.advance(1.0)
        await until(lambda: scrub.scrubbed == 2)
        await settle(0.3)
        assert scrub.scrubbed == 2
    finally:
        scrub.stopService()
