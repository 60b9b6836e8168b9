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
import time
from collections.abc import Callable
from typing import Any, TypeVar

from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import (
    IReactorCore,
    IReactorPluggableNameResolver,
    IReactorProcess,
    IReactorTCP,
    IReactorThreads,
    IReactorTime,
)
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

T = TypeVar("T")

log = Logger()


class IReactor(
    IReactorCore,
    IReactorTime,
    IReactorThreads,
    IReactorTCP,
    IReactorPluggableNameResolver,
    IReactorProcess,
):
    """What regproxy's parts ask of their reactor (the real one provides it all)."""


#: how long a stop waits for a part that does not answer (a database that
#: keeps its connections and never answers, a hung disk) before it goes on
#: without it: the process exits, the part's threads left behind.  Work cut
#: so is work a crash could cut: a file whose fsync had not ended is not
#: kept, the index's transactions roll back.
STOP_SECONDS = 5.0
#: what each pool gets however late its stop comes: time to see an idle
#: pool's threads end, so that only stuck ones are said to be
_STOP_FLOOR = 0.1

#: how much nicer than the reactor's thread regproxy's worker threads run
#: (Linux: a thread's own nice value; elsewhere they run as the process)
WORKER_NICENESS = 10


class _Yielding(threading.Thread):
    """A worker thread that gives way to the reactor's thread for the CPU.

    The reactor's thread answers every client; a sweep, an fsck, a hash or a
    scan that competes with it for a core delays all of them, while the
    worker itself has no client waiting on its every millisecond.  Only
    raised, never lowered, so no privilege is needed.

    A daemon thread: one stuck in a call that never returns does not hold
    the process's exit (see :func:`stop_pool`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.daemon = True

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


def stop_pool(*pools: ThreadPool, seconds: float = STOP_SECONDS) -> None:
    """Stop *pools*: their threads end once the calls they run return, which
    the caller (the reactor's thread, stopping) waits for at most *seconds*
    in all; a thread still in a call then is left to it, and said so."""
    started = [pool for pool in pools if pool.started]
    stopping = [
        threading.Thread(target=pool.stop, name=f"stopping {pool.name}", daemon=True)
        for pool in started
    ]
    for thread in stopping:
        thread.start()
    deadline = time.monotonic() + seconds
    for pool, thread in zip(started, stopping, strict=True):
        thread.join(max(_STOP_FLOOR, deadline - time.monotonic()))
        if thread.is_alive():
            log.warn(
                "threads of {pool} still busy after {seconds}s: stopping without them",
                pool=pool.name,
                seconds=round(seconds, 1),
            )


def within(d: Deferred[Any], seconds: float, clock: IReactorTime, what: str) -> Deferred[None]:
    """Once *d* has an answer, or after *seconds* with a warning that *what*
    had none: a stop that goes on without a part that does not answer.
    *d* is left to answer whenever it does (its failure is logged)."""
    done: Deferred[None] = Deferred()

    def late() -> None:
        log.warn(
            "{what}: no answer within {seconds}s: going on without it", what=what, seconds=seconds
        )
        done.callback(None)

    timer = clock.callLater(seconds, late)

    def answered(result: object) -> None:
        if isinstance(result, Failure):
            log.warn("{what} failed: {why}", what=what, why=result.getErrorMessage())
        if timer.active():
            timer.cancel()
            done.callback(None)

    d.addBoth(answered)
    return done


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
        stop_pool(self._pool)


class Busy(Exception):
    """More calls are queued or running on a :class:`Bounded` than it takes."""


class Stopped(Exception):
    """A call still queued when its :class:`Bounded` stopped: not made."""


class Bounded:
    """Blocking calls on *pool*, each with a deadline, and at most *most* of
    them queued or running.

    A call whose other side never answers (a name's DNS, a database that
    keeps its connections and never answers) holds its thread until it
    does; it does not hold its caller past the deadline (``TimeoutError``),
    nor let callers queue without end (:class:`Busy` past *most*).  With
    *skip*, a call given up before its turn comes is not made (a lookup);
    without, it is, later (a write that must happen whether or not anyone
    waits for it).  None still queued is made once :meth:`stop` is called
    (its caller gets :class:`Stopped`)."""

    def __init__(self, reactor: IReactor, pool: ThreadPool, most: int, skip: bool = True) -> None:
        self.pool = pool
        self.most = most
        self._skip = skip
        #: queued or running
        self.pending = 0
        self._reactor = reactor
        self._stopping = False

    @property
    def name(self) -> str | None:
        return self.pool.name

    def run(self, seconds: float, fn: Callable[..., T], *args: Any) -> Deferred[T]:
        """*fn(*args)* on a thread of the pool, answered within *seconds*."""
        if self._stopping:
            return fail(Stopped(f"{self.pool.name} stopped"))
        if self.pending >= self.most:
            return fail(Busy(f"{self.pending} calls on {self.pool.name} under way already"))
        if not self.pool.started:
            self.pool.start()
        given_up = threading.Event()
        answer: Deferred[T] = Deferred(lambda _: given_up.set())

        def call() -> T | None:
            if self._skip and given_up.is_set():
                return None  # nobody waits for it
            if self._stopping:
                raise Stopped(f"{self.pool.name} stopped")
            return fn(*args)

        def finished(ok: bool, result: Any) -> None:
            self.pending -= 1
            if not answer.called:
                answer.callback(result) if ok else answer.errback(result)

        self.pending += 1
        try:
            self.pool.callInThreadWithCallback(
                lambda ok, result: self._reactor.callFromThread(finished, ok, result), call
            )
        except Exception as e:  # a pool stopped under it (AlreadyQuit): answered, not raised
            self.pending -= 1
            return fail(Stopped(f"{self.pool.name} stopped ({e!r})"))
        return answer.addTimeout(seconds, self._reactor)

    def stop(self) -> None:
        """Stop the pool: the calls running end first, none queued is made."""
        self._stopping = True
        stop_pool(self.pool)
