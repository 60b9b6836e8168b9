"""Keeping the store within its disk budget, least recently used first.

The unit of eviction is a manifest (with the platform manifests of an index)
and the blobs that only it lists: a blob another cached manifest lists stays.
Pinned images are never evicted.  A file being served is unlinked, not cut:
readers keep their open descriptor until they finish.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from ..names import Digest
from .index import Index
from .store import BlobStore

log = Logger()

Pin = tuple[str, str, "str | None", "str | None"]


class Evictor:
    def __init__(
        self,
        index: Index,
        store: BlobStore,
        clock: IReactorTime,
        max_bytes: int | None,
        low_water: float = 0.9,
        max_idle: float | None = None,
        pins: Sequence[Pin] = (),
    ) -> None:
        self._index = index
        self._store = store
        self._clock = clock
        self.max_bytes = max_bytes
        self._low_water = low_water
        self._max_idle = max_idle
        self.pins: list[Pin] = list(pins)
        #: the blobs being read or downloaded now (set by the blob cache):
        #: an image with one of them is not evicted, as that frees nothing yet
        self.in_use: Callable[[], Collection[str]] = frozenset
        self._scheduled = False

    def soon(self) -> None:
        """Check the budget shortly (after a blob was stored), once however
        many blobs arrive meanwhile."""
        if self.max_bytes is None or self._scheduled:
            return
        self._scheduled = True

        def run() -> None:
            self._scheduled = False
            self.sweep()

        self._clock.callLater(0, run)

    def sweep(self) -> int:
        """Remove idle images, then evict until within budget; bytes freed."""
        freed = 0
        if self._max_idle is not None:
            cutoff = self._clock.seconds() - self._max_idle
            freed += self._evict(lambda used: used < cutoff, "idle")
        if self.max_bytes is not None and self._index.total_size() > self.max_bytes:
            target = self.max_bytes * self._low_water
            freed += self._evict(lambda _: self._index.total_size() > target, "over budget")
            freed += self._evict_loose(self._index.total_size() - target)
        return freed

    def make_room(self, needed: int) -> int:
        """Evict least recently used images until a new blob of *needed*
        bytes fits on the disk, so that with no budget set (or a disk shared
        with others) a full disk still caches what is pulled now instead of
        freezing with what was pulled first.  Bytes freed."""
        busy = self._index.blob_sizes(self.in_use())
        if needed > self._store.room() + self._index.total_size() - sum(busy.values()):
            return 0  # it would not fit with the whole cache gone
        freed = self._evict(lambda _: self._store.room() < needed, "disk full")
        room = self._store.room()
        if room < needed:
            freed += self._evict_loose(needed - room)
        return freed

    def _evict(self, wanted: Callable[[float], bool], why: str) -> int:
        """Evict least recently used first, while *wanted* says so of the next one."""
        freed = 0
        pinned = self._index.pinned(self.pins)
        busy = set(self.in_use())
        gone: set[tuple[str, str, str]] = set()
        for upstream, repo, digest, used in self._index.least_recently_used():
            if (upstream, repo, digest) in pinned or (upstream, repo, digest) in gone:
                continue
            if not wanted(used):
                break
            family = self._index.family(upstream, repo, [digest])
            if any((upstream, repo, d) in pinned for d in family):
                continue
            if busy and any(child in busy for d in family for child, _ in self._index.refs(d)):
                continue
            removed = self._index.purge(upstream=upstream, repo=repo, digest=digest)
            gone.update((upstream, repo, d) for d in family)
            just_freed = self._delete(removed.blobs)
            freed += just_freed
            log.info(
                "evicted {upstream}/{repo}@{digest} ({why}): {bytes} bytes",
                upstream=upstream,
                repo=repo,
                digest=digest,
                why=why,
                bytes=just_freed,
            )
        return freed

    def _evict_loose(self, excess: float) -> int:
        freed = 0
        busy = set(self.in_use())
        for digest, size in self._index.loose_blobs():
            if excess - freed <= 0:
                break
            if digest in busy:
                continue
            self._index.forget_blob(digest)
            freed += self._delete([(digest, size)])
        return freed

    def _delete(self, blobs: Sequence[tuple[str, int]]) -> int:
        freed = 0
        for digest, recorded in blobs:
            parsed = Digest.parse(digest)
            size = self._store.stat(parsed)
            if self._store.delete(parsed):
                freed += size if size is not None else recorded
        return freed
