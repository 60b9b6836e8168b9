"""Counters of what the proxy does, kept in prometheus-client collectors.

One registry per running proxy (not the global one), so tests and several
proxies in one process never share counts.  ``/metrics`` renders it as is;
the admin API's JSON stats read the same collectors.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "regproxy_requests",
            "Registry API requests answered, by kind and cache result",
            ["kind", "cache"],
            registry=r,
        )
        self.served_bytes = Counter(
            "regproxy_served_bytes",
            "Body bytes sent to clients, by where they came from",
            ["source"],
            registry=r,
        )
        self.upstream_requests = Counter(
            "regproxy_upstream_requests",
            "Requests sent to upstream registries",
            ["upstream", "kind"],
            registry=r,
        )
        self.errors = Counter(
            "regproxy_errors", "Error responses to clients, by status", ["status"], registry=r
        )
        self.ratelimit_remaining = Gauge(
            "regproxy_upstream_ratelimit_remaining",
            "The upstream's ratelimit-remaining header as last seen (Docker Hub)",
            ["upstream"],
            registry=r,
        )
        self.fetches_in_flight = Gauge(
            "regproxy_fetches_in_flight", "Blob downloads from upstream in progress", registry=r
        )
        self.cache_bytes = Gauge("regproxy_cache_bytes", "Bytes in the blob store", registry=r)
        self.cache_entries = Gauge(
            "regproxy_cache_entries", "Entries in the cache index", ["kind"], registry=r
        )
        self.free_disk_bytes = Gauge(
            "regproxy_free_disk_bytes", "Free bytes on the cache's file system", registry=r
        )

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def values(self, metric: Counter | Gauge) -> dict[tuple[str, ...], float]:
        """The current value of each label combination of *metric*."""
        out: dict[tuple[str, ...], float] = {}
        for family in metric.collect():
            for sample in family.samples:
                if sample.name.endswith("_created"):
                    continue
                out[tuple(sample.labels.values())] = sample.value
        return out

    def summary(self) -> dict[str, Any]:
        """The JSON-ready part of the admin stats that comes from counters."""
        requests = self.values(self.requests)
        hits = sum(v for (_, cache), v in requests.items() if cache == "hit")
        misses = sum(v for (_, cache), v in requests.items() if cache == "miss")
        served = self.values(self.served_bytes)
        upstream: dict[str, dict[str, int]] = defaultdict(dict)
        for (name, kind), value in self.values(self.upstream_requests).items():
            upstream[name][kind] = int(value)
        return {
            "requests": int(sum(requests.values())),
            "hits": int(hits),
            "misses": int(misses),
            "hit_ratio": hits / (hits + misses) if hits + misses else None,
            "bytes_from_cache": int(served.get(("cache",), 0)),
            "bytes_from_upstream": int(served.get(("upstream",), 0)),
            "upstream_requests": dict(upstream),
            "errors": {status: int(v) for (status,), v in self.values(self.errors).items()},
            "ratelimit_remaining": {
                name: int(v) for (name,), v in self.values(self.ratelimit_remaining).items()
            },
        }
