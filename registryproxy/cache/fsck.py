"""Re-hash the blob store: quarantine what does not match its digest.

Bytes on disk can rot (bad sectors, an operator's editor, a restore gone
wrong) long after they were verified.  The hashing runs in a thread; the
index is updated afterwards in the index's worker thread, in batches.
"""

from __future__ import annotations

import os
import time

import attrs
from twisted.logger import Logger

from ..names import ALGORITHMS, Digest, is_valid_digest
from .access import IndexAccess
from .index import Index
from .store import FileStore

log = Logger()

_CHUNK = 1 << 20
#: index rows written per transaction
_BATCH = 500


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


def _scan(root: str) -> list[tuple[str, int, bool]]:
    """``(digest, size, matches)`` for every file under blobs/."""
    found = []
    blobs = os.path.join(root, "blobs")
    for algorithm in sorted(os.listdir(blobs)) if os.path.isdir(blobs) else []:
        if algorithm not in ALGORITHMS:
            continue
        for dirpath, _, files in os.walk(os.path.join(blobs, algorithm)):
            for name in sorted(files):
                digest = f"{algorithm}:{name}"
                if not is_valid_digest(digest):
                    continue
                hasher = ALGORITHMS[algorithm]()
                size = 0
                try:
                    with open(os.path.join(dirpath, name), "rb") as f:
                        while chunk := f.read(_CHUNK):
                            hasher.update(chunk)
                            size += len(chunk)
                except FileNotFoundError:
                    continue  # evicted or purged meanwhile
                found.append((digest, size, hasher.hexdigest() == name))
    return found


def condemn(store: FileStore, index: Index, digest: str) -> None:
    """A stored file whose bytes do not match *digest*: into quarantine/,
    and out of the index (in the index's worker thread)."""
    store.quarantine(Digest.parse(digest))
    forget_rotten(store, index, digest)


def forget_rotten(store: FileStore, index: Index, digest: str) -> None:
    """Forget a quarantined file: any manifest with these bytes is gone
    too, with the blobs only it listed; the next pull fetches them again."""
    for orphan, _ in index.purge(digest=digest).blobs:
        if orphan != digest:
            store.delete(Digest.parse(orphan))
    index.forget_blob(digest)
    log.error("quarantined {digest}: its bytes do not match", digest=digest)


async def fsck(store: FileStore, access: IndexAccess) -> FsckReport:
    started = time.time()
    found = await store.threads.run(_scan, store.root)
    return await access.heavy(lambda index: _reconcile(store, index, found, started))


def _reconcile(
    store: FileStore, index: Index, found: list[tuple[str, int, bool]], started: float
) -> FsckReport:
    """Bring the index in line with what the scan *found* (in the worker thread)."""
    quarantined: list[str] = []
    indexed: list[tuple[str, int, float]] = []
    on_disk = set()
    known = index.blob_sizes(digest for digest, _, _ in found)
    for digest, size, matches in found:
        if matches:
            on_disk.add(digest)
            if digest not in known and store.stat(Digest.parse(digest)) is not None:
                indexed.append((digest, size, time.time()))
    rotten = [digest for digest, _, matches in found if not matches]
    # every rotten file is kept before any is purged: purging a manifest
    # deletes the blobs only it lists, rotten ones among them
    for digest in rotten:
        store.quarantine(Digest.parse(digest))
    for digest in rotten:
        forget_rotten(store, index, digest)
        quarantined.append(digest)
    for start in range(0, len(indexed), _BATCH):
        index.put_blobs(indexed[start : start + _BATCH])
    # entries stored after the scan began were not scanned: leave them be
    gone = on_disk.union(quarantined)
    forgotten = [d for d in index.all_blobs(started) if d not in gone]
    for start in range(0, len(forgotten), _BATCH):
        index.forget_blobs(forgotten[start : start + _BATCH])
    return FsckReport(
        checked=len(found),
        bytes_checked=sum(size for _, size, _ in found),
        quarantined=tuple(quarantined),
        indexed=tuple(d for d, _, _ in indexed),
        forgotten=tuple(forgotten),
    )
