"""Worker threads give way to the reactor's thread for the CPU."""

from __future__ import annotations

import os
import sys
import threading

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.threads import deferToThreadPool

from registryproxy.runtime import WORKER_NICENESS, Threads, thread_pool

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="per-thread nice values are Linux's"
)


def niceness() -> int:
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


@pytest_twisted.ensureDeferred
async def test_work_handed_to_threads_runs_nicer_than_the_reactor():
    threads = Threads(reactor, "test-nice")
    try:
        worker = await threads.run(niceness)
    finally:
        threads.stop()
    assert worker == min(niceness() + WORKER_NICENESS, 19)
    assert niceness() == os.getpriority(os.PRIO_PROCESS, 0)  # the reactor's own is untouched


@pytest_twisted.ensureDeferred
async def test_every_pool_made_by_thread_pool_yields():
    pool = thread_pool("test-nice-pool", 2, minthreads=1)
    pool.start()
    try:
        worker = await deferToThreadPool(reactor, pool, niceness)
    finally:
        pool.stop()
    assert worker > niceness()
