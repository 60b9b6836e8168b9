"""A cluster's shared copy of the cache, behind each node's local disk.

In a cluster every stored blob and manifest lives in one shared store (an S3
bucket, :class:`~registryproxy.cluster.bucket.Bucket`) and its row in the
shared index; a node's own ``cache.directory`` is a bounded local tier of it:
what the node downloaded or read lately, kept for sendfile.  The cache logic
is the same as a single node's: a local file is served only while the index
has its row (or while this node is still publishing it), a blob the index
has but the disk does not is streamed from the shared store into the local
tier, through the same checked download as an upstream's.

:class:`LocalTier` keeps the local tier within its budget, least recently
used first, in a thread: its cost grows with the tier, which is bounded,
never with the cluster's cache.
"""

from __future__ import annotations

import os
from collections.abc import Collection
from typing import Any, Protocol

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from ..names import Digest, is_valid_digest
from ..runtime import IReactor
from .store import FileStore

log = Logger()


class SharedStore(Protocol):
    """Verified content by digest, shared by the nodes of a cluster."""

    async def stream(self, digest: Digest) -> Any:
        """The stored bytes as a response body (``length``, ``deliverBody``);
        raises LookupError if there is no such object."""

    async def get(self, digest: Digest) -> bytes | None:
        """A small object (a manifest) whole; None if absent."""

    async def upload(self, digest: Digest, path: str, size: int) -> None:
        """Publish the verified local file at *path* under *digest*."""

    def presigned(self, digest: Digest) -> Deferred[str]:
        """A URL that GETs the object without credentials, for a while."""

    def delete_now(self, digest: Digest) -> None:
        """Delete the object, synchronously: for eviction's worker thread."""


class SharedDeletion:
    """What eviction and purge delete in a cluster, from the worker thread
    that chose it: the shared object, and this node's local copy (other
    nodes' copies are no longer the cache's once the index forgot them, and
    their local tiers drop them in time).  Sizes come from the index."""

    def __init__(self, shared: SharedStore, local: FileStore) -> None:
        self._shared = shared
        self._local = local

    def stat(self, digest: Digest) -> int | None:
        return None

    def delete(self, digest: Digest) -> bool:
        self._local.delete(digest)
        try:
            self._shared.delete_now(digest)
        except Exception as e:  # left behind: never served without its index row
            log.error(
                "cannot delete {digest} from the cluster's store: {why}", digest=str(digest), why=e
            )
            return False
        return True

    def room(self) -> int:
        return self._local.room()


class LocalTier:
    """Keeps a node's local copies within *max_bytes*: the files not read
    for longest go first, never one in use (being read, downloaded, or
    published to the shared store)."""

    def __init__(
        self,
        store: FileStore,
        max_bytes: int,
        threadpool: ThreadPool,
        reactor: IReactor,
    ) -> None:
        self._store = store
        self.max_bytes = max_bytes
        self._threadpool = threadpool
        self._reactor = reactor
        #: when this node last served each local file (else its mtime counts)
        self._read_at: dict[str, float] = {}

    def served(self, digest: str, when: float) -> None:
        if len(self._read_at) > 100_000:  # bounded: forgotten ones fall back to mtime
            self._read_at.clear()
        self._read_at[digest] = when

    def trim(self, in_use: Collection[str]) -> Deferred[int]:
        """Delete the least recently used local files over the budget, but
        those *in_use*: bytes freed."""
        busy = set(in_use)
        read_at = dict(self._read_at)
        return deferToThreadPool(
            self._reactor, self._threadpool, _trim, self._store, self.max_bytes, busy, read_at
        )


def _trim(store: FileStore, max_bytes: int, busy: set[str], read_at: dict[str, float]) -> int:
    files = []
    total = 0
    top = os.path.join(store.root, "blobs")
    for algorithm in _listdir(top):
        for prefix in _listdir(os.path.join(top, algorithm)):
            directory = os.path.join(top, algorithm, prefix)
            for name in _listdir(directory):
                digest = f"{algorithm}:{name}"
                if not is_valid_digest(digest):
                    continue
                try:
                    st = os.stat(os.path.join(directory, name))
                except FileNotFoundError:
                    continue
                total += st.st_size
                files.append((max(st.st_mtime, read_at.get(digest, 0.0)), digest, st.st_size))
    freed = 0
    files.sort()
    for _, digest, size in files:
        if total - freed <= max_bytes:
            break
        if digest in busy:
            continue
        if store.delete(Digest.parse(digest)):
            freed += size
    if freed:
        log.info("local tier: dropped {bytes} bytes of local copies", bytes=freed)
    return freed


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except FileNotFoundError:
        return []
