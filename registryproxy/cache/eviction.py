"""Keeping the store within its disk budget, least recently used first.

The unit of eviction is an image: a manifest no other cached manifest of its
repository lists (with its platform manifests, for an index), and the blobs
that only it lists: a blob another cached manifest lists stays.  Pinned
images, and images listing a blob being read, are never evicted.  A file
being served is unlinked, not cut: readers keep their open descriptor until
they finish.

The index chooses in SQL (:meth:`Index.evict`), a bounded batch at a time.
Sweeps and purges run it in the index's worker thread, and delete the files
there too; :meth:`Evictor.make_room`, which a download on a full disk waits
for, runs a few small batches in a thread of its own (``IndexAccess.room``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import Protocol, TypeVar

from twisted.internet.defer import Deferred, DeferredLock, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from ..names import Digest
from .access import IndexAccess
from .index import Evicted, Index, Pace, Removed
from .keep import Keep, Pin


class Deletes(Protocol):
    """Where eviction deletes what the index forgot: the store, or a cluster's."""

    def stat(self, digest: Digest) -> int | None: ...
    def delete(self, digest: Digest) -> bool: ...
    def room(self) -> int: ...


log = Logger()

T = TypeVar("T")

#: images evicted per transaction of a sweep at most (each takes as many as
#: fit in the index's HOLD_SECONDS: the worker holds its write lock so long)
SWEEP_BATCH = 100
#: seconds between two writes, during a sweep, of the access times gathered
#: on the reactor (so that what was just read is not chosen): one before
#: each of its batches (hundreds in a sweep of 5,000 images) would cost a
#: turn of the room thread each, where downloads make room
FLUSH_EVERY = 1.0
#: make_room, synchronous: at most this many batches of this many images
ROOM_STEPS = 4
ROOM_BATCH = 16
#: and then loose blobs among this many least recently used blobs
ROOM_LOOSE_WINDOW = 2000
#: loose blobs (no cached manifest lists them) forgotten per transaction
LOOSE_BATCH = 500
#: manifests removed per transaction of a purge
PURGE_BATCH = 200


class Evictor:
    def __init__(
        self,
        access: IndexAccess,
        store: Deletes,
        clock: IReactorTime,
        keep: Keep,
        max_bytes: int | None,
        low_water: float = 0.9,
        max_idle: float | None = None,
        removed: Callable[[], None] = lambda: None,
    ) -> None:
        """*keep* says what may not go now (pins, blobs in use); *removed*
        is told whenever images or blobs went (answers kept in memory must
        be looked up again)."""
        self._keep = keep
        self._access = access
        self._removed = removed
        self._store = store
        self._clock = clock
        self.max_bytes = max_bytes
        self._low_water = low_water
        self._max_idle = max_idle
        self._scheduled = False
        self._sweeping = DeferredLock()
        #: blobs were stored during a sweep: check again after it
        self._again = False
        self._pace = Pace(SWEEP_BATCH)

    def soon(self) -> None:
        """Check the budget shortly (after a blob was stored), once however
        many blobs arrive meanwhile: once more after a sweep running now."""
        if self.max_bytes is None or self._scheduled:
            return
        self._scheduled = True

        def run() -> None:
            self._scheduled = False
            if self._sweeping.locked:
                self._again = True
                return
            self.sweep().addErrback(lambda f: log.failure("eviction failed", f))

        self._clock.callLater(0, run)

    def sweep(self) -> Deferred[int]:
        """Remove idle images, then evict until within budget: bytes freed.
        One sweep at a time; the index's work runs in its worker thread."""

        def done(result: T) -> T:
            if self._again:
                self._again = False
                self.soon()
            return result

        return self._sweeping.run(lambda: Deferred.fromCoroutine(self._sweep())).addBoth(done)

    async def _sweep(self) -> int:
        # files a crash left between the index forgetting them and their deletion
        freed = await self._access.heavy(partial(_replay, self._store, self._keep.busy()))
        if self._max_idle is not None:
            cutoff = self._clock.seconds() - self._max_idle
            freed += await self._evict("idle", lambda ix: None, used_before=cutoff)
        max_bytes = self.max_bytes
        if max_bytes is not None:
            target = max_bytes * self._low_water
            total = await self._access.heavy(lambda index: index.total_size())
            if total > max_bytes:
                freed += await self._evict("over budget", lambda ix: ix.total_size() - target)
                while True:
                    count, just_freed = await self._access.heavy(
                        partial(_loose, self._store, self._keep.busy(), target)
                    )
                    freed += just_freed
                    if count:
                        self._removed()
                    if count < LOOSE_BATCH:
                        break
        return freed

    async def _evict(
        self,
        why: str,
        excess: Callable[[Index], float | None],
        used_before: float | None = None,
    ) -> int:
        """Evict in batches in the worker thread, least recently used first,
        until *excess* (asked of the index before each batch) is freed.

        The answers kept in memory are looked up again once, at the end, not
        after every batch: paced batches are many (hundreds for a sweep of
        5,000 images), and each time every client's next answer came from
        the index.  Until then one may still name an evicted manifest, whose
        bytes are right; its blobs are fetched again."""
        freed = 0
        removed = False
        flushed: float | None = None
        try:
            while True:
                # access times gathered on the reactor are written before choosing
                if flushed is None or self._clock.seconds() - flushed >= FLUSH_EVERY:
                    await self._access.flush()
                    flushed = self._clock.seconds()
                evicted, just_freed = await self._access.heavy(
                    partial(
                        _batch,
                        self._store,
                        list(self._keep.pins),
                        self._keep.busy(),
                        used_before,
                        excess,
                        self._pace,
                    )
                )
                freed += just_freed
                self._log(evicted, why, just_freed)
                removed = removed or bool(evicted.images or just_freed)
                if not evicted.more:
                    return freed
        finally:
            if removed:
                self._removed()

    def could_fit(self, needed: int) -> bool:
        """Whether a blob of *needed* bytes would fit on the disk if every
        image not in use were evicted (never, for a shared index: it is not
        for the reactor thread).  A few rows: the blobs in use, the total."""
        index = self._access.inline
        return index is not None and _fits(self._store, self._keep.busy(), needed, index)

    def make_room(self, needed: int, gave_up: Callable[[], bool] = lambda: False) -> Deferred[int]:
        """Evict least recently used images until a new blob of *needed*
        bytes fits on the disk, so that with no budget set (or a disk shared
        with others) a full disk still caches what is pulled now instead of
        freezing with what was pulled first.  Bytes freed.

        A download waits for it, so it is bounded: at most ``ROOM_STEPS``
        batches of ``ROOM_BATCH`` images, each chosen by one indexed query,
        in the index's room thread (10 to 20 ms at 20,000 images: on the
        reactor thread, every client waited that out); a blob that needs
        more goes through memory.  It stops once *gave_up* (asked in that
        thread) says the download no longer waits for it."""
        if self._access.inline is None:
            return succeed(0)
        return Deferred.fromCoroutine(self._make_room(needed, gave_up))

    async def _make_room(self, needed: int, gave_up: Callable[[], bool]) -> int:
        # access times gathered on the reactor are written before choosing
        # (in the room thread too: behind no purge)
        await self._access.flush()
        evictions, freed = await self._access.room(
            partial(_room, self._store, list(self._keep.pins), self._keep.busy(), needed, gave_up)
        )
        for evicted, just_freed in evictions:
            self._log(evicted, "disk full", just_freed)
        if evictions:
            self._removed()
        return freed

    async def purge(
        self,
        upstream: str | None = None,
        repo: str | None = None,
        tag: str | None = None,
        digest: str | None = None,
        fetched_before: float | None = None,
        unused_since: float | None = None,
    ) -> tuple[Removed, int]:
        """:meth:`Index.purge` in the worker thread, and the files deleted
        there: what went, and the bytes freed."""
        await self._access.flush()
        store = self._store

        def purge(index: Index) -> tuple[Removed, int]:
            removed = index.purge(
                upstream, repo, tag, digest, fetched_before, unused_since, batch=PURGE_BATCH
            )
            return removed, _reclaim(store, removed.blobs, index)

        try:
            return await self._access.heavy(purge)
        finally:
            self._removed()

    def _log(self, evicted: Evicted, why: str, freed: int) -> None:
        if not evicted.images:
            return
        first, last = evicted.images[0], evicted.images[-1]
        log.info(
            "evicted {n} images ({why}), {first} to {last}: {bytes} bytes",
            n=len(evicted.images),
            why=why,
            first="{}/{}@{}".format(*first[:3]),
            last="{}/{}@{}".format(*last[:3]),
            bytes=freed,
        )


# -- in the worker thread ------------------------------------------------------


def _batch(
    store: Deletes,
    pins: list[Pin],
    busy: set[str],
    used_before: float | None,
    excess: Callable[[Index], float | None],
    pace: Pace,
    index: Index,
) -> tuple[Evicted, int]:
    """One batch of a sweep, and its files deleted: bytes freed."""
    began = time.perf_counter()
    evicted = index.evict(pins, busy, pace.size, used_before, excess(index))
    pace.took(time.perf_counter() - began, len(evicted.images))
    return evicted, _reclaim(store, evicted.removed.blobs, index)


def _fits(store: Deletes, busy: set[str], needed: int, index: Index) -> bool:
    """Whether *needed* bytes would fit with every image not in use evicted."""
    in_use = index.blob_sizes(busy)
    return needed <= store.room() + index.total_size() - sum(in_use.values())


def _room(
    store: Deletes,
    pins: list[Pin],
    busy: set[str],
    needed: int,
    gave_up: Callable[[], bool],
    index: Index,
) -> tuple[list[tuple[Evicted, int]], int]:
    """Room for *needed* bytes (see :meth:`Evictor.make_room`): each batch
    evicted with the bytes it freed (the last, if any, for loose blobs), and
    all bytes freed."""
    if gave_up() or not _fits(store, busy, needed, index):
        return [], 0
    done: list[tuple[Evicted, int]] = []
    for _ in range(ROOM_STEPS):
        short = needed - store.room()
        if short <= 0 or gave_up():
            break
        evicted = index.evict(pins, busy, ROOM_BATCH, excess=short)
        if not evicted.images:
            break
        done.append((evicted, _reclaim(store, evicted.removed.blobs, index)))
    short = needed - store.room()
    if short > 0 and not gave_up():
        loose = index.evict_loose(busy, short, ROOM_BATCH, window=ROOM_LOOSE_WINDOW)
        if loose:
            done.append(
                (Evicted([], Removed(0, 0, loose), more=False), _reclaim(store, loose, index))
            )
    return done, sum(freed for _, freed in done)


def _loose(store: Deletes, busy: set[str], target: float, index: Index) -> tuple[int, int]:
    """One batch of loose blobs down to *target* bytes: how many, bytes freed."""
    loose = index.evict_loose(busy, index.total_size() - target, LOOSE_BATCH)
    return len(loose), _reclaim(store, loose, index)


def _reclaim(store: Deletes, blobs: Sequence[tuple[str, int]], index: Index) -> int:
    """Delete the files of *blobs* the index forgot, unless one was stored
    again meanwhile (a new download), and take them off its ``reclaim``
    list: bytes freed."""
    freed = 0
    for start in range(0, len(blobs), 500):
        chunk = blobs[start : start + 500]
        back = index.blob_sizes(digest for digest, _ in chunk)
        freed += _unlink(store, [(d, size) for d, size in chunk if d not in back])
        index.reclaimed(digest for digest, _ in chunk)
    return freed


def _replay(store: Deletes, busy: set[str], index: Index) -> int:
    """Delete the files the index forgot and a crash left (its ``reclaim``
    list), but those being downloaded again: bytes freed."""
    freed, after = 0, ""
    while listed := index.to_reclaim(after, 500):
        after = listed[-1]
        freed += _reclaim(store, [(d, 0) for d in listed if d not in busy], index)
    if freed:
        log.info("deleted {freed} bytes of files a crash left behind", freed=freed)
    return freed


def _unlink(store: Deletes, blobs: Sequence[tuple[str, int]]) -> int:
    """Delete files (readers keep their open descriptor): bytes freed."""
    freed = 0
    for digest, recorded in blobs:
        parsed = Digest.parse(digest)
        size = store.stat(parsed)
        if store.delete(parsed):
            freed += size if size is not None else recorded
    return freed
