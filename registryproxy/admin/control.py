"""The running proxy as the admin API sees it: the real :class:`AdminBackend`,
each question answered by the part whose one job it is."""

from __future__ import annotations

import os
from typing import Any, Protocol

import attrs

from ..cache.access import IndexAccess
from ..cache.blobs import BlobCache
from ..cache.eviction import Evictor
from ..cache.index import Page
from ..cache.keep import Keep
from ..cache.manifests import ManifestCache
from ..cache.store import BlobStore
from ..config import Config
from ..metrics import Metrics
from ..runtime import IReactor
from ..upstream.registry import Upstreams
from .backend import (
    FsckResult,
    Pin,
    PrefetchJob,
    PurgeResult,
    PurgeSelector,
    RepositoryDetail,
    RepositoryPage,
)
from .fsck import Fsck
from .listing import Listing
from .prefetch import Prefetcher
from .purge import ClusterForgetting, Purge
from .readiness import ClusterCheck, Readiness
from .settings import (
    Pins,
    SavedPins,
    SavedPinsStore,
    SavedUpstreams,
    SavedUpstreamsStore,
    UpstreamSettings,
)
from .stats import ClusterNodes, SavedHistory, Stats


class ClusterView(ClusterNodes, ClusterCheck, ClusterForgetting, Protocol):
    """A cluster's nodes and engines (:class:`~..cluster.node.Engines`)."""


@attrs.frozen
class Control:
    """The admin backend: a thin front over its parts, each constructible
    and testable alone."""

    counters: Stats
    chart: SavedHistory
    readiness: Readiness
    listing: Listing
    purger: Purge
    prefetcher: Prefetcher
    checker: Fsck
    pinning: Pins
    upstream_settings: UpstreamSettings

    async def stats(self) -> dict[str, Any]:
        return await self.counters.stats()

    def history(self) -> dict[str, Any]:
        return self.chart.snapshot()

    def sample_history(self) -> None:
        self.chart.sample()

    def recent_errors(self) -> list[dict[str, Any]]:
        return self.counters.recent_errors()

    def status(self) -> dict[str, Any]:
        return self.counters.status()

    async def metrics(self) -> tuple[bytes, str]:
        return await self.counters.metrics()

    async def ready(self) -> dict[str, Any]:
        return await self.readiness.ready()

    async def repositories(self, upstream: str | None, page: Page) -> RepositoryPage:
        return await self.listing.repositories(upstream, page)

    async def repository(self, upstream: str, repository: str) -> RepositoryDetail:
        return await self.listing.repository(upstream, repository)

    async def purge(self, selector: PurgeSelector) -> PurgeResult:
        return await self.purger.purge(selector)

    def prefetch(
        self, upstream: str, repository: str, reference: str, platforms: tuple[str, ...] | None
    ) -> PrefetchJob:
        return self.prefetcher.prefetch(upstream, repository, reference, platforms)

    def prefetch_jobs(self) -> list[PrefetchJob]:
        return self.prefetcher.jobs()

    async def fsck(self) -> FsckResult:
        return await self.checker.fsck()

    def pins(self) -> list[Pin]:
        return self.pinning.pins()

    def pin(self, image: str) -> Pin:
        return self.pinning.pin(image)

    def unpin(self, image: str) -> None:
        self.pinning.unpin(image)

    def upstreams(self) -> dict[str, dict[str, Any]]:
        return self.upstream_settings.upstreams()

    def set_upstream(
        self, name: str, settings: dict[str, Any], merge: bool = False
    ) -> dict[str, Any]:
        return self.upstream_settings.set_upstream(name, settings, merge)

    def remove_upstream(self, name: str) -> None:
        self.upstream_settings.remove_upstream(name)

    def reload_saved(self) -> None:
        """Apply the saved upstreams and pins again (another node of a
        cluster changed them)."""
        self.upstream_settings.reload()
        self.pinning.apply()


def build_control(
    config: Config,
    cache_dir: str,
    store: BlobStore,
    access: IndexAccess,
    manifests: ManifestCache,
    blobs: BlobCache,
    upstreams: Upstreams,
    metrics: Metrics,
    reactor: IReactor,
    evictor: Evictor,
    keep: Keep,
    cluster: ClusterView | None = None,
    saved: tuple[SavedUpstreamsStore, SavedPinsStore] | None = None,
) -> Control:
    """The parts wired to the proxy's.  *cluster*: the live nodes, when this
    node is one of a cluster's; *saved*: where upstream changes and pins
    made through the API are kept (default: JSON files beside the cache)."""
    saved_upstreams, saved_pins = saved or (
        SavedUpstreams(os.path.join(cache_dir, "upstreams.json")),
        SavedPins(os.path.join(cache_dir, "pins.json")),
    )
    prefetcher = Prefetcher(upstreams, manifests, blobs, reactor)
    return Control(
        counters=Stats(
            metrics,
            blobs,
            access,
            cache_dir,
            config.cache.max_bytes,
            upstreams,
            prefetcher.jobs,
            cluster,
        ),
        chart=SavedHistory(metrics.history, os.path.join(cache_dir, "history.json")),
        readiness=Readiness(cache_dir, upstreams, reactor, cluster),
        listing=Listing(access, upstreams, config.cache.tag_ttl),
        purger=Purge(evictor, access, upstreams, manifests, cluster),
        prefetcher=prefetcher,
        checker=Fsck(store, access, reactor, clustered=cluster is not None),
        pinning=Pins(config.cache.pinned, saved_pins, keep),
        upstream_settings=UpstreamSettings(config, upstreams, saved_upstreams),
    )
