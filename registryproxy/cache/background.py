"""The index's own worker thread: heavy reads and batched writes off the reactor.

The hot path uses :class:`~.index.Index` synchronously on the reactor thread;
work whose cost grows with the size of the cache (eviction's selection,
purges, fsck's reconciliation, WAL checkpoints) runs here instead, on a second
SQLite connection (WAL lets readers and one writer go on at once), in short
write transactions so that the reactor thread's own writes never wait long.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar, cast

from twisted.internet.defer import Deferred, DeferredLock, succeed
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from .index import Index

log = Logger()

T = TypeVar("T")


class IndexThread:
    """Runs work on the index's second connection, one piece at a time, in
    *threadpool* (not the reactor's: DNS lookups and blob hashing are not
    held up by it, nor it by them), which it starts on first use; its owner
    stops it."""

    def __init__(self, index: Index, reactor: IReactorFromThreads, threadpool: ThreadPool) -> None:
        self._index = index.companion()
        self._reactor = reactor
        self._threadpool = self.threadpool = threadpool
        # one connection: one piece of work at a time, whatever the pool's size
        self._lock = DeferredLock()

    def run(self, work: Callable[[Index], T], reads: bool = False) -> Deferred[T]:
        """``work(index)`` in the worker thread, on its own connection.

        Cancelling the answer (Klein does when a client leaves) leaves the
        work running to its end, and the next piece waiting for it; work
        that only *reads*, cancelled before its turn came, does not run
        (a scrape that timed out behind a long purge asks for nothing)."""
        answer: Deferred[T] = Deferred()

        def start() -> Deferred[T]:
            if reads and answer.called:
                # nobody waits for what it would read (done() drops it)
                return cast(Deferred[T], succeed(None))
            if not self._threadpool.started:
                # on first use: a process failing to start (a busy port) exits
                # at once, with no thread of the pool's to wait for
                self._threadpool.start()
            return deferToThreadPool(self._reactor, self._threadpool, work, self._index)

        running = self._lock.run(start)

        def done(result: T | Failure) -> None:
            if answer.called:  # cancelled: nobody waits for the result
                if isinstance(result, Failure):
                    log.failure("index work failed after its caller left", result)
            elif isinstance(result, Failure):
                answer.errback(result)
            else:
                answer.callback(result)

        running.addBoth(done)
        return answer

    def checkpoint(self) -> Deferred[None]:
        """Copy the WAL into the database (the fsync) in the worker thread."""

        def done(result: tuple[int, int, int]) -> None:
            busy, pages, copied = result
            log.debug("checkpoint: {copied} of {pages} pages", copied=copied, pages=pages)

        return self.run(Index.checkpoint).addCallback(done)

    def close(self) -> Deferred[None]:
        """Close the connection (after the work queued before)."""
        if not self._threadpool.started:
            self._index.close()  # no thread ever used it
            return succeed(None)
        return self.run(Index.close)
