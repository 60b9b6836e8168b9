"""How the cache reaches its index, whichever index it is.

The cache logic is written once against :class:`IndexAccess`: it hands over
a function of the synchronous :class:`~.index.Index` API and gets a
Deferred of its result.  The embedded SQLite index runs quick work (a row or
a few, the hot path) inline on the reactor thread, and heavy work (whose
cost grows with the cache: listings, totals, sweeps, purges) on its own
worker thread; a shared index in PostgreSQL runs both on threads of its own.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, TypeVar

from twisted.internet.defer import Deferred, maybeDeferred, succeed

from ..runtime import stop_pool
from .background import IndexThread
from .index import Index

T = TypeVar("T")


class IndexAccess(Protocol):
    def quick(self, work: Callable[[Index], T]) -> Deferred[T]:
        """*work* that reads or writes a row or a few (the hot path)."""

    def heavy(self, work: Callable[[Index], T]) -> Deferred[T]:
        """*work* whose cost grows with the size of the cache."""

    def read(self, work: Callable[[Index], T]) -> Deferred[T]:
        """Heavy *work* that only reads (a listing, totals): if its answer
        is cancelled before it starts, it need not run."""

    def room(self, work: Callable[[Index], T]) -> Deferred[T]:
        """Bounded *work* a download waits for (evicting to make room for its
        bytes on a full disk): off the reactor thread, and behind no heavy
        work, so that neither the clients nor the download wait long."""

    def touch_manifest(self, upstream: str, repo: str, digest: str, when: float) -> None:
        """Remember an access (in memory: written by the next flush)."""

    def touch_blob(self, digest: str, when: float) -> None: ...

    def flush(self) -> Deferred[None]:
        """Write the accesses remembered so far, off the reactor thread:
        there may be tens of thousands.  Work asked of :meth:`heavy` after
        this sees them."""

    @property
    def inline(self) -> Index | None:
        """The index, to use synchronously on the reactor thread for the
        few rows that cannot wait (whether a new blob could fit at all);
        None for an index that cannot be used so."""


class LocalIndex:
    """The embedded SQLite index: quick work inline, heavy work in its
    thread, heavy reads in a *reader* thread of their own (else *background*),
    on a connection of its own: WAL lets it read while a purge of the whole
    cache (18 s at 20,000 images) writes, so the admin API's listings and
    totals do not wait for that.  Room for downloads is made in a *roomer*
    thread (else *background*): its writes wait for one batch of a purge's
    at most (``index.HOLD_SECONDS``), not for the whole purge."""

    def __init__(
        self,
        index: Index,
        background: IndexThread,
        reader: IndexThread | None = None,
        roomer: IndexThread | None = None,
    ) -> None:
        self.index = self._index = index
        self.background = background
        self.reader = reader if reader is not None else background
        self.roomer = roomer if roomer is not None else background

    async def close(self) -> None:
        """Let the workers finish, stop their threads, close the index
        (which writes the last access times)."""
        for worker in {self.background, self.reader, self.roomer}:
            await worker.close()
            stop_pool(worker.threadpool)
        self._index.close()

    def quick(self, work: Callable[[Index], T]) -> Deferred[T]:
        return maybeDeferred(work, self._index)

    def heavy(self, work: Callable[[Index], T]) -> Deferred[T]:
        return self.background.run(work)

    def read(self, work: Callable[[Index], T]) -> Deferred[T]:
        return self.reader.run(work, reads=True)

    def room(self, work: Callable[[Index], T]) -> Deferred[T]:
        return self.roomer.run(work)

    def touch_manifest(self, upstream: str, repo: str, digest: str, when: float) -> None:
        self._index.touch_manifest(upstream, repo, digest, when)

    def touch_blob(self, digest: str, when: float) -> None:
        self._index.touch_blob(digest, when)

    def flush(self) -> Deferred[None]:
        # taken on the reactor thread (a swap), written in the room thread:
        # behind no purge (in the worker's, a flush behind a purge of the
        # whole cache left a download making room meanwhile to evict what
        # had just been read), and before whatever room is made next
        taken = self._index.take_accesses()
        if not taken:
            return succeed(None)
        return self.roomer.run(lambda index: index.write_accesses(taken))

    @property
    def inline(self) -> Index | None:
        return self._index
