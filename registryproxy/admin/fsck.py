"""fsck through the admin API: one at a time, and only where the store is a
single node's own files."""

from __future__ import annotations

from ..cache.access import IndexAccess
from ..cache.fsck import ScanFailed, fsck
from ..cache.store import BlobStore, FileStore
from ..runtime import IReactor
from .backend import AdminError, FsckResult


class Fsck:
    def __init__(
        self, store: BlobStore, access: IndexAccess, reactor: IReactor, clustered: bool = False
    ) -> None:
        """*clustered*: this node is one of a cluster's (its disk only a
        local copy of the bucket)."""
        self._store = store
        self._access = access
        self._reactor = reactor
        self._clustered = clustered
        self._running = False

    async def fsck(self) -> FsckResult:
        if not isinstance(self._store, FileStore) or self._clustered:
            raise AdminError(
                409,
                "fsck checks a single node's file store; a cluster node's disk is only a "
                "local copy of the bucket",
            )
        if self._running:
            raise AdminError(409, "an fsck is already running")
        self._running = True
        try:
            return await fsck(self._store, self._access, self._reactor)
        except ScanFailed as e:
            raise AdminError(500, str(e)) from None
        finally:
            self._running = False
