"""A big cache stays responsive: the index's heavy work runs in its own
thread, the reactor thread's commits never checkpoint, and a sweep, a purge
and an fsck of thousands of images leave the reactor answering."""

from __future__ import annotations

import hashlib
import json
import sys
import threading
import time
from pathlib import Path

import pytest_twisted
from proxyharness import settle, until
from twisted.internet import reactor
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.task import LoopingCall
from twisted.python.threadpool import ThreadPool

from registryproxy.admin.backend import PurgeSelector
from registryproxy.cache import eviction
from registryproxy.cache import index as index_module
from registryproxy.cache.background import IndexThread
from registryproxy.cache.index import Index, ManifestEntry

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bench.bigindex import generate  # noqa: E402


def spy(monkeypatch, target, names, calls):
    """Record the thread each of *target*'s *names* is called in."""
    for name in names:
        real = getattr(target, name)

        def recorded(*args, _real=real, _name=name, **kwargs):
            calls.append((_name, threading.current_thread().name))
            return _real(*args, **kwargs)

        monkeypatch.setattr(target, name, recorded)


def evict_limits(monkeypatch) -> list[int]:
    """The limit of every Index.evict call from now on."""
    limits: list[int] = []
    real = Index.evict

    def evict(self, pins, busy, limit, *args, **kwargs):
        limits.append(limit)
        return real(self, pins, busy, limit, *args, **kwargs)

    monkeypatch.setattr(Index, "evict", evict)
    return limits


async def two_images(fake_registry, make_proxy, **cache):
    for name in ("one", "two"):
        fake_registry.add_image(f"library/{name}", "1", [name.encode() * 1000])
    proxy = await make_proxy(fake_registry.url, cache=cache)
    for name in ("one", "two"):
        reply = await proxy.get(f"/v2/{name}/manifests/1")
        for layer in json.loads(reply.body)["layers"]:
            await proxy.get(f"/v2/{name}/blobs/{layer['digest']}")
    await settle()
    return proxy


@pytest_twisted.ensureDeferred
async def test_sweeps_purges_fsck_and_checkpoints_run_in_the_index_thread(
    fake_registry, make_proxy, monkeypatch
):
    proxy = await two_images(fake_registry, make_proxy, max_idle=3600)
    calls: list[tuple[str, str]] = []
    heavy = [
        "evict",
        "evict_loose",
        "purge",
        "checkpoint",
        "put_blobs",
        "forget_blobs",
        "write_accesses",
    ]
    spy(monkeypatch, Index, heavy, calls)
    spy(monkeypatch, proxy.proxy.store, ["delete"], calls)
    evictor = proxy.proxy.evictor
    evictor._max_idle = 0
    assert await evictor.sweep() > 0
    assert proxy.proxy.index.totals()["manifests"] == 0
    hexa = hashlib.sha256(b"stray").hexdigest()
    stray = proxy.cache_dir / "blobs" / "sha256" / hexa[:2] / hexa
    stray.parent.mkdir(parents=True, exist_ok=True)
    stray.write_bytes(b"stray")  # what fsck must index
    assert (await proxy.proxy.control.fsck()).indexed == (f"sha256:{stray.name}",)
    await proxy.proxy.control.purge(PurgeSelector(everything=True))
    await proxy.proxy.background.checkpoint()
    assert {name for name, _ in calls} >= {
        "evict",
        "purge",
        "put_blobs",
        "checkpoint",
        "delete",
        "write_accesses",  # the pulls' access times, before the sweep chose
    }
    assert all(thread.startswith("PoolThread-regproxy-index") for _, thread in calls), calls


@pytest_twisted.ensureDeferred
async def test_making_room_stays_bounded(tmp_path, fake_registry, make_proxy, monkeypatch):
    generate(str(tmp_path / "cache"), 300)
    proxy = await make_proxy(fake_registry.url, cache_dir=tmp_path / "cache")
    batches = evict_limits(monkeypatch)
    monkeypatch.setattr(proxy.proxy.store, "room", lambda: 0)  # never frees up
    calls: list[tuple[str, str]] = []
    spy(monkeypatch, Index, ["write_accesses"], calls)
    proxy.proxy.access.touch_blob("sha256:" + "a" * 64, time.time())
    await proxy.proxy.evictor.make_room(10)
    # what was read is taken, and written before choosing in the room
    # thread, which waits for no purge
    assert not proxy.proxy.index.take_accesses()
    assert {thread for _, thread in calls} == {"PoolThread-regproxy-index-room-0"}
    # a few small batches, then the download goes through memory
    assert batches == [eviction.ROOM_BATCH] * eviction.ROOM_STEPS
    assert proxy.proxy.index.totals()["manifests"] >= 300 - len(batches) * eviction.ROOM_BATCH


@pytest_twisted.ensureDeferred
async def test_the_reactor_threads_commits_never_checkpoint(fake_registry, make_proxy):
    proxy = await make_proxy(fake_registry.url)
    index = proxy.proxy.index
    assert index._db.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 0
    await proxy.proxy.background.run(Index.checkpoint)
    for i in range(300):
        digest = f"sha256:{i:064x}"
        index.put_blob(digest, 10, time.time())
        index.put_manifest(
            "docker.io",
            "library/app",
            ManifestEntry(digest, "application/vnd.oci.image.manifest.v1+json", 10),
            time.time(),
            [(f"sha256:{i + 10**6:064x}", "blob")],
        )
    # SQLite's default would have checkpointed at 1000 pages, on this thread
    busy, pages, copied = await proxy.proxy.background.run(Index.checkpoint)
    assert (busy, copied) == (0, pages)
    assert pages > 1000


@pytest_twisted.ensureDeferred
async def test_a_big_sweep_purge_and_fsck_leave_the_reactor_answering(
    tmp_path, fake_registry, make_proxy
):
    plan = generate(str(tmp_path / "cache"), 1500)
    proxy = await make_proxy(fake_registry.url, cache_dir=tmp_path / "cache")
    evictor, control, index = proxy.proxy.evictor, proxy.proxy.control, proxy.proxy.index
    evictor.max_bytes = plan["max_bytes"]
    proxy.proxy.keep.pins = [("docker.io", plan["pinned_repo"], None, None)]
    lags: list[float] = []
    last = [time.monotonic()]

    def tick():
        now = time.monotonic()
        lags.append(now - last[0] - 0.01)
        last[0] = now

    ticker = LoopingCall(tick)
    ticker.clock = reactor
    ticker.start(0.01, now=False)
    try:
        # maybeDeferred: so that this fails on the lag, not the API, on the old code
        await maybeDeferred(evictor.sweep)
        assert index.totals()["manifests"] == 1500 - 1500 // 4
        result = await maybeDeferred(
            control.purge, PurgeSelector(upstream="docker.io", repository="library/big")
        )
        assert result.tags == plan["big_tags"]
        await control.fsck()
        await settle(0.05)
    finally:
        ticker.stop()
    # generous for a busy CI machine: the old code stalled for tens of seconds
    assert max(lags) < 0.3, sorted(lags)[-5:]


@pytest_twisted.ensureDeferred
async def test_blobs_stored_during_a_sweep_ask_for_one_more(tmp_path, fake_registry, make_proxy):
    plan = generate(str(tmp_path / "cache"), 300)
    proxy = await make_proxy(fake_registry.url, cache_dir=tmp_path / "cache")
    evictor = proxy.proxy.evictor
    evictor.max_bytes = plan["max_bytes"]
    sweeps = []
    real = evictor._sweep
    gate: Deferred[None] = Deferred()

    async def counted():
        sweeps.append(1)
        if len(sweeps) == 1:
            await gate  # the first sweep runs on until the blobs below are stored
        return await real()

    evictor._sweep = counted
    running = evictor.sweep()
    for _ in range(20):
        evictor.soon()  # a blob stored
        await settle(0.001)
    gate.callback(None)
    await running
    await settle(0.2)
    assert len(sweeps) == 2


@pytest_twisted.ensureDeferred
async def test_work_whose_caller_left_runs_to_its_end_before_the_next(fake_registry, make_proxy):
    proxy = await make_proxy(fake_registry.url)
    # two threads: only the lock keeps the pieces of work apart
    threads = ThreadPool(minthreads=2, maxthreads=2, name="test-index")
    background = IndexThread(proxy.proxy.index, reactor, threads)
    spans: list[tuple[str, float]] = []

    def slow(index):
        spans.append(("slow", time.monotonic()))
        time.sleep(0.2)
        spans.append(("slow done", time.monotonic()))

    def next_one(index):
        spans.append(("next", time.monotonic()))
        return index.total_size()

    try:
        left = background.run(slow)
        left.addErrback(lambda _: None)
        await settle(0.05)
        left.cancel()  # Klein cancels a route's Deferred when its client leaves
        assert await background.run(next_one) == 0
        assert [name for name, _ in spans] == ["slow", "slow done", "next"]

        # a read whose caller left before its turn does not run; a write does
        spans.clear()
        first = background.run(slow)
        read = background.run(next_one, reads=True)
        write = background.run(lambda index: spans.append(("write", 0.0)))
        for gone in (read, write):
            gone.addErrback(lambda _: None)
            gone.cancel()
        await first
        await background.run(lambda index: None)  # after them all
        assert [name for name, _ in spans] == ["slow", "slow done", "write"]
    finally:
        await background.close()
        threads.stop()


@pytest_twisted.ensureDeferred
async def test_a_sweep_has_the_answers_in_memory_looked_up_again_once(
    tmp_path, fake_registry, make_proxy, monkeypatch
):
    """Paced batches are many; the answers kept in memory are forgotten
    once a sweep has evicted, not after each batch (each time every client's
    next answer came from the index)."""
    plan = generate(str(tmp_path / "cache"), 300)
    proxy = await make_proxy(fake_registry.url, cache_dir=tmp_path / "cache")
    monkeypatch.setattr(index_module, "HOLD_SECONDS", 1e-12)  # one image a batch
    evictor = proxy.proxy.evictor
    evictor.max_bytes = plan["max_bytes"]
    proxy.proxy.keep.pins = [("docker.io", plan["pinned_repo"], None, None)]
    forgotten: list[int] = []
    evictor._removed = lambda: forgotten.append(1)
    batches = evict_limits(monkeypatch)
    await maybeDeferred(evictor.sweep)
    assert len(batches) > 50  # 300 // 4 images, one a batch after the first 8
    assert proxy.proxy.index.totals()["manifests"] == 300 - 300 // 4
    assert len(forgotten) == 1


@pytest_twisted.ensureDeferred
async def test_a_sweep_writes_the_access_times_at_its_start_not_before_each_batch(
    tmp_path, fake_registry, make_proxy, monkeypatch
):
    """Each write is a turn of the room thread, and a sweep's batches are
    hundreds: the access times gathered in memory are written when it
    starts (what was just read is not chosen), then once every FLUSH_EVERY
    seconds."""
    plan = generate(str(tmp_path / "cache"), 300)
    proxy = await make_proxy(fake_registry.url, cache_dir=tmp_path / "cache")
    monkeypatch.setattr(index_module, "HOLD_SECONDS", 1e-12)  # one image a batch
    monkeypatch.setattr(eviction, "FLUSH_EVERY", 3600.0)
    evictor = proxy.proxy.evictor
    evictor.max_bytes = plan["max_bytes"]
    proxy.proxy.keep.pins = [("docker.io", plan["pinned_repo"], None, None)]
    db = proxy.proxy.index._db
    least = db.execute(
        "SELECT upstream, repo, digest FROM manifests WHERE repo != ?"
        " ORDER BY COALESCE(last_access, fetched_at) LIMIT 1",
        (plan["pinned_repo"],),
    ).fetchone()
    proxy.proxy.access.touch_manifest(*least, time.time())  # read just now
    flushes: list[int] = []
    access = proxy.proxy.access
    real = access.flush
    monkeypatch.setattr(access, "flush", lambda: flushes.append(1) or real())
    batches = evict_limits(monkeypatch)
    await maybeDeferred(evictor.sweep)
    assert len(batches) > 50
    assert len(flushes) == 1
    assert proxy.proxy.index.totals()["manifests"] == 300 - 300 // 4
    kept = "SELECT COUNT(*) FROM manifests WHERE upstream=? AND repo=? AND digest=?"
    assert db.execute(kept, least).fetchone()[0] == 1


@pytest_twisted.ensureDeferred
async def test_access_times_are_written_off_the_reactor_thread(
    fake_registry, make_proxy, monkeypatch
):
    """A scanner reading every layer leaves tens of thousands to write (1.2 s
    for 100,000, on the reactor thread before): it only takes them."""
    proxy = await two_images(fake_registry, make_proxy)
    calls: list[tuple[str, str]] = []
    spy(monkeypatch, Index, ["write_accesses"], calls)
    db = proxy.proxy.index._db
    later = time.time() + 1000
    blobs = [digest for (digest,) in db.execute("SELECT digest FROM blobs")]
    for digest in blobs:
        proxy.proxy.access.touch_blob(digest, later)
    await proxy.proxy.access.flush()
    assert [thread for _, thread in calls] == ["PoolThread-regproxy-index-room-0"]
    written = db.execute("SELECT COUNT(*) FROM blobs WHERE last_access=?", (later,)).fetchone()
    assert written[0] == len(blobs) > 2


@pytest_twisted.ensureDeferred
async def test_the_last_access_times_are_written_at_shutdown(fake_registry, make_proxy):
    proxy = await two_images(fake_registry, make_proxy)
    later = time.time() + 1000
    (digest,) = proxy.proxy.index._db.execute("SELECT digest FROM blobs LIMIT 1").fetchone()
    proxy.proxy.access.touch_blob(digest, later)
    await proxy.stop()
    index = Index(str(proxy.cache_dir / "index.db"))
    try:
        row = index._db.execute("SELECT last_access FROM blobs WHERE digest=?", (digest,))
        assert row.fetchone()[0] == later
    finally:
        index.close()


@pytest_twisted.ensureDeferred
async def test_a_flush_behind_a_long_purge_is_written_before_room_is_made(tmp_path):
    """The periodic flush takes what was read and queues its write: behind
    a purge of the whole cache in the worker thread, a download making room
    meanwhile evicted the blob just read rather than the least recently used."""
    from types import SimpleNamespace

    from registryproxy.cache.access import LocalIndex

    read, least = "sha256:" + "a" * 64, "sha256:" + "b" * 64
    index = Index(str(tmp_path / "index.db"))
    index.put_blob(read, 10, 100.0)
    index.put_blob(least, 10, 200.0)
    pools = [ThreadPool(1, 1, "test-index"), ThreadPool(1, 1, "test-index-room")]
    access = LocalIndex(
        index, IndexThread(index, reactor, pools[0]), roomer=IndexThread(index, reactor, pools[1])
    )
    deleted: list[str] = []
    store = SimpleNamespace(
        room=lambda: 10 * len(deleted),
        stat=lambda digest: 10,
        delete=lambda digest: deleted.append(str(digest)) or True,
    )
    keep = SimpleNamespace(pins=[], busy=set)
    evictor = eviction.Evictor(access, store, reactor, keep, None)
    purged = threading.Event()
    purge = access.heavy(lambda _: purged.wait(10))  # a long purge in the worker thread
    try:
        index.touch_blob(read, 1000.0)
        flushed = access.flush()  # the periodic one: taken from memory, its write queued
        await evictor.make_room(10)
        assert deleted == [least]
        await flushed
    finally:
        purged.set()
        await purge
        await access.close()


@pytest_twisted.ensureDeferred
async def test_files_a_crash_left_between_forgetting_and_deleting_go_at_the_next_sweep(
    fake_registry, make_proxy, tmp_path
):
    """A purge commits, then deletes the files (18 s for a whole cache at
    20,000 images): killed between, the files stayed outside the index and
    the budget for good.  The index lists them as it forgets them, and the
    next start's sweep deletes them, but one stored again since."""
    proxy = await two_images(fake_registry, make_proxy, max_idle=3600)
    index = proxy.proxy.index
    removed = index.purge("docker.io", "library/one")  # and the process dies here
    doomed = [proxy.blob_path(d) for d, _ in removed.blobs if proxy.blob_path(d).exists()]
    kept = [p for p in (proxy.cache_dir / "blobs").rglob("*") if p.is_file() and p not in doomed]
    assert len(doomed) == 2 and kept  # its manifest and layer; the other image's
    await proxy.stop()
    again = await make_proxy(fake_registry.url, cache_dir=proxy.cache_dir, cache={"max_idle": 3600})
    back = "sha256:" + hashlib.sha256(b"one" * 1000).hexdigest()
    # (its layer, pulled again before the sweep: stored and known again)
    assert (await again.get(f"/v2/library/one/blobs/{back}")).code == 200
    await until(lambda: again.proxy.index.blob_sizes([back]))
    freed = await again.proxy.evictor.sweep()
    assert not any(p.exists() for p in doomed if p != proxy.blob_path(back))
    assert proxy.blob_path(back).exists() and all(p.exists() for p in kept)
    assert freed == sum(
        size
        for digest, size in removed.blobs
        if proxy.blob_path(digest) in doomed and digest != back
    )
    assert again.proxy.index.to_reclaim("", 10) == []
