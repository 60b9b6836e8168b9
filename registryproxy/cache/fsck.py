"""Re-hash the blob store: quarantine what does not match its digest.

Bytes on disk can rot (bad sectors, an operator's editor, a restore gone
wrong) long after they were verified.  The hashing, and the comparison of
the store with the index, run in a child process (:mod:`.scan`): in a
thread they held the GIL and every client waited.  What it finds out of
line is mended afterwards in the index's worker thread, in batches.
A scan that says nothing for :data:`STALL_SECONDS` (it says ``going``
once a second) is given up: a disk that does not answer fails the fsck
rather than holding it, and every later one, for ever.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections import deque
from contextlib import suppress
from functools import partial

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone, ProcessExitedAlready
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from ..names import Digest, is_valid_digest
from ..runtime import IReactor
from .access import IndexAccess
from .index import Index
from .store import FileStore

log = Logger()

#: index rows written per transaction (and per turn of the worker thread)
_BATCH = 500
#: the longest line the scan writes (a digest's algorithm and hex, a size)
_LONGEST_LINE = 512
#: a scan silent this long is stuck (a MiB it cannot read): killed, the fsck failed
STALL_SECONDS = 60.0
#: the scan's start, given regproxy's sys.path (argv[1]) and the scan's arguments
_BOOT = (
    "import json, runpy, sys; sys.path[:] = json.loads(sys.argv.pop(1));"
    " runpy.run_module('registryproxy.cache.scan', run_name='__main__', alter_sys=True)"
)


@attrs.frozen
class FsckReport:
    checked: int
    bytes_checked: int
    #: digests whose bytes did not match, moved to quarantine/
    quarantined: tuple[str, ...]
    #: files that were in the store but not in the index, now indexed
    indexed: tuple[str, ...]
    #: index entries whose file was gone, now forgotten
    forgotten: tuple[str, ...]


class ScanFailed(Exception):
    """The scan's child process failed; nothing was mended."""


@attrs.define
class _Found:
    """What the scan found out of line (see :mod:`.scan`)."""

    rotten: list[str] = attrs.Factory(list)
    unindexed: list[tuple[str, int]] = attrs.Factory(list)
    missing: list[str] = attrs.Factory(list)
    #: (files, bytes), once the scan went to its end
    checked: tuple[int, int] | None = None


class _Scan(ProcessProtocol):
    """Reads the scan's lines as they come (a pipe's read at a time: the
    reactor parses a few hundred lines a turn, however big the store)."""

    def __init__(self, clock: IReactorTime, stall: float = STALL_SECONDS) -> None:
        self.found = _Found()
        self.done: Deferred[_Found] = Deferred()
        self._partial = b""
        self._errors: deque[bytes] = deque(maxlen=8)
        self._wrong: str | None = None
        self._clock = clock
        self._stall = stall
        self._deadline: IDelayedCall | None = None

    def connectionMade(self) -> None:
        self._deadline = self._clock.callLater(self._stall, self._stalled)

    def _stalled(self) -> None:
        self._fail(f"it said nothing for {self._stall:g} s (a disk that does not answer?)")

    def outReceived(self, data: bytes) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.reset(self._stall)
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        if len(self._partial) > _LONGEST_LINE:
            self._fail("a line too long")
        for line in lines:
            if self._wrong is None:
                self._line(line.decode("ascii", "replace").split(" "))

    def _line(self, words: list[str]) -> None:
        kind, digest = words[0], words[1] if len(words) > 1 else ""
        if kind == "checked" and len(words) == 3 and all(w.isdigit() for w in words[1:]):
            self.found.checked = (int(words[1]), int(words[2]))
        elif words == ["going"]:
            pass
        elif not is_valid_digest(digest):
            self._fail(f"an unexpected line: {' '.join(words)[:80]!r}")
        elif kind == "rotten" and len(words) == 2:
            self.found.rotten.append(digest)
        elif kind == "missing" and len(words) == 2:
            self.found.missing.append(digest)
        elif kind == "unindexed" and len(words) == 3 and words[2].isdigit():
            self.found.unindexed.append((digest, int(words[2])))
        else:
            self._fail(f"an unexpected line: {' '.join(words)[:80]!r}")

    def _fail(self, why: str) -> None:
        """Kill the scan and fail at once: a process stuck in a disk's read
        ends only when the read does."""
        if self._wrong is None:
            self._wrong = why
            self.stop()
            self.done.errback(ScanFailed(f"fsck's scan of the store failed: {why}"))

    def errReceived(self, data: bytes) -> None:
        """What the scan says of files it cannot read, into regproxy's log."""
        said = data[-1024:]
        self._errors.append(said)
        log.warn("fsck's scan: {said}", said=said.decode("utf-8", "replace").strip())

    def stop(self) -> None:
        """Kill the scan (regproxy stops, or its output makes no sense)."""
        with suppress(ProcessExitedAlready):
            self.transport.signalProcess("KILL")  # type: ignore[union-attr]

    def processEnded(self, reason: Failure) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        if self._wrong is not None:
            return  # failed already
        if reason.check(ProcessDone) and self.found.checked is not None:
            self.done.callback(self.found)
            return
        said = b"".join(self._errors).decode("utf-8", "replace").strip()[-1024:]
        why = f"{reason.getErrorMessage()}{': ' + said if said else ''}"
        self.done.errback(ScanFailed(f"fsck's scan of the store failed: {why}"))


def _modules() -> list[str]:
    """Where regproxy's modules come from, for the scan to import the same:
    this package's directory first, then sys.path less the working directory
    (``""``: the scan's may be another's)."""
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return [here, *(os.path.abspath(p) for p in sys.path if p)]


def scan(reactor: IReactor, root: str, index: str, started: float) -> Deferred[_Found]:
    """Run the scan of the store at *root* against the *index* file in a
    child process; killed if regproxy stops first."""
    protocol = _Scan(reactor, STALL_SECONDS)
    reactor.spawnProcess(
        protocol,
        sys.executable,
        [
            sys.executable,
            "-I",  # neither the environment's PYTHON* nor the working directory
            "-c",
            _BOOT,
            json.dumps(_modules()),
            root,
            index,
            repr(started),
            str(os.getpid()),
        ],
        # (no working directory of its own: Twisted would then fork this big
        # process rather than posix_spawn it, 15 to 26 ms of the reactor's
        # time rather than 2 to 6 with 130 MB of objects)
        env=os.environ,
    )
    trigger = reactor.addSystemEventTrigger("before", "shutdown", protocol.stop)

    def ended(result: _Found | Failure) -> _Found | Failure:
        reactor.removeSystemEventTrigger(trigger)
        return result

    return protocol.done.addBoth(ended)


def condemn(store: FileStore, index: Index, digest: str) -> None:
    """A stored file whose bytes do not match *digest*: into quarantine/,
    and out of the index (in the index's worker thread)."""
    store.quarantine(Digest.parse(digest))
    forget_rotten(store, index, digest)


def forget_rotten(store: FileStore, index: Index, digest: str) -> None:
    """Forget a quarantined file: any manifest with these bytes is gone
    too, with the blobs only it listed; the next pull fetches them again."""
    orphans = [orphan for orphan, _ in index.purge(digest=digest).blobs]
    for orphan in orphans:
        if orphan != digest:
            store.delete(Digest.parse(orphan))
    index.reclaimed(orphans)  # deleted, or the rotten one quarantined
    index.forget_blob(digest)
    log.error("quarantined {digest}: its bytes do not match", digest=digest)


async def fsck(store: FileStore, access: IndexAccess, reactor: IReactor) -> FsckReport:
    started = time.time()
    path = await access.quick(lambda index: index.path)
    found = await scan(reactor, store.root, path, started)
    assert found.checked is not None
    # every rotten file is kept before any is purged: purging a manifest
    # deletes the blobs only it lists, rotten ones among them
    await access.heavy(partial(_quarantine, store, found.rotten))
    indexed: list[str] = []
    for start in range(0, len(found.unindexed), _BATCH):
        step = found.unindexed[start : start + _BATCH]
        indexed += await access.heavy(partial(_index, store, step))
    forgotten: list[str] = []
    for start in range(0, len(found.missing), _BATCH):
        gone = found.missing[start : start + _BATCH]
        forgotten += await access.heavy(partial(_forget, store, gone))
    return FsckReport(
        checked=found.checked[0],
        bytes_checked=found.checked[1],
        quarantined=tuple(found.rotten),
        indexed=tuple(indexed),
        forgotten=tuple(forgotten),
    )


def _quarantine(store: FileStore, rotten: list[str], index: Index) -> None:
    for digest in rotten:
        store.quarantine(Digest.parse(digest))
    for digest in rotten:
        forget_rotten(store, index, digest)


def _index(store: FileStore, files: list[tuple[str, int]], index: Index) -> list[str]:
    """Index the files the index did not know, still there and still unknown."""
    known = index.blob_sizes(digest for digest, _ in files)
    now = time.time()
    rows = [
        (digest, size, now)
        for digest, size in files
        if digest not in known and store.stat(Digest.parse(digest)) is not None
    ]
    index.put_blobs(rows)
    return [digest for digest, _, _ in rows]


def _forget(store: FileStore, digests: list[str], index: Index) -> list[str]:
    """Forget the rows whose file is still gone (one may have come back since)."""
    gone = [digest for digest in digests if store.stat(Digest.parse(digest)) is None]
    index.forget_blobs(gone)
    return gone
