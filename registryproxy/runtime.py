"""The reactor regproxy runs on, as a type: what its parts ask of it.

Every part takes the reactor, and the thread pools it may block on, from
whoever builds it (``tap.makeService``), never from the global
``twisted.internet.reactor``: tests hand them a reactor of their choice,
and where each part's blocking work runs is written where the part is made.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IReactorCore,
    IReactorPluggableNameResolver,
    IReactorProcess,
    IReactorTCP,
    IReactorThreads,
    IReactorTime,
)
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

T = TypeVar("T")


class IReactor(
    IReactorCore,
    IReactorTime,
    IReactorThreads,
    IReactorTCP,
    IReactorPluggableNameResolver,
    IReactorProcess,
):
    """What regproxy's parts ask of their reactor (the real one provides it all)."""


#: how much nicer than the reactor's thread regproxy's worker threads run
#: (Linux: a thread's own nice value; elsewhere they run as the process)
WORKER_NICENESS = 10


class _Yielding(threading.Thread):
    """A worker thread that gives way to the reactor's thread for the CPU.

    The reactor's thread answers every client; a sweep, an fsck, a hash or a
    scan that competes with it for a core delays all of them, while the
    worker itself has no client waiting on its every millisecond.  Only
    raised, never lowered, so no privilege is needed."""

    def run(self) -> None:
        if sys.platform.startswith("linux"):
            try:
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), WORKER_NICENESS)
            except OSError:
                pass  # a sandbox that forbids it: run as the process does
        super().run()


def thread_pool(name: str, maxthreads: int, minthreads: int = 0) -> ThreadPool:
    """A pool for regproxy's blocking work, its threads yielding to the reactor's."""
    pool = ThreadPool(minthreads=minthreads, maxthreads=maxthreads, name=name)
    pool.threadFactory = _Yielding  # type: ignore[misc]
    return pool


class Threads:
    """A bounded pool of threads for one kind of blocking work (file
    renames and fsyncs, bcrypt, a scan of the store), started on first use
    and stopped with the reactor: a kind of work that piles up holds up only
    itself, never the reactor's own threads or another kind."""

    def __init__(self, reactor: IReactor, name: str, max_threads: int = 2) -> None:
        self._reactor = self.reactor = reactor
        self._pool = thread_pool(name, max_threads)

    def run(self, fn: Callable[..., T], *args: Any) -> Deferred[T]:
        """*fn(*args)* on one of the threads; its result on the reactor's."""
        if not self._pool.started:
            self._pool.start()
            self._reactor.addSystemEventTrigger("during", "shutdown", self.stop)
        return deferToThreadPool(self._reactor, self._pool, fn, *args)

    def stop(self) -> None:
        if self._pool.started:
            self._pool.stop()
