"""What the proxy is doing: counters, gauges, the charts' history, recent
errors, and the cluster's nodes as their heartbeats told."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import attrs
from twisted.logger import Logger

from ..cache.access import IndexAccess
from ..cache.blobs import BlobCache
from ..metrics import TOP_PULLS, History, Metrics
from ..upstream.registry import Upstreams
from .backend import PrefetchJob
from .jsonfile import load_json, save_json

log = Logger()

#: the counters a node tells the others, and a cluster's view sums
_SUMMED = ("requests", "hits", "misses", "bytes_from_cache", "bytes_from_upstream")


class ClusterNodes(Protocol):
    """The nodes of a cluster, as :class:`~..cluster.membership.Membership` sees them."""

    @property
    def name(self) -> str | None: ...

    @property
    def live(self) -> Sequence[Any]: ...


class Stats:
    """The counters and gauges, for /api/v1/stats, /metrics and the heartbeats."""

    def __init__(
        self,
        metrics: Metrics,
        blobs: BlobCache,
        access: IndexAccess,
        cache_dir: str,
        max_bytes: int | None,
        upstreams: Upstreams,
        jobs: Callable[[], Sequence[PrefetchJob]],
        cluster: ClusterNodes | None = None,
    ) -> None:
        """*jobs*: the prefetch jobs to show; *cluster*: the live nodes, when
        this node is one of a cluster's."""
        self._metrics = metrics
        self._blobs = blobs
        self._access = access
        self._cache_dir = cache_dir
        self._max_bytes = max_bytes
        self._upstreams = upstreams
        self._jobs = jobs
        self._cluster = cluster

    async def _refresh_gauges(self) -> dict[str, int]:
        totals = await self._access.read(lambda index: index.totals())
        disk = os.statvfs(self._cache_dir)
        free = disk.f_bavail * disk.f_frsize
        self._metrics.fetches_in_flight.set(self._blobs.in_flight)
        self._metrics.cache_bytes.set(totals["size_bytes"])
        for kind in ("blobs", "manifests", "tags", "repositories"):
            self._metrics.cache_entries.labels(kind).set(totals[kind])
        self._metrics.free_disk_bytes.set(free)
        return {**totals, "free_disk_bytes": free}

    async def stats(self) -> dict[str, Any]:
        cache = await self._refresh_gauges()
        return {
            **self._metrics.summary(),
            "top_pulls": self._metrics.pulls.top(TOP_PULLS),
            "fetches_in_flight": self._blobs.in_flight,
            "fetching": self._blobs.fetching()[:50],
            "upstreams": self._upstream_states(),
            "cache": {**cache, "max_bytes": self._max_bytes},
            "prefetch": [attrs.asdict(job) for job in self._jobs()],
            **({} if self._cluster is None else {"cluster": cluster_view(self._cluster)}),
        }

    def _upstream_states(self) -> dict[str, dict[str, Any]]:
        """Each upstream's circuit breaker, and when it last answered."""
        states = {}
        for name in self._upstreams.configs:
            client = self._upstreams.get(name)
            if client is not None:
                states[name] = {
                    "breaker_open": client.breaker.is_open(),
                    "last_answer": client.last_answer,
                }
        return states

    async def metrics(self) -> tuple[bytes, str]:
        await self._refresh_gauges()
        return self._metrics.render()

    def recent_errors(self) -> list[dict[str, Any]]:
        return list(self._metrics.recent_errors)

    def status(self) -> dict[str, Any]:
        """What this node tells the others of a cluster at each heartbeat."""
        summary = self._metrics.summary()
        return {key: summary[key] for key in _SUMMED} | {"fetching": self._blobs.fetching()[:50]}


def cluster_view(cluster: ClusterNodes) -> dict[str, Any]:
    """The live nodes as their last heartbeats told, and their counters summed."""
    nodes = []
    for node in cluster.live:
        try:
            status = json.loads(node.status)
        except ValueError:
            status = {}
        nodes.append(
            {
                "name": node.name,
                "advertise": node.advertise,
                "up_for": node.up_for,
                "silent_for": node.silent_for,
                **(status if isinstance(status, dict) else {}),
            }
        )
    summed: dict[str, Any] = {key: sum(int(n.get(key) or 0) for n in nodes) for key in _SUMMED}
    looked_up = summed["hits"] + summed["misses"]
    summed["hit_ratio"] = summed["hits"] / looked_up if looked_up else None
    return {"node": cluster.name, "nodes": nodes, "summed": summed}


class SavedHistory:
    """The dashboard's charts: the day's samples survive a restart (in a
    JSON file beside the cache), the hour's start anew."""

    def __init__(self, history: History, path: str) -> None:
        self._history = history
        self._path = path
        history.restore(load_json(path))

    def snapshot(self) -> dict[str, Any]:
        return self._history.snapshot()

    def sample(self) -> None:
        """Sample the counters (called every ``history.interval``); a day's
        sample is saved."""
        if self._history.sample():
            try:
                save_json(self._path, self._history.day)
            except OSError as e:
                log.warn("could not save {path}: {why}", path=self._path, why=e)
