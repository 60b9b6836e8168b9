"""What is cached, as the admin API lists it: repositories and their sizes
(one query for the whole listing), and one repository in detail."""

from __future__ import annotations

from functools import partial

from ..cache.access import IndexAccess
from ..cache.index import Index
from ..upstream.registry import Upstreams
from .backend import (
    AdminError,
    BlobInfo,
    ManifestInfo,
    RepositoryDetail,
    RepositorySummary,
    TagInfo,
)


class Listing:
    def __init__(self, access: IndexAccess, upstreams: Upstreams, tag_ttl: float) -> None:
        """*tag_ttl*: how long a tag is trusted, for upstreams that set none."""
        self._access = access
        self._upstreams = upstreams
        self._tag_ttl = tag_ttl

    async def repositories(self, upstream: str | None = None) -> list[RepositorySummary]:
        """Raises AdminError(404) for an upstream neither configured nor cached."""
        if upstream is not None:
            upstream = self._upstreams.canonical(upstream)
        rows = await self._access.heavy(lambda index: index.repository_summaries(upstream))
        if not rows and upstream is not None and upstream not in self._upstreams.configs:
            raise AdminError(404, f"unknown upstream {upstream!r}")
        return [
            RepositorySummary(r.upstream, r.repo, r.tags, r.manifests, r.size, r.last_access)
            for r in rows
        ]

    async def repository(self, upstream: str, repository: str) -> RepositoryDetail:
        upstream = self._upstreams.canonical(upstream)
        ttl = self._ttl(upstream)
        detail = await self._access.heavy(partial(_detail, upstream, repository, ttl))
        if detail is None:
            raise AdminError(404, f"nothing of {upstream}/{repository} is cached")
        return detail

    def _ttl(self, upstream: str) -> float:
        config = self._upstreams.configs.get(upstream)
        if config is not None and config.tag_ttl is not None:
            return config.tag_ttl
        return self._tag_ttl


def _detail(upstream: str, repository: str, ttl: float, index: Index) -> RepositoryDetail | None:
    """In the index's worker thread: three queries, however many manifests."""
    manifests = index.repo_manifests(upstream, repository)
    if not manifests:
        return None
    tags = tuple(
        TagInfo(t.tag, t.digest, t.media_type, t.checked_at, t.checked_at + ttl)
        for t in index.repo_tags(upstream, repository)
    )
    blobs: dict[str, list[BlobInfo]] = {}
    children: dict[str, list[str]] = {}
    for manifest, child, kind, size in index.repository_refs(upstream, repository):
        if kind == "blob":
            blobs.setdefault(manifest, []).append(BlobInfo(child, size, size is not None))
        elif kind == "manifest":
            children.setdefault(manifest, []).append(child)
    infos = tuple(
        ManifestInfo(
            m.digest,
            m.media_type,
            m.size,
            m.fetched_at,
            m.last_access,
            tuple(blobs.get(m.digest, ())),
            tuple(children.get(m.digest, ())),
        )
        for m in manifests
    )
    return RepositoryDetail(upstream, repository, tags, infos)
