"""A cluster node's local tier stays within its budget, least recently used
first, never dropping a file in use."""

from __future__ import annotations

import os

import pytest_twisted
from twisted.internet import reactor
from twisted.python.threadpool import ThreadPool

from registryproxy.cache.shared import LocalTier
from registryproxy.cache.store import FileStore
from registryproxy.names import Digest
from registryproxy.runtime import Threads


async def _put(store: FileStore, data: bytes, mtime: float) -> Digest:
    digest = Digest.of(data)
    writer = store.begin(digest, len(data))
    writer.write(data)
    await writer.commit()
    writer.close()
    os.utime(store.path(digest), (mtime, mtime))
    return digest


@pytest_twisted.ensureDeferred
async def test_the_oldest_unused_copies_go_until_the_tier_fits(tmp_path):
    store = FileStore(str(tmp_path), Threads(reactor, "test-files"))
    threads = ThreadPool(minthreads=0, maxthreads=1, name="tier-test")
    threads.start()
    try:
        # four 1000-byte copies, oldest first; the tier holds two
        old, older_but_busy, read_lately, new = [
            await _put(store, os.urandom(1000), mtime) for mtime in (100, 50, 10, 300)
        ]
        tier = LocalTier(store, 2000, threads, reactor)
        tier.served(str(read_lately), 400.0)  # read since it was written
        freed = await tier.trim([str(older_but_busy)])
    finally:
        threads.stop()
    assert freed == 2000
    kept = {d for d in (old, older_but_busy, read_lately, new) if store.stat(d) is not None}
    # the busy one stays; of the others the least recently used go (the one
    # read lately counts from its read, not its write)
    assert kept == {older_but_busy, read_lately}


@pytest_twisted.ensureDeferred
async def test_a_tier_within_budget_loses_nothing(tmp_path):
    store = FileStore(str(tmp_path), Threads(reactor, "test-files"))
    threads = ThreadPool(minthreads=0, maxthreads=1, name="tier-test")
    threads.start()
    try:
        digests = [await _put(store, os.urandom(500), 100 + i) for i in range(4)]
        freed = await LocalTier(store, 2000, threads, reactor).trim([])
    finally:
        threads.stop()
    assert freed == 0
    assert all(store.stat(d) == 500 for d in digests)
