"""Blob downloads when the cache's disk has no room for them: they go on
through memory for their clients, keeping nothing; running downloads claim
the disk only as their bytes come; a disk filling up under a download evicts
to go on, in few steps and off the reactor thread."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import sqlite3
import threading

import pytest
import pytest_twisted
from fakeregistry import Fault
from proxyharness import (
    ProxyClock,
    advance_until,
    assert_nothing_kept,
    get_in_thread,
    settle,
    until,
)
from twisted.internet.defer import gatherResults
from twisted.internet.threads import deferToThread

from registryproxy.cache import blobs
from registryproxy.cache import store as store_module
from registryproxy.cache.blobs import MemoryRelay
from registryproxy.cache.index import Index
from registryproxy.names import Digest

SIZE = 2 * 1024 * 1024 + 3


@pytest_twisted.ensureDeferred
async def test_no_room_passes_the_blob_through_uncached(fake_registry, make_proxy):
    data = os.urandom(20 * 1024 * 1024 + 1)
    digest = fake_registry.add_blob(data)
    proxy = await make_proxy(fake_registry.url)
    proxy.proxy.store.room = lambda: 1000  # the disk is (nearly) full
    status, body, short = await get_in_thread(proxy, f"/v2/library/x/blobs/{digest}")
    assert (status, short) == (200, False)
    assert body == data
    assert_nothing_kept(proxy, digest)
    # a second client gets it again from upstream, intact
    status, body, short = await get_in_thread(proxy, f"/v2/library/x/blobs/{digest}")
    assert (status, body) == (200, data)
    assert fake_registry.count("GET", "/blobs/") == 2


@pytest_twisted.ensureDeferred
async def test_running_downloads_keep_the_room_they_need(fake_registry, make_proxy):
    # Each blob fits in the free space, both together do not: the second
    # download, started while the first runs, must not count the first's
    # space as free (both would then fail half-way with ENOSPC).
    blobs = [os.urandom(1024 * 1024) for _ in range(2)]
    digests = [fake_registry.add_blob(data) for data in blobs]
    for digest in digests:
        fake_registry.blob_faults[digest] = Fault.slow(chunk=64 * 1024, delay=0.02)
    proxy = await make_proxy(fake_registry.url)
    proxy.proxy.store.room = lambda: 1536 * 1024
    replies = await gatherResults(
        [get_in_thread(proxy, f"/v2/library/x/blobs/{d}") for d in digests]
    )
    assert [(status, body) for status, body, _ in replies] == [(200, data) for data in blobs]
    await until(lambda: not os.listdir(proxy.cache_dir / "tmp"))
    assert sorted(proxy.blob_path(d).exists() for d in digests) == [False, True]


class Written:
    """The most bytes any file the store began held (wraps ``store.begin``)."""

    def __init__(self, proxy) -> None:
        self.most = 0
        store = proxy.proxy.store
        begin = store.begin

        def counted(digest, size):
            writer = begin(digest, size)
            write = writer._file.write

            def write_counted(data):
                written = write(data)
                self.most = max(self.most, writer._file.tell())
                return written

            writer._file = _Wrapped(writer._file, write=write_counted)
            return writer

        store.begin = counted


class _Wrapped:
    def __init__(self, inner, **overrides) -> None:
        self._inner = inner
        self.__dict__.update(overrides)

    def __getattr__(self, name):
        return getattr(self._inner, name)


@pytest_twisted.ensureDeferred
async def test_a_body_of_no_announced_size_takes_no_more_disk_than_was_free(
    fake_registry, make_proxy
):
    """A chunked body may go on for ever: past the room there was when it
    started, it goes on through memory for its client, stored nowhere, and
    nothing is evicted for it."""
    data = os.urandom(3 * 1024 * 1024)
    digest = fake_registry.add_blob(data)
    fake_registry.blob_faults[digest] = Fault.unsized(chunk=128 * 1024)
    proxy = await make_proxy(fake_registry.url)
    written = Written(proxy)
    proxy.proxy.store.room = lambda: 1024 * 1024
    evicting: list[int] = []
    proxy.proxy.blobs._make_room = lambda needed, gave_up: evicting.append(needed)
    assert await get_in_thread(proxy, f"/v2/library/x/blobs/{digest}") == (200, data, False)
    assert 0 < written.most <= 1024 * 1024
    assert evicting == []
    await until(lambda: not os.listdir(proxy.cache_dir / "tmp"))
    assert_nothing_kept(proxy, digest)


@pytest_twisted.ensureDeferred
async def test_a_slow_download_claims_only_the_disk_it_can_fill(
    fake_registry, make_proxy, monkeypatch
):
    """An upstream that announces a big blob and sends it slowly keeps its
    claim on the disk a moment, then only what its speed can fill: another
    blob that fits beside that is stored, not passed through."""
    monkeypatch.setattr(blobs, "CLAIM_GRACE", 0.2)
    monkeypatch.setattr(blobs, "CLAIM_SECONDS", 1.0)
    slow, fast = os.urandom(512 * 1024), os.urandom(512 * 1024)
    slow_digest, fast_digest = fake_registry.add_blob(slow), fake_registry.add_blob(fast)
    # 16 KiB every 0.1 s: about 160 KiB a second
    trickle = fake_registry.blob_faults[slow_digest] = Fault.slow(chunk=16 * 1024, delay=0.1)
    proxy = await make_proxy(fake_registry.url)
    # room for the fast one beside the slow one's claim after the grace
    # (at most 192 KiB), not beside all it announced
    proxy.proxy.store.room = lambda: 768 * 1024
    slowly = get_in_thread(proxy, f"/v2/library/x/blobs/{slow_digest}")
    await settle(0.5)
    assert await get_in_thread(proxy, f"/v2/library/x/blobs/{fast_digest}") == (200, fast, False)
    await until(lambda: proxy.blob_path(fast_digest).exists())
    # all along beside the slow one, which has sent a fraction of its bytes
    assert proxy.proxy.blobs.active(Digest.parse(slow_digest)) is not None
    trickle.delay = 0  # the rest at once
    assert await slowly == (200, slow, False)


class SharedDisk:
    """The cache's disk, *capacity* bytes, which something else fills up
    behind regproxy's back: until a write finds it full, ``room()`` reports
    plenty; from then on the truth, and writes past it fail with ENOSPC."""

    def __init__(self, proxy, capacity: int) -> None:
        self._root = proxy.cache_dir
        self._capacity = capacity
        self.full = False
        store = proxy.proxy.store
        begin = store.begin

        def begin_here(digest, size):
            writer = begin(digest, size)
            writer._file = _OnDisk(writer._file, self)
            return writer

        store.begin = begin_here
        store.room = lambda: self.free() if self.full else 10**12

    def free(self) -> int:
        files = [*(self._root / "blobs").rglob("*"), *(self._root / "tmp").iterdir()]
        return self._capacity - sum(f.stat().st_size for f in files if f.is_file())


class _OnDisk:
    def __init__(self, file, disk: SharedDisk) -> None:
        self._file = file
        self._disk = disk

    def write(self, data) -> int:
        free = self._disk.free()
        if free <= 0:
            self._disk.full = True
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self._file.write(data[:free])

    def __getattr__(self, name):
        return getattr(self._file, name)


@pytest.mark.parametrize("sendfile", [True, False])
@pytest_twisted.ensureDeferred
async def test_disk_filling_up_mid_download_still_serves_every_byte(
    fake_registry, make_proxy, sendfile
):
    data = os.urandom(4 * 1024 * 1024)
    digest = fake_registry.add_blob(data)
    trickle = fake_registry.blob_faults[digest] = Fault.slow(chunk=256 * 1024, delay=0.02)
    proxy = await make_proxy(fake_registry.url, top={"proxy": {"sendfile": sendfile}})
    disk = SharedDisk(proxy, capacity=1024 * 1024)  # nothing cached to evict
    path = f"/v2/library/x/blobs/{digest}"
    both = gatherResults([get_in_thread(proxy, path), get_in_thread(proxy, path)])
    await followed(proxy, 2)
    trickle.delay = 0  # the rest at once
    replies = await both
    assert disk.full
    assert [(status, body == data, short) for status, body, short in replies] == [
        (200, True, False)
    ] * 2
    await until(lambda: not os.listdir(proxy.cache_dir / "tmp"))
    assert_nothing_kept(proxy, digest)
    assert fake_registry.count("GET", "/blobs/") == 1


async def followed(proxy, clients):
    """Wait until a download has *clients* readers following it."""
    fetching = proxy.proxy.blobs.fetching
    await until(lambda: any(fetch["clients"] >= clients for fetch in fetching()))


async def relayed_to_two(fake_registry, make_proxy, monkeypatch, sendfile, rest):
    """A download the disk fills up under, followed by a client that reads
    one byte and lags, and one that reads as fast as it can.  Once the relay
    holds the upstream for the laggard, that hangs up, or (*rest*) reads on
    once the other has had every byte.  (the data, what the laggard got)"""
    monkeypatch.setattr(MemoryRelay, "HIGH", 512 * 1024)
    monkeypatch.setattr(MemoryRelay, "LOW", 128 * 1024)
    data = os.urandom(8 * 1024 * 1024)
    digest = fake_registry.add_blob(data)
    trickle = fake_registry.blob_faults[digest] = Fault.slow(chunk=256 * 1024, delay=0.02)
    clock = ProxyClock()
    proxy = await make_proxy(
        fake_registry.url, read_timeout=1, top={"proxy": {"sendfile": sendfile}}, clock=clock
    )
    disk = SharedDisk(proxy, capacity=1024 * 1024)
    path = f"/v2/library/x/blobs/{digest}"
    go_on = threading.Event()
    try:
        lagging = get_in_thread(proxy, path, first=1, lag=go_on, rest=rest)
        fastest = get_in_thread(proxy, path)
        await followed(proxy, 2)
        trickle.delay = 0  # the rest as fast as the relay takes it
        downloads = proxy.proxy.blobs._downloads
        await until(lambda: any(fetch.holding_upstream for fetch in downloads))
        if not rest:
            go_on.set()
        else:  # once the other has taken all there is, the read_timeout passes
            fetch = next(fetch for fetch in downloads if fetch.holding_upstream)
            await until(lambda: max(fetch._listeners.values()) == fetch.written)
            clock.advance(1)
        # the other gets every byte: a laggard that holds up the relay
        # (*rest*) is cut off after read_timeout, not it
        fast = await fastest
    finally:
        go_on.set()
    assert disk.full
    assert fast == (200, data, False)
    lagged = await lagging
    await until(lambda: not os.listdir(proxy.cache_dir / "tmp"))
    assert_nothing_kept(proxy, digest)
    return data, lagged


@pytest.mark.parametrize("sendfile", [True, False])
@pytest_twisted.ensureDeferred
async def test_a_client_leaving_a_relay_lets_the_others_go_on(
    fake_registry, make_proxy, monkeypatch, sendfile
):
    await relayed_to_two(fake_registry, make_proxy, monkeypatch, sendfile, rest=False)


@pytest.mark.parametrize("sendfile", [True, False])
@pytest_twisted.ensureDeferred
async def test_a_client_holding_up_a_relay_is_cut_off_not_the_others(
    fake_registry, make_proxy, monkeypatch, sendfile
):
    data, (status, body, short) = await relayed_to_two(
        fake_registry, make_proxy, monkeypatch, sendfile, rest=True
    )
    assert (status, short) == (200, True)
    assert len(body) < len(data)


@pytest_twisted.ensureDeferred
async def test_eviction_failing_on_a_full_disk_still_serves_every_byte(fake_registry, make_proxy):
    # the index is on the full disk too: its writes fail, and so does eviction
    proxy, _, data, digest = await old_image_on_shared_disk(fake_registry, make_proxy, 1.5)

    def index_full(needed, gave_up):
        raise sqlite3.OperationalError("database or disk is full")

    proxy.proxy.blobs._make_room = index_full
    status, body, short = await get_in_thread(proxy, f"/v2/library/x/blobs/{digest}")
    assert (status, body == data, short) == (200, True, False)
    await until(lambda: not os.listdir(proxy.cache_dir / "tmp"))
    assert_nothing_kept(proxy, digest)


@pytest_twisted.ensureDeferred
async def test_a_prefetch_the_disk_fills_up_under_fails_at_once(fake_registry, make_proxy):
    layer = os.urandom(4 * 1024 * 1024)
    fake_registry.add_image("library/big", "1", [layer])
    trickle = fake_registry.blob_faults["*"] = Fault.slow(chunk=256 * 1024, delay=0.05)
    proxy = await make_proxy(fake_registry.url)
    SharedDisk(proxy, capacity=1024 * 1024)
    control = proxy.proxy.control
    control.prefetch("docker.io", "library/big", "1", None)
    digest = "sha256:" + hashlib.sha256(layer).hexdigest()
    await until(lambda: proxy.proxy.blobs.in_flight > 0)
    # a client pulls the layer meanwhile: the download goes on for it alone
    pulling = get_in_thread(proxy, f"/v2/big/blobs/{digest}")
    await until(lambda: control.prefetch_jobs()[0].state != "running")
    assert not pulling.called  # the prefetch failed while the download goes on
    trickle.delay = 0  # the rest at once
    status, body, short = await pulling
    (job,) = control.prefetch_jobs()
    assert (job.state, job.error) == ("failed", "no room in the cache")
    assert (status, body == layer, short) == (200, True, False)
    await until(lambda: not os.listdir(proxy.cache_dir / "tmp"))
    assert proxy.proxy.blobs.in_flight == 0


async def old_image_on_shared_disk(fake_registry, make_proxy, capacity_mib):
    """A proxy with library/old:1 cached (a 1 MiB layer: something to evict)
    on a SharedDisk, and a 2 MiB blob upstream: (proxy, old layer, data, digest)."""
    fake_registry.add_image("library/old", "1", [os.urandom(1024 * 1024)])
    data = os.urandom(2 * 1024 * 1024)
    digest = fake_registry.add_blob(data)
    proxy = await make_proxy(fake_registry.url)
    manifest = json.loads((await proxy.get("/v2/old/manifests/1")).body)
    old = manifest["layers"][0]["digest"]
    assert (await proxy.get(f"/v2/old/blobs/{old}")).code == 200
    await settle()
    SharedDisk(proxy, capacity=int(capacity_mib * 1024 * 1024))
    return proxy, old, data, digest


@pytest_twisted.ensureDeferred
async def test_disk_filling_up_mid_download_evicts_to_go_on(fake_registry, make_proxy):
    proxy, old, data, digest = await old_image_on_shared_disk(fake_registry, make_proxy, 2.5)
    status, body, short = await get_in_thread(proxy, f"/v2/library/x/blobs/{digest}")
    assert (status, body == data, short) == (200, True, False)
    await until(lambda: not proxy.blob_path(old).exists())
    reply = await proxy.get(f"/v2/library/x/blobs/{digest}")
    assert (reply.header("X-Cache"), reply.body == data) == ("HIT", True)


@pytest_twisted.ensureDeferred
async def test_no_room_still_never_serves_wrong_bytes_whole(fake_registry, make_proxy):
    data = os.urandom(SIZE)
    digest = fake_registry.add_blob(data)
    fake_registry.blob_faults[digest] = Fault.wrong_bytes()
    proxy = await make_proxy(fake_registry.url)
    proxy.proxy.store.room = lambda: 0
    status, body, short = await get_in_thread(proxy, f"/v2/library/x/blobs/{digest}")
    assert short or status != 200
    assert len(body) < SIZE


@pytest_twisted.ensureDeferred
async def test_blob_larger_than_the_budget_is_not_cached(fake_registry, make_proxy):
    data = os.urandom(SIZE)
    digest = fake_registry.add_blob(data)
    proxy = await make_proxy(fake_registry.url, cache={"max_size": SIZE // 2})
    status, body, _ = await get_in_thread(proxy, f"/v2/library/x/blobs/{digest}")
    assert (status, body) == (200, data)
    assert_nothing_kept(proxy, digest)


@pytest_twisted.ensureDeferred
async def test_an_upstream_announcing_much_and_sending_nothing_evicts_nothing(
    fake_registry, make_proxy, monkeypatch
):
    """On a full disk a download is given room as its bytes come, never
    for all it announced up front: else an upstream that announces big
    blobs and sends nothing (a hostile one, any registry a client names)
    empties the cache a request at a time."""
    fake_registry.add_image("library/old", "1", [os.urandom(1024 * 1024)])
    data = os.urandom(2 * 1024 * 1024)
    digest = fake_registry.add_blob(data)
    clock = ProxyClock()
    proxy = await make_proxy(fake_registry.url, read_timeout=0.5, clock=clock)
    manifest = json.loads((await proxy.get("/v2/old/manifests/1")).body)
    old = manifest["layers"][0]["digest"]
    assert (await proxy.get(f"/v2/old/blobs/{old}")).code == 200
    await settle()
    disk = SharedDisk(proxy, capacity=int(2.5 * 1024 * 1024))
    disk.full = True  # room() tells the truth from the start: 2 MiB do not fit
    fake_registry.blob_faults[digest] = Fault.stall(after=0, times=1)
    pulling = get_in_thread(proxy, f"/v2/library/x/blobs/{digest}")
    await advance_until(clock, 0.5, lambda: pulling.called)
    status, body, short = await pulling
    assert (status, body, short) == (200, b"", True)
    await settle()
    assert proxy.blob_path(old).exists()  # nothing evicted for bytes that never came
    # the same blob, sent: evicted for as its bytes come (given room, not
    # by writes that found the disk full), and stored
    asks: list[bool] = []  # whether each ask was for a grant (else: the disk was full)
    ask = blobs.BlobFetch._ask
    monkeypatch.setattr(
        blobs.BlobFetch,
        "_ask",
        lambda f, end, raise_cap: asks.append(raise_cap) or ask(f, end, raise_cap),
    )
    status, body, short = await get_in_thread(proxy, f"/v2/library/x/blobs/{digest}")
    assert (status, body == data, short) == (200, True, False)
    await until(lambda: not proxy.blob_path(old).exists() and proxy.blob_path(digest).exists())
    assert proxy.blob_path(digest).read_bytes() == data
    assert asks and all(asks)


@pytest_twisted.ensureDeferred
async def test_an_upstream_announcing_much_and_sending_nothing_keeps_no_disk_from_others(
    fake_registry, make_proxy
):
    """A download claims the disk as its bytes come, from FIRST_CLAIM: one
    whose upstream announced 2 MiB and went silent does not make another
    download, that fits beside what it really sent, evict a cached image."""
    fake_registry.add_image("library/old", "1", [os.urandom(1024 * 1024)])
    stalled, other = os.urandom(2 * 1024 * 1024), os.urandom(1536 * 1024)
    silent, wanted = fake_registry.add_blob(stalled), fake_registry.add_blob(other)
    fake_registry.blob_faults[silent] = Fault.stall(after=0, times=1)
    clock = ProxyClock()
    proxy = await make_proxy(fake_registry.url, read_timeout=1, clock=clock)
    old = json.loads((await proxy.get("/v2/old/manifests/1")).body)["layers"][0]["digest"]
    assert (await proxy.get(f"/v2/old/blobs/{old}")).code == 200
    await settle()
    disk = SharedDisk(proxy, capacity=4 * 1024 * 1024)
    disk.full = True  # room() tells the truth: 3 MiB free
    hanging = get_in_thread(proxy, f"/v2/library/x/blobs/{silent}")
    await until(lambda: proxy.proxy.blobs.active(Digest.parse(silent)) is not None)
    status, body, short = await get_in_thread(proxy, f"/v2/library/x/blobs/{wanted}")
    assert (status, body == other, short) == (200, True, False)
    # the silent one claimed its disk all along (its read_timeout has not passed)
    assert proxy.proxy.blobs.active(Digest.parse(silent)) is not None
    await settle()
    assert proxy.blob_path(wanted).read_bytes() == other
    assert proxy.blob_path(old).exists()
    await advance_until(clock, 1, lambda: hanging.called)
    assert (await hanging)[2] is True  # the silent one is given up, short


async def full_disk_and_held_room(fake_registry, make_proxy, monkeypatch, clock):
    """A cached 1 MiB image on a full 2.5 MiB disk, a 2 MiB blob to fetch,
    and eviction held (at most 10 s) until the test releases it: the
    threads Index.evict ran in, the event that it began, the release."""
    fake_registry.add_image("library/old", "1", [os.urandom(1024 * 1024)])
    data = os.urandom(2 * 1024 * 1024)
    digest = fake_registry.add_blob(data)
    proxy = await make_proxy(fake_registry.url, read_timeout=0.5, clock=clock)
    old = json.loads((await proxy.get("/v2/old/manifests/1")).body)["layers"][0]["digest"]
    assert (await proxy.get(f"/v2/old/blobs/{old}")).code == 200
    await settle()
    disk = SharedDisk(proxy, capacity=int(2.5 * 1024 * 1024))
    disk.full = True
    threads: list[str] = []
    began, release = threading.Event(), threading.Event()
    evict = Index.evict

    def held(self, *args, **kwargs):
        threads.append(threading.current_thread().name)
        began.set()
        release.wait(10)
        return evict(self, *args, **kwargs)

    monkeypatch.setattr(Index, "evict", held)
    return proxy, data, digest, old, threads, began, release


@pytest_twisted.ensureDeferred
async def test_room_for_a_download_is_made_off_the_reactor_thread(
    fake_registry, make_proxy, monkeypatch
):
    """Evicting for a download's bytes on a full disk (10 to 20 ms at
    20,000 images) runs in the index's room thread, its upstream paused:
    meanwhile the reactor answers other clients; then the blob is stored."""
    clock = ProxyClock()
    proxy, data, digest, old, threads, began, release = await full_disk_and_held_room(
        fake_registry, make_proxy, monkeypatch, clock
    )
    pulling = get_in_thread(proxy, f"/v2/library/x/blobs/{digest}")
    try:
        await deferToThread(began.wait, 10)
        fetch = proxy.proxy.blobs.active(Digest.parse(digest))
        assert fetch is not None and fetch.waiting_for_room
        # the reactor answers while the eviction is held
        assert (await proxy.get("/v2/old/manifests/1")).code == 200
        clock.advance(0.7)  # past read_timeout: a paused upstream is not a silent one
        await settle(0.02)
        assert fetch.waiting_for_room and fetch.running
    finally:
        release.set()
    status, body, short = await pulling
    assert (status, body == data, short) == (200, True, False)
    await until(lambda: proxy.blob_path(digest).exists() and not proxy.blob_path(old).exists())
    assert proxy.blob_path(digest).read_bytes() == data
    assert threads and all("regproxy-index-room" in name for name in threads), threads


@pytest_twisted.ensureDeferred
async def test_a_download_waits_for_room_a_while_then_goes_on_through_memory(
    fake_registry, make_proxy, monkeypatch
):
    """Room that takes longer than ROOM_WAIT to make is not waited for: the
    download goes on through memory for its client, keeping nothing."""
    monkeypatch.setattr(blobs, "ROOM_WAIT", 0.3, raising=False)
    proxy, data, digest, old, threads, began, release = await full_disk_and_held_room(
        fake_registry, make_proxy, monkeypatch, None
    )
    try:
        status, body, short = await get_in_thread(proxy, f"/v2/library/x/blobs/{digest}")
    finally:
        release.set()
    assert began.is_set()
    assert (status, body == data, short) == (200, True, False)
    await until(lambda: not os.listdir(proxy.cache_dir / "tmp"))
    assert_nothing_kept(proxy, digest)


@pytest_twisted.ensureDeferred
async def test_a_disk_filling_up_evicts_as_much_as_came_not_all_announced(
    fake_registry, make_proxy
):
    """Something else filled the disk: a download then evicts for what it
    is sent, not for all it announced (an upstream that announces 3 MiB,
    sends 256 KiB and stalls evicted 30 of 40 images of 100 KiB)."""
    images = [os.urandom(100 * 1024) for _ in range(40)]
    for i, layer in enumerate(images):
        fake_registry.add_image(f"library/i{i}", "1", [layer])
    data = os.urandom(3 * 1024 * 1024)
    digest = fake_registry.add_blob(data)
    fake_registry.blob_faults[digest] = Fault.stall(after=256 * 1024, times=1)
    clock = ProxyClock()
    proxy = await make_proxy(fake_registry.url, read_timeout=0.5, clock=clock)
    for i in range(40):
        manifest = json.loads((await proxy.get(f"/v2/i{i}/manifests/1")).body)
        layer = manifest["layers"][0]["digest"]
        assert (await proxy.get(f"/v2/i{i}/blobs/{layer}")).code == 200
    await settle()
    disk = SharedDisk(proxy, capacity=0)  # reports plenty until a write finds it full
    disk._capacity = 128 * 1024 - disk.free()  # then 128 KiB free
    pulling = get_in_thread(proxy, f"/v2/library/x/blobs/{digest}")
    fetching = proxy.proxy.blobs.fetching
    await until(lambda: any(fetch["written"] >= 256 * 1024 for fetch in fetching()))
    await advance_until(clock, 0.5, lambda: pulling.called)  # the upstream's silence
    status, body, short = await pulling
    assert (status, short) == (200, True)
    await settle()
    left = sum(
        proxy.blob_path("sha256:" + hashlib.sha256(layer).hexdigest()).exists() for layer in images
    )
    # at most what came and as much again (512 KiB), in whole images, and a step's slack
    assert left >= 40 - 7, left


@pytest_twisted.ensureDeferred
async def test_a_blob_that_will_not_fit_after_all_evicts_in_few_grants(
    fake_registry, make_proxy, monkeypatch
):
    """Whether a blob fits with the cache evicted counts pinned images as
    evictable: one that then does not fit behind them takes few grants that
    evict (ROOM_GRANTS), not the whole unpinned cache, and goes through memory."""
    monkeypatch.setattr(blobs, "ROOM_GRANTS", 2)
    fake_registry.add_image("library/pinned", "1", [os.urandom(1000 * 1024)])
    small = [os.urandom(4 * 1024) for _ in range(120)]
    for i, layer in enumerate(small):
        fake_registry.add_image(f"library/s{i}", "1", [layer])
    data = os.urandom(1000 * 1024)
    digest = fake_registry.add_blob(data)
    proxy = await make_proxy(fake_registry.url, cache={"pinned": ["docker.io/library/pinned:1"]})
    for name in ["pinned", *(f"s{i}" for i in range(120))]:
        manifest = json.loads((await proxy.get(f"/v2/{name}/manifests/1")).body)
        layer = manifest["layers"][0]["digest"]
        assert (await proxy.get(f"/v2/{name}/blobs/{layer}")).code == 200
    await settle()
    disk = SharedDisk(proxy, capacity=0)
    disk._capacity = 100 * 1024 - disk.free()
    disk.full = True  # room() tells the truth: 100 KiB free
    made: list[int] = []
    make_room = proxy.proxy.blobs._make_room
    proxy.proxy.blobs._make_room = lambda needed, gave_up: (
        made.append(needed) or make_room(needed, gave_up)
    )
    status, body, short = await get_in_thread(proxy, f"/v2/library/x/blobs/{digest}")
    assert (status, body == data, short) == (200, True, False)
    await settle()
    assert not proxy.blob_path(digest).exists()
    assert len(made) == 2, made
    left = sum(
        proxy.blob_path("sha256:" + hashlib.sha256(layer).hexdigest()).exists() for layer in small
    )
    assert left > 0


@pytest_twisted.ensureDeferred
async def test_a_disk_that_does_not_take_a_file_holds_no_one_and_keeps_nothing(
    fake_registry, make_proxy, monkeypatch
):
    """An fsync that never returns (a dying disk, a hard NFS mount) held a
    blob's clients one byte short of it, and a manifest's without an
    answer, for ever: past PUBLISH_SECONDS they are served what was written
    and checked, and whenever the disk answers, nothing is kept."""
    monkeypatch.setattr(store_module, "PUBLISH_SECONDS", 0.3)
    layer = os.urandom(300_000)
    _, body = fake_registry.add_image("library/app", "1", [layer])
    digest = "sha256:" + hashlib.sha256(layer).hexdigest()
    proxy = await make_proxy(fake_registry.url)
    tmp = str(proxy.cache_dir / "tmp")
    disk = threading.Event()
    fsync = os.fsync

    def hung(fd: int) -> None:
        if os.readlink(f"/proc/self/fd/{fd}").startswith(tmp):
            disk.wait(30)
        fsync(fd)

    monkeypatch.setattr(os, "fsync", hung)
    try:
        manifest = await proxy.get("/v2/library/app/manifests/1")
        assert (manifest.code, manifest.body) == (200, body)
        status, got, short = await get_in_thread(proxy, f"/v2/library/app/blobs/{digest}")
        assert (status, got == layer, short) == (200, True, False)
        assert not disk.is_set()  # both answered while the disk still hung
    finally:
        disk.set()
    await until(lambda: not os.listdir(tmp))  # the threads, back, kept nothing
    assert_nothing_kept(proxy, digest)
    assert not proxy.blob_path(manifest.header("Docker-Content-Digest")).exists()
    assert proxy.proxy.index.blob_sizes([digest]) == {}
    # a disk that answers again keeps the next pull
    assert (await proxy.get(f"/v2/library/app/blobs/{digest}")).header("X-Cache") == "MISS"
    await until(lambda: proxy.blob_path(digest).exists())
