"""Blob downloads that go wrong upstream leave nothing cached and fail the client loudly."""

from __future__ import annotations

import os
import sqlite3

import pytest_twisted
from fakeregistry import Fault
from proxyharness import ProxyClock, assert_nothing_kept, get_in_thread, until
from twisted.internet.defer import gatherResults

SIZE = 2 * 1024 * 1024 + 3


async def check_fault_then_recovery(fake_registry, make_proxy, fault, clock=None, **upstream):
    """*clock*: regproxy's, advanced past its read_timeout once bytes came."""
    data = os.urandom(SIZE)
    digest = fake_registry.add_blob(data)
    fake_registry.blob_faults[digest] = fault
    proxy = await make_proxy(fake_registry.url, clock=clock, **upstream)
    path = f"/v2/library/x/blobs/{digest}"
    first = get_in_thread(proxy, path)
    if clock is not None:
        fetching = proxy.proxy.blobs.fetching
        await until(lambda: any(fetch["written"] > 0 for fetch in fetching()))
        clock.advance(upstream["read_timeout"])
    status, body, short = await first
    # the client's download fails; it never sees the whole (or a wrong) body
    assert short or status != 200
    assert len(body) < SIZE
    await until(lambda: not list((proxy.cache_dir / "tmp").iterdir()))
    assert_nothing_kept(proxy, digest)
    # the fault was one-off: the next request fetches again and succeeds
    status, body, short = await get_in_thread(proxy, path)
    assert (status, short) == (200, False)
    assert body == data
    assert proxy.blob_path(digest).read_bytes() == data
    return proxy


@pytest_twisted.ensureDeferred
async def test_wrong_bytes_are_never_served_whole(fake_registry, make_proxy):
    await check_fault_then_recovery(fake_registry, make_proxy, Fault.wrong_bytes(times=1))


@pytest_twisted.ensureDeferred
async def test_connection_cut_mid_blob(fake_registry, make_proxy):
    await check_fault_then_recovery(fake_registry, make_proxy, Fault.truncate(SIZE // 2, times=1))


@pytest_twisted.ensureDeferred
async def test_clean_close_before_the_end(fake_registry, make_proxy):
    fault = Fault.truncate(SIZE // 3, reset=False, times=1)
    await check_fault_then_recovery(fake_registry, make_proxy, fault)


@pytest_twisted.ensureDeferred
async def test_more_bytes_than_the_blob(fake_registry, make_proxy):
    await check_fault_then_recovery(fake_registry, make_proxy, Fault.extra_bytes(100, times=1))


@pytest_twisted.ensureDeferred
async def test_stalled_upstream_is_abandoned(fake_registry, make_proxy):
    """A silent upstream is given up after read_timeout; the client saw the
    bytes that did arrive, as they arrived, then a failed download."""
    await check_fault_then_recovery(
        fake_registry,
        make_proxy,
        Fault.stall(after=SIZE // 2, times=1),
        clock=ProxyClock(),
        read_timeout=30,
    )


@pytest_twisted.ensureDeferred
async def test_a_trickling_upstream_is_abandoned(fake_registry, make_proxy):
    """Never silent, but under min_rate (10 KiB/s by default) over a
    read_timeout: the client's download fails, nothing is kept."""
    # 5 KiB/s, in steps a tenth of the read_timeout apart
    fault = Fault.slow(chunk=256, delay=0.05, times=1)
    await check_fault_then_recovery(fake_registry, make_proxy, fault, read_timeout=0.5)


@pytest_twisted.ensureDeferred
async def test_bytes_flow_before_the_download_ends(fake_registry, make_proxy):
    data = os.urandom(SIZE)
    digest = fake_registry.add_blob(data)
    fake_registry.blob_faults[digest] = Fault.stall(after=SIZE // 2, times=1)
    proxy = await make_proxy(fake_registry.url, read_timeout=30)
    # upstream sent half and went silent; the client still gets that half now
    status, body, _ = await get_in_thread(proxy, f"/v2/library/x/blobs/{digest}", first=SIZE // 4)
    assert status == 200
    assert body == data[: SIZE // 4]


@pytest_twisted.ensureDeferred
async def test_concurrent_clients_share_one_download(fake_registry, make_proxy):
    data = os.urandom(SIZE)
    digest = fake_registry.add_blob(data)
    fake_registry.blob_faults[digest] = Fault.slow(chunk=256 * 1024, delay=0.02)
    proxy = await make_proxy(fake_registry.url)
    path = f"/v2/library/x/blobs/{digest}"
    results = await gatherResults([get_in_thread(proxy, path) for _ in range(6)])
    assert [(status, short) for status, _, short in results] == [(200, False)] * 6
    assert all(body == data for _, body, _ in results)
    assert fake_registry.count("GET", "/blobs/") == 1
    assert proxy.blob_path(digest).read_bytes() == data


@pytest_twisted.ensureDeferred
async def test_client_hanging_up_does_not_cancel_the_download(fake_registry, make_proxy):
    data = os.urandom(SIZE)
    digest = fake_registry.add_blob(data)
    fake_registry.blob_faults[digest] = Fault.slow(chunk=256 * 1024, delay=0.02)
    proxy = await make_proxy(fake_registry.url)
    status, body, _ = await get_in_thread(proxy, f"/v2/library/x/blobs/{digest}", first=1000)
    assert (status, body) == (200, data[:1000])
    await until(lambda: proxy.blob_path(digest).exists())
    assert proxy.blob_path(digest).read_bytes() == data
    assert fake_registry.count("GET", "/blobs/") == 1


@pytest_twisted.ensureDeferred
async def test_range_on_a_blob_still_downloading(fake_registry, make_proxy):
    data = os.urandom(SIZE)
    digest = fake_registry.add_blob(data)
    fake_registry.blob_faults[digest] = Fault.slow(chunk=256 * 1024, delay=0.02)
    proxy = await make_proxy(fake_registry.url)
    path = f"/v2/library/x/blobs/{digest}"
    first = get_in_thread(proxy, path)
    await until(lambda: fake_registry.count("GET", "/blobs/") == 1)
    reply = await proxy.get(path, Range=["bytes=1000-1999"])
    assert reply.code == 206
    assert reply.body == data[1000:2000]
    status, body, short = await first
    assert (status, body, short) == (200, data, False)
    assert fake_registry.count("GET", "/blobs/") == 1


@pytest_twisted.ensureDeferred
async def test_restart_keeps_cache_and_drops_interrupted_writes(
    fake_registry, make_proxy, tmp_path
):
    data = os.urandom(5000)
    digest = fake_registry.add_blob(data)
    cache = tmp_path / "cache"
    first = await make_proxy(fake_registry.url, cache_dir=cache)
    await first.get(f"/v2/library/x/blobs/{digest}")
    await first.stop()
    leftover = cache / "tmp" / "deadbeef.partial"
    leftover.write_bytes(b"half a blob")
    second = await make_proxy(fake_registry.url, cache_dir=cache)
    assert not leftover.exists()
    reply = await second.get(f"/v2/library/x/blobs/{digest}")
    assert (reply.body, reply.header("X-Cache")) == (data, "HIT")
    assert fake_registry.count("GET", "/blobs/") == 1


@pytest_twisted.ensureDeferred
async def test_an_index_write_failing_after_the_store_keeps_no_orphan(fake_registry, make_proxy):
    from twisted.logger import LogLevel, formatEvent, globalLogPublisher

    data = os.urandom(SIZE)
    digest = fake_registry.add_blob(data)
    fake_registry.blob_faults[digest] = Fault.slow(chunk=256 * 1024, delay=0.02)
    proxy = await make_proxy(fake_registry.url)
    index = proxy.proxy.index  # what the cache reaches through its seam

    def locked(*args):
        raise sqlite3.OperationalError("database is locked")

    index.put_blob = locked
    events: list = []
    globalLogPublisher.addObserver(events.append)
    try:
        path = f"/v2/library/x/blobs/{digest}"
        replies = await gatherResults([get_in_thread(proxy, path), get_in_thread(proxy, path)])
        await until(lambda: not os.listdir(proxy.cache_dir / "tmp"))
    finally:
        globalLogPublisher.removeObserver(events.append)
    # the clients following the download still get every byte
    assert replies == [(200, data, False)] * 2
    # nothing is left on disk outside the index and the budget, nor is the
    # repository linked to bytes that are not kept
    assert_nothing_kept(proxy, digest)
    assert index.blob_known("docker.io", "library/x", digest) is None
    assert not index.has_blob("docker.io", "library/x", digest)
    errors = [formatEvent(e) for e in events if e.get("log_level") == LogLevel.error]
    assert any(digest in text and "database is locked" in text for text in errors), errors
    # a prefetch is told: its bytes were not kept
    fake_registry.add_image("library/y", "1", [os.urandom(1024)])
    control = proxy.proxy.control
    control.prefetch("docker.io", "library/y", "1", None)
    await until(lambda: control.prefetch_jobs()[0].state != "running")
    (job,) = control.prefetch_jobs()
    assert (job.state, job.error) == ("failed", "cannot write the cache index")
    # the next request fetches it again (and stores it, the index working again)
    del index.put_blob
    reply = await proxy.get(f"/v2/library/x/blobs/{digest}")
    assert (reply.code, reply.body == data) == (200, True)
    await until(lambda: proxy.blob_path(digest).exists())
    assert proxy.blob_path(digest).read_bytes() == data
    assert fake_registry.count("GET", f"/blobs/{digest}") == 2
