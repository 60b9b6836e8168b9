"""What is cached, as the admin API lists it: repositories and their sizes
(one query for a page of the listing), and one repository in detail."""

from __future__ import annotations

from functools import partial

import attrs

from ..cache.access import IndexAccess
from ..cache.index import Index, Page, RepoSummary
from ..upstream.registry import Upstreams
from .backend import (
    AdminError,
    BlobInfo,
    ManifestInfo,
    RepositoryDetail,
    RepositoryPage,
    RepositorySummary,
    TagInfo,
)


class Listing:
    def __init__(self, access: IndexAccess, upstreams: Upstreams, tag_ttl: float) -> None:
        """*tag_ttl*: how long a tag is trusted, for upstreams that set none."""
        self._access = access
        self._upstreams = upstreams
        self._tag_ttl = tag_ttl

    async def repositories(self, upstream: str | None, page: Page) -> RepositoryPage:
        """Raises AdminError(404) for an upstream neither configured nor cached.

        One row more than the page is asked for, to tell whether more follow."""
        if upstream is not None:
            upstream = self._upstreams.canonical(upstream)
        if page.after is not None:
            after_upstream, after_repo = page.after
            page = attrs.evolve(page, after=(self._upstreams.canonical(after_upstream), after_repo))
        configured = upstream is None or upstream in self._upstreams.configs
        rows = await self._access.read(partial(_page, upstream, page, configured))
        if rows is None:
            raise AdminError(404, f"unknown upstream {upstream!r}")
        shown = rows if page.limit is None else rows[: page.limit]
        return RepositoryPage(
            tuple(
                RepositorySummary(r.upstream, r.repo, r.tags, r.manifests, r.size, r.last_access)
                for r in shown
            ),
            more=len(rows) > len(shown),
        )

    async def repository(self, upstream: str, repository: str) -> RepositoryDetail:
        upstream = self._upstreams.canonical(upstream)
        ttl = self._ttl(upstream)
        detail = await self._access.read(partial(_detail, upstream, repository, ttl))
        if detail is None:
            raise AdminError(404, f"nothing of {upstream}/{repository} is cached")
        return detail

    def _ttl(self, upstream: str) -> float:
        config = self._upstreams.configs.get(upstream)
        if config is not None and config.tag_ttl is not None:
            return config.tag_ttl
        return self._tag_ttl


def _page(
    upstream: str | None, page: Page, configured: bool, index: Index
) -> list[RepoSummary] | None:
    """In the index's worker thread: the page's rows and one more, in one
    query; None if *upstream* is neither configured nor cached (a second,
    one-row query, only when a narrowed page of it came out empty)."""
    asked = page if page.limit is None else attrs.evolve(page, limit=page.limit + 1)
    rows = index.repository_summaries(upstream, asked)
    if rows or configured:
        return rows
    if (page.contains or page.after) and index.repository_summaries(upstream, Page(limit=1)):
        return rows
    return None


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
