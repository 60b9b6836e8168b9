"""The reactor regproxy runs on, as a type: what its parts ask of it.

Every part takes the reactor, and the thread pools it may block on, from
whoever builds it (``tap.makeService``), never from the global
``twisted.internet.reactor``: tests hand them a reactor of their choice,
and where each part's blocking work runs is written where the part is made.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IReactorCore,
    IReactorPluggableNameResolver,
    IReactorTCP,
    IReactorThreads,
    IReactorTime,
)
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

T = TypeVar("T")


class IReactor(
    IReactorCore, IReactorTime, IReactorThreads, IReactorTCP, IReactorPluggableNameResolver
):
    """What regproxy's parts ask of their reactor (the real one provides it all)."""


class Threads:
    """A bounded pool of threads for one kind of blocking work (file
    renames and fsyncs, bcrypt, a scan of the store), started on first use
    and stopped with the reactor: a kind of work that piles up holds up only
    itself, never the reactor's own threads or another kind."""

    def __init__(self, reactor: IReactor, name: str, max_threads: int = 2) -> None:
        self._reactor = reactor
        self._pool = ThreadPool(minthreads=0, maxthreads=max_threads, name=name)

    def run(self, fn: Callable[..., T], *args: Any) -> Deferred[T]:
        """*fn(*args)* on one of the threads; its result on the reactor's."""
        if not self._pool.started:
            self._pool.start()
            self._reactor.addSystemEventTrigger("during", "shutdown", self.stop)
        return deferToThreadPool(self._reactor, self._pool, fn, *args)

    def stop(self) -> None:
        if self._pool.started:
            self._pool.stop()
