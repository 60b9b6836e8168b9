"""Purges asked through the admin API: the selector checked, then the
cache's own deletion (:meth:`~..cache.eviction.Evictor.purge`) run, and on a
cluster every node made to forget what it answered from memory."""

from __future__ import annotations

from typing import Protocol

import attrs
from twisted.logger import Logger

from ..cache.access import IndexAccess
from ..cache.eviction import Evictor
from ..cache.index import Page
from ..cache.manifests import ManifestCache
from ..names import is_valid_digest
from ..upstream.registry import Upstreams
from .backend import AdminError, PurgeResult, PurgeSelector

log = Logger()


class ClusterForgetting(Protocol):
    async def forget_everywhere(self, after_removal: bool = False) -> None:
        """Make every live node drop the answers it keeps in memory;
        *after_removal*: this node just removed something."""


class Purge:
    def __init__(
        self,
        evictor: Evictor,
        access: IndexAccess,
        upstreams: Upstreams,
        manifests: ManifestCache,
        cluster: ClusterForgetting | None = None,
    ) -> None:
        """*evictor*: what owns deleting from the cache; *access*: to tell an
        upstream no longer configured that still has something cached from a
        name that is no upstream's; *manifests*: those being cached in the
        background, which a cluster's purge waits for."""
        self._evictor = evictor
        self._access = access
        self._upstreams = upstreams
        self._manifests = manifests
        self._cluster = cluster

    async def purge(self, selector: PurgeSelector) -> PurgeResult:
        s = selector
        if s.upstream is not None:
            s = attrs.evolve(s, upstream=self._upstreams.canonical(s.upstream))
        _check(s)
        if s.upstream is not None:
            await self._known_upstream(s.upstream)
        if self._cluster is not None:
            # manifests being written to the cluster (answered before they
            # were) land first, so that the purge finds them
            await self._manifests.settle()
            await self._cluster.forget_everywhere()
        # in the index's worker thread; readers already streaming keep their
        # open file: never cut off
        removed, freed = await self._evictor.purge(
            upstream=s.upstream,
            repo=s.repository,
            tag=s.tag,
            digest=s.digest,
            fetched_before=s.older_than,
            unused_since=s.unused_since,
        )
        if self._cluster is not None:  # a MISS on every node once this answers
            await self._cluster.forget_everywhere(after_removal=True)
        log.info(
            "purged {manifests} manifests, {tags} tags, {blobs} files ({bytes} bytes)",
            manifests=removed.manifests,
            tags=removed.tags,
            blobs=len(removed.blobs),
            bytes=freed,
        )
        return PurgeResult(
            removed.tags, removed.manifests, tuple(d for d, _ in removed.blobs), freed
        )

    async def _known_upstream(self, name: str) -> None:
        if name in self._upstreams.configs:
            return
        # one repository says it is known: not a listing of all of them
        first = Page(limit=1)
        if not await self._access.heavy(lambda index: index.repository_summaries(name, first)):
            raise AdminError(400, f"unknown upstream {name!r}")


def _check(s: PurgeSelector) -> None:
    """AdminError(400) for a selector that selects nothing sensible."""
    narrowed = any(
        v is not None
        for v in (s.upstream, s.repository, s.tag, s.digest, s.older_than, s.unused_since)
    )
    if not narrowed and not s.everything:
        raise AdminError(400, "say what to purge, or everything=true for the whole cache")
    if s.everything and narrowed:
        raise AdminError(400, "everything=true cannot be combined with other selectors")
    if (s.tag or s.digest) and not (s.upstream and s.repository):
        raise AdminError(400, "a tag or digest needs its upstream and repository")
    if s.tag and s.digest:
        raise AdminError(400, "give a tag or a digest, not both")
    if s.repository and not s.upstream:
        raise AdminError(400, "a repository needs its upstream")
    if s.digest is not None and not is_valid_digest(s.digest):
        raise AdminError(400, f"invalid digest {s.digest!r}")
