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
    checked <files> <bytes>     the last line: the scan went to its end

Usage: ``python -m registryproxy.cache.scan ROOT INDEX STARTED``.
"""

from __future__ import annotations

import os
import sqlite3
import sys
from collections.abc import Iterator
from typing import TextIO
from urllib.parse import quote

from ..names import ALGORITHMS, is_valid_digest

_CHUNK = 1 << 20
#: files between two looks at whether regproxy is still there
_FILES_PER_LOOK = 256


def files(root: str) -> Iterator[tuple[str, str]]:
    """``(digest, path)`` of every blob file under *root*'s blobs/."""
    blobs = os.path.join(root, "blobs")
    for algorithm in sorted(os.listdir(blobs)) if os.path.isdir(blobs) else []:
        if algorithm not in ALGORITHMS:
            continue
        for dirpath, _, names in os.walk(os.path.join(blobs, algorithm)):
            for name in sorted(names):
                digest = f"{algorithm}:{name}"
                if is_valid_digest(digest):
                    yield digest, os.path.join(dirpath, name)


def hashed(digest: str, path: str) -> tuple[int, bool] | None:
    """``(size, whether the bytes match)``; None if the file went meanwhile."""
    algorithm, expected = digest.split(":", 1)
    hasher = ALGORITHMS[algorithm]()
    size = 0
    try:
        with open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                hasher.update(chunk)
                size += len(chunk)
    except FileNotFoundError:
        return None  # evicted or purged meanwhile
    return size, hasher.hexdigest() == expected


def scan(root: str, index_path: str, started: float, out: TextIO) -> None:
    parent = os.getppid()
    #: the size of every file whose bytes match; rotten ones are only seen
    sizes: dict[str, int] = {}
    seen: set[str] = set()
    total = 0
    for count, (digest, path) in enumerate(files(root)):
        if count % _FILES_PER_LOOK == 0 and os.getppid() != parent:
            raise SystemExit("regproxy went away: the scan stops")
        result = hashed(digest, path)
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


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print("usage: python -m registryproxy.cache.scan ROOT INDEX STARTED", file=sys.stderr)
        return 2
    root, index, started = argv[0], argv[1], float(argv[2])
    try:
        os.nice(10)  # background work: regproxy's clients come first
    except OSError:
        pass
    scan(root, index, started, sys.stdout)
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
