"""fsck's scan of a single node's store, run as a child process.

Hashing every file and comparing the store with the index is Python work
that grows with the cache.  In a thread of regproxy's own process it held
the GIL, and every client of the proxy waited for it in slices of the
interpreter's switch interval (a cached manifest's p99 went from 1 to 29 ms
over 50,000 files).  This process reads the store and the index file
(read-only, beside regproxy's writers: WAL), at a lower priority, and writes only what
is out of line, a line each, for regproxy to mend::

    rotten <digest>             a file whose bytes do not match its digest
    unindexed <digest> <size>   a file the index does not know
    missing <digest>            a row stored before *started* whose file is gone
    going                       once a second while it reads: it is not stuck
    checked <files> <bytes>     the last line: the scan went to its end

Usage: ``python -m registryproxy.cache.scan ROOT INDEX STARTED PARENT``,
PARENT being regproxy's process id: the scan ends if regproxy does.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sqlite3
import sys
import time
from collections.abc import Callable, Iterator
from typing import TextIO
from urllib.parse import quote

from ..names import ALGORITHMS, is_valid_digest

_CHUNK = 1 << 20
#: how often the scan says it goes on (regproxy kills one silent for long)
BEAT_SECONDS = 1.0
#: Linux's prctl option that signals a process when its parent dies
_PR_SET_PDEATHSIG = 1


def files(root: str) -> Iterator[tuple[str, str]]:
    """``(digest, path)`` of every blob file where the store keeps it
    (blobs/ALGORITHM/HEX[:2]/HEX): a copy elsewhere is not the blob, and
    what is not a regular file (a FIFO would block the scan) is skipped."""
    blobs = os.path.join(root, "blobs")
    for algorithm in sorted(_names(blobs)):
        if algorithm not in ALGORITHMS:
            continue
        for shard in sorted(_names(os.path.join(blobs, algorithm))):
            where = os.path.join(blobs, algorithm, shard)
            for entry in sorted(_entries(where), key=lambda e: e.name):
                digest = f"{algorithm}:{entry.name}"
                if (
                    entry.name[:2] == shard
                    and is_valid_digest(digest)
                    and entry.is_file(follow_symlinks=False)
                ):
                    yield digest, entry.path


def _names(path: str) -> list[str]:
    return [entry.name for entry in _entries(path)]


def _entries(path: str) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(path) as entries:
            return list(entries)
    except (FileNotFoundError, NotADirectoryError):
        return []


class Watch:
    """Called before each file and each MiB: stops the scan if regproxy is
    gone (where the kernel did not already say so), and says ``going`` once
    a second, for regproxy to tell a long scan from a disk that does not
    answer."""

    def __init__(self, parent: int, out: TextIO, now: Callable[[], float] = time.monotonic) -> None:
        self._parent = parent
        self._out = out
        self._now = now
        self._said = now()

    def __call__(self) -> None:
        if os.getppid() != self._parent:
            raise SystemExit("regproxy went away: the scan stops")
        if self._now() - self._said >= BEAT_SECONDS:
            self._out.write("going\n")
            self._out.flush()  # (a pipe's stdout is kept in a buffer)
            self._said = self._now()


def hashed(digest: str, path: str, watch: Callable[[], None]) -> tuple[int, bool] | None:
    """``(size, whether the bytes match)``; None if the file went meanwhile.
    A file that cannot be read (a bad sector) does not match."""
    algorithm, expected = digest.split(":", 1)
    hasher = ALGORITHMS[algorithm]()
    size = 0
    try:
        with open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                watch()
                hasher.update(chunk)
                size += len(chunk)
    except FileNotFoundError:
        return None  # evicted or purged meanwhile
    except OSError as e:
        print(f"cannot read {digest}: {e.strerror}", file=sys.stderr)
        return size, False
    return size, hasher.hexdigest() == expected


def scan(
    root: str, index_path: str, started: float, out: TextIO, watch: Callable[[], None]
) -> None:
    #: the size of every file whose bytes match; rotten ones are only seen
    sizes: dict[str, int] = {}
    seen: set[str] = set()
    total = 0
    for digest, path in files(root):
        watch()
        result = hashed(digest, path, watch)
        if result is None:
            continue
        size, matches = result
        seen.add(digest)
        total += size
        if matches:
            sizes[digest] = size
        else:
            out.write(f"rotten {digest}\n")
    index = sqlite3.connect(f"file:{quote(index_path)}?mode=ro", uri=True)
    try:
        known: dict[str, float] = dict(index.execute("SELECT digest, stored_at FROM blobs"))
    finally:
        index.close()
    for digest, size in sizes.items():
        if digest not in known:
            out.write(f"unindexed {digest} {size}\n")
    for digest, stored_at in known.items():
        # a row stored after the scan began may name a file it did not see
        if stored_at < started and digest not in seen:
            out.write(f"missing {digest}\n")
    out.write(f"checked {len(seen)} {total}\n")


def _die_with_parent() -> None:
    """Have the kernel kill this process when regproxy dies (Linux)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass  # elsewhere: the look before each file and each MiB


def main(argv: list[str]) -> int:
    if len(argv) != 4:
        print(
            "usage: python -m registryproxy.cache.scan ROOT INDEX STARTED PARENT", file=sys.stderr
        )
        return 2
    root, index, started, parent = argv[0], argv[1], float(argv[2]), int(argv[3])
    _die_with_parent()
    watch = Watch(parent, sys.stdout)
    watch()  # (regproxy may have died before the line above)
    try:
        os.nice(10)  # background work: regproxy's clients come first
    except OSError:
        pass
    scan(root, index, started, sys.stdout, watch)
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
