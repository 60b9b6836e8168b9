"""Stored bytes can rot: check them before trusting them again.

A blob is verified when its download checks out.  After that its file may
still change under regproxy (a bad sector, an operator's editor, a restore
gone wrong), so a stored blob is hashed again on its first read after a
restart, or once its last check is older than ``cache.verify_after``.  It
is sent meanwhile, its last byte held back until the hash checks out (see
:mod:`registryproxy.proxy.sender`): a rotten one's reader is cut off, and
the file goes to quarantine/ and is fetched again on the next try.  In the background a
scrub walks the whole store at ``cache.scrub_rate`` bytes a second (a small
file counted as :data:`FILE_COST`), so that rot is found in blobs nobody
reads too.  Manifests are small and hashed on
every read (:mod:`.manifests`).
"""

from __future__ import annotations

import collections
import os
import threading
import time
from collections.abc import Callable
from functools import partial

import attrs
from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger

from ..names import Digest
from ..runtime import Threads
from ..singleflight import SingleFlight
from .access import IndexAccess
from .fsck import condemn
from .index import Index
from .store import FileStore

log = Logger()

_CHUNK = 1024 * 1024
#: blobs whose last check is remembered (about 100 bytes each)
MAX_CHECKED = 200_000
#: store files asked of the index per page of the scrub's walk
_PAGE = 200
#: seconds the scrub rests after a whole walk of the store
_REST = 600.0
#: bytes of ``scrub_rate`` a file costs at least: a small file's cost is the
#: work per file (its open, thread hand-off and bookkeeping, some of it on
#: the reactor thread), so the rate alone would let a store of small blobs be
#: walked thousands of files a second, slowing every answer meanwhile
FILE_COST = 256 * 1024


class Verifier:
    """When each stored blob was last hashed, and hashing it again when due."""

    def __init__(
        self,
        store: FileStore,
        access: IndexAccess,
        clock: IReactorTime,
        threads: Threads,
        verify_after: float | None,
        remember: int = MAX_CHECKED,
        local_tier: bool = False,
    ) -> None:
        """*local_tier*: the store is a cluster node's local copy of a shared
        store, so a rotten file is only a bad copy: set aside, not forgotten
        by the (shared) index."""
        self._store = store
        self._local_tier = local_tier
        self._remember = remember
        self._access = access
        self._clock = clock
        self._threads = threads
        self._verify_after = verify_after
        #: digest -> when its bytes were last known good (this process only),
        #: oldest first: bounded, as evicted blobs never come back to drop out
        self._checked: collections.OrderedDict[str, float] = collections.OrderedDict()
        self._flight: SingleFlight[str, bool] = SingleFlight()
        #: the scrub's hashes under way, which a client asking lifts to full speed
        self._throttles: dict[str, _Throttle] = {}
        #: set when the process stops: hashing in threads gives up
        self.stopping = threading.Event()

    def close(self) -> None:
        """Stop hashing (threads give up between chunks) and the threads."""
        self.stopping.set()
        self._threads.stop()

    def mark(self, digest: str) -> None:
        """*digest*'s file was just written from bytes that checked out."""
        self._checked_now(digest, self._clock.seconds())

    def _checked_now(self, digest: str, when: float) -> None:
        self._checked[digest] = when
        self._checked.move_to_end(digest)
        while len(self._checked) > self._remember:
            self._checked.popitem(last=False)  # forgotten: hashed again if read

    def forget(self, digest: str) -> None:
        self._checked.pop(digest, None)

    def due(self, digest: str) -> bool:
        checked = self._checked.get(digest)
        if checked is None:
            return True
        return self._verify_after is not None and (
            self._clock.seconds() - checked >= self._verify_after
        )

    async def check(self, digest: Digest, fd: int) -> bool:
        """Whether the file open as *fd* holds *digest*'s bytes; hashed when
        due, once however many readers ask.  A rotten file is quarantined,
        and False tells the caller to fetch the blob again."""
        key = str(digest)
        if not self.due(key):
            return True
        throttle = self._throttles.get(key)
        if throttle is not None:
            throttle.rate = None  # the scrub is on it: a client waits, so at full speed
        return await self._flight.run(key, lambda: self._verify_copy(digest, fd))

    async def _verify_copy(self, digest: Digest, fd: int) -> bool:
        """Hash through a copy of *fd*, taken now: the caller may let go of
        its own (a client that leaves) while the hash reads on."""
        own = os.dup(fd)
        try:
            return await self._verify(digest, own, _Throttle(None))
        finally:
            os.close(own)

    async def scrub_one(self, digest: Digest, rate: int) -> bool:
        """Hash one stored file at most *rate* bytes a second (the scrub)."""
        try:
            fd = os.open(self._store.path(digest), os.O_RDONLY)
        except FileNotFoundError:
            return True  # evicted meanwhile
        key = str(digest)
        throttle = self._throttles[key] = _Throttle(rate)
        try:
            return await self._flight.run(key, lambda: self._verify(digest, fd, throttle))
        finally:
            os.close(fd)
            if self._throttles.get(key) is throttle:
                del self._throttles[key]

    async def condemn(self, digest: Digest) -> None:
        """Quarantine *digest*'s file and forget it (found rotten elsewhere)."""
        self.forget(str(digest))
        store = self._store
        if self._local_tier:
            store.quarantine(digest)
            log.error(
                "quarantined the local copy of {digest}: its bytes do not match", digest=str(digest)
            )
            return
        await self._access.heavy(lambda index: condemn(store, index, str(digest)))

    async def _verify(self, digest: Digest, fd: int, throttle: _Throttle) -> bool:
        started = self._clock.seconds()
        matches = await self._threads.run(
            _hashes_to,
            digest,
            fd,
            throttle,
            self.stopping.is_set,
        )
        if matches is None:
            return True  # stopping: no verdict
        if matches:
            self._checked_now(str(digest), started)
            return True
        await self.condemn(digest)
        return False


@attrs.define
class _Throttle:
    #: bytes a second a hash may read; None: as fast as it can
    rate: int | None


def _hashes_to(
    digest: Digest, fd: int, throttle: _Throttle, stopping: Callable[[], bool]
) -> bool | None:
    """Whether the file's bytes hash to *digest*, read no faster than
    *throttle* says (it may change meanwhile); None if *stopping* said so
    first.  In a worker thread."""
    hasher = digest.hasher()
    offset = 0
    started = time.monotonic()
    while chunk := os.pread(fd, _CHUNK, offset):
        if stopping():
            return None
        hasher.update(chunk)
        offset += len(chunk)
        # behind the rate: wait, looking up now and then (a client may lift it)
        while (rate := throttle.rate) and not stopping():
            ahead = offset / rate - (time.monotonic() - started)
            if ahead <= 0:
                break
            time.sleep(min(ahead, 0.1))
    return hasher.hexdigest() == digest.hex


def _page(after: str, index: Index) -> list[tuple[str, int]]:
    return index.blobs_after(after, _PAGE)


class Scrubber(Service):
    """Walks the store in the background, hashing every file whose check
    is due at a bounded rate, quarantining the rotten ones."""

    def __init__(
        self, verifier: Verifier, access: IndexAccess, clock: IReactorTime, rate: int
    ) -> None:
        self._verifier = verifier
        self._access = access
        self._clock = clock
        self._rate = rate
        self._walk: Deferred[None] | None = None
        #: files hashed and found rotten since start, for tests and logs
        self.scrubbed = 0
        self.rotten = 0

    def startService(self) -> None:
        super().startService()
        self._verifier.stopping.clear()
        self._walk = Deferred.fromCoroutine(self._run())
        self._walk.addErrback(
            lambda f: None if f.check(CancelledError) else log.failure("the scrub stopped", f)
        )

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        self._verifier.stopping.set()
        walk, self._walk = self._walk, None
        if walk is not None:
            walk.cancel()
        return None

    async def _run(self) -> None:
        cursor = ""
        while self.running:
            page = await self._access.heavy(partial(_page, cursor))
            if not page:
                log.info(
                    "scrub walked the store: {n} files hashed, {bad} rotten",
                    n=self.scrubbed,
                    bad=self.rotten,
                )
                cursor = ""
                await deferLater(self._clock, _REST, lambda: None)
                continue
            for digest, _ in page:
                cursor = digest
                if not self.running:
                    return
                if not self._verifier.due(digest):
                    continue
                started = self._clock.seconds()
                good = await self._verifier.scrub_one(Digest.parse(digest), self._rate)
                self.scrubbed += 1
                self.rotten += not good
                # a large file was read at the rate; a small one waits for its FILE_COST
                rest = FILE_COST / self._rate - (self._clock.seconds() - started)
                if rest > 0:
                    await deferLater(self._clock, rest, lambda: None)
