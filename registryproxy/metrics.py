"""Counters of what the proxy does, kept in prometheus-client collectors.

One registry per running proxy (not the global one), so tests and several
proxies in one process never share counts.  ``/metrics`` renders it as is;
the admin API's JSON stats read the same collectors.
"""

from __future__ import annotations

import heapq
import time
from collections import defaultdict, deque
from operator import itemgetter
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

#: how many error responses :attr:`Metrics.recent_errors` keeps
RECENT_ERRORS = 200
#: how many images :class:`PullCounts` keeps a count for
PULLED_IMAGES = 10_000
#: how many of the most pulled images the stats list
TOP_PULLS = 20
#: the counters a :class:`History` sample holds
SAMPLED = ("requests", "hits", "misses", "bytes_from_cache", "bytes_from_upstream")


class Seconds(Protocol):
    """What tells the time here: a reactor, a ``Clock`` in tests."""

    def seconds(self) -> float: ...


class _WallClock:
    def seconds(self) -> float:
        return time.time()


class Metrics:
    def __init__(self, clock: Seconds | None = None) -> None:
        """*clock*: what times the recent errors and the history (the wall clock if None)."""
        self._clock: Seconds = clock or _WallClock()
        #: the last error responses, oldest first: time, status, client, path
        self.recent_errors: deque[dict[str, Any]] = deque(maxlen=RECENT_ERRORS)
        #: the counters over the last hour and day, for the dashboard
        self.history = History(self, self._clock)
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
        self.sent_again = Counter(
            "regproxy_answers_sent_again",
            "Manifest answers sent again to the same request bytes before twisted.web "
            "parsed them (counted in regproxy_requests too)",
            registry=r,
        )
        #: the labelled counters of the hot path, looked up once
        self._children: dict[tuple[int | str, ...], Any] = {}
        self.upstream_requests = Counter(
            "regproxy_upstream_requests",
            "Requests sent to upstream registries",
            ["upstream", "kind"],
            registry=r,
        )
        self.errors = Counter(
            "regproxy_errors",
            "Error responses to clients, by status and upstream (none: not routed to one)",
            ["status", "upstream"],
            registry=r,
        )
        self.logins = Counter(
            "regproxy_logins",
            "Password logins on the proxy port (proxy.auth): ok, failed, or "
            "limited (refused after too many failures from the address)",
            ["result"],
            registry=r,
        )
        #: manifest GETs per image, for the dashboard (not in /metrics: unbounded labels)
        self.pulls = PullCounts()
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

    def request(self, kind: str, cache: str) -> Any:
        """``requests{kind, cache}``, looked up once (see :meth:`_child`)."""
        return self._child(self.requests, kind, cache)

    def served(self, source: str) -> Any:
        """``served_bytes{source}``, looked up once (see :meth:`_child`)."""
        return self._child(self.served_bytes, source)

    def _child(self, counter: Counter, *labels: str) -> Any:
        """*counter*'s child for *labels*: ``labels()`` once per set of them,
        not once per answer (the hot path's labels are a handful of constants)."""
        key: tuple[int | str, ...] = (id(counter), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = counter.labels(*labels)
        return child

    def error(
        self, status: int, client: str, method: str, path: str, upstream: str | None = None
    ) -> None:
        """An error response to a client: counted, and kept among the recent
        ones.  *upstream*: the one the request was routed to, if it got so far."""
        self.errors.labels(str(status), upstream or "none").inc()
        self.recent_errors.append(
            {
                "time": self._clock.seconds(),
                "status": status,
                "client": client,
                "method": method,
                "path": path[:300],
            }
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
        errors: dict[str, int] = defaultdict(int)
        upstream_errors: dict[str, int] = defaultdict(int)
        for (status, name), value in self.values(self.errors).items():
            errors[status] += int(value)
            upstream_errors[name] += int(value)
        return {
            "requests": int(sum(requests.values())),
            "hits": int(hits),
            "misses": int(misses),
            "hit_ratio": hits / (hits + misses) if hits + misses else None,
            "bytes_from_cache": int(served.get(("cache",), 0)),
            "bytes_from_upstream": int(served.get(("upstream",), 0)),
            "upstream_requests": dict(upstream),
            "errors": dict(errors),
            "upstream_errors": dict(upstream_errors),
            "ratelimit_remaining": {
                name: int(v) for (name,), v in self.values(self.ratelimit_remaining).items()
            },
        }


class PullCounts:
    """How many times each image's manifest was pulled (GET), by the name the
    client asked for: ``upstream/repository:tag`` or ``...@digest``.

    Bounded: past *keep* images, the least pulled are dropped (of equal
    counts, the first counted), down to nine tenths of *keep* at once, so a
    count is a dict increment and the sort comes once per *keep*/10 new
    images.  In memory: a restart starts it anew."""

    def __init__(self, keep: int = PULLED_IMAGES) -> None:
        self.keep = keep
        self._counts: dict[str, int] = {}

    def pulled(self, image: str) -> None:
        counts = self._counts
        counts[image] = counts.get(image, 0) + 1
        if len(counts) > self.keep:
            # a stable sort of a dict in the order counted: of equal counts the oldest first
            ranked = sorted(counts, key=counts.__getitem__)
            dropped = set(ranked[: len(counts) - self.keep * 9 // 10])
            self._counts = {k: v for k, v in counts.items() if k not in dropped}

    def __len__(self) -> int:
        return len(self._counts)

    def top(self, n: int) -> list[dict[str, Any]]:
        """The *n* most pulled, most first: ``[{"image", "pulls"}]``."""
        most = heapq.nlargest(n, self._counts.items(), key=itemgetter(1))
        return [{"image": image, "pulls": pulls} for image, pulls in most]


class History:
    """The counters of :data:`SAMPLED`, sampled: every *interval* seconds for
    the last hour, and every *day_interval* seconds for the last day.  In
    memory, bounded; a restart starts it anew (the counters do too)."""

    def __init__(
        self,
        metrics: Metrics,
        clock: Seconds,
        interval: float = 10.0,
        day_interval: float = 300.0,
    ) -> None:
        self._metrics = metrics
        self._clock = clock
        self.interval = interval
        self.day_interval = day_interval
        self._hour: deque[dict[str, Any]] = deque(maxlen=int(3600 / interval) + 1)
        self._day: deque[dict[str, Any]] = deque(maxlen=int(86400 / day_interval) + 1)

    def sample(self) -> bool:
        """Take one sample now (called every *interval*); whether it went
        into the day's samples too."""
        summary = self._metrics.summary()
        point = {"time": self._clock.seconds(), **{key: summary[key] for key in SAMPLED}}
        self._hour.append(point)
        if not self._day or point["time"] - self._day[-1]["time"] >= self.day_interval:
            self._day.append(point)
            return True
        return False

    @property
    def day(self) -> list[dict[str, Any]]:
        return list(self._day)

    def restore(self, day: Any) -> None:
        """The day's samples as :attr:`day` gave them before a restart: those
        of the last day that are well formed are taken back."""
        since = self._clock.seconds() - 86400
        if not isinstance(day, list):
            return
        for point in day:
            if (
                isinstance(point, dict)
                and all(isinstance(point.get(key), int) for key in SAMPLED)
                and isinstance(point.get("time"), int | float)
                and since <= point["time"] <= since + 86400
                and (not self._day or point["time"] > self._day[-1]["time"])
            ):
                self._day.append({key: point[key] for key in ("time", *SAMPLED)})

    def snapshot(self) -> dict[str, Any]:
        return {
            "interval": self.interval,
            "day_interval": self.day_interval,
            "hour": list(self._hour),
            "day": list(self._day),
        }
