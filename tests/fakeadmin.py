"""An in-memory AdminBackend for the admin API's tests, and a server of it.

It records every call, can be told to fail (``fake.failures["stats"] = ...``),
and validates upstream settings with the real config code, so the API is
tested against the backend's contract rather than against regproxy's cache.

``python tests/fakeadmin.py [--token T]`` serves it on a free 127.0.0.1 port
and prints ``listening on <port>`` (the fuzz test runs it so).
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import sys
from pathlib import Path
from typing import Any

import attrs
from twisted.internet.defer import Deferred

sys.path.insert(0, str(Path(__file__).parent.parent))

from registryproxy.admin.backend import (  # noqa: E402
    AdminError,
    BlobInfo,
    FsckResult,
    ManifestInfo,
    Pin,
    PrefetchJob,
    PurgeResult,
    PurgeSelector,
    RepositoryDetail,
    RepositoryPage,
    RepositorySummary,
    TagInfo,
)
from registryproxy.cache.index import Page  # noqa: E402
from registryproxy.config import (  # noqa: E402
    PRESETS,
    Config,
    ConfigError,
    UpstreamConfig,
    settings_of,
    upstream_from_settings,
)
from registryproxy.reference import parse_image  # noqa: E402

NOW = 1_700_000_000.0
TTL = 3600.0
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def digest_of(text: str) -> str:
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def _image(
    upstream: str, repository: str, tags: dict[str, str], fetched_at: float = NOW
) -> RepositoryDetail:
    """A repository with one single-platform manifest per distinct name in *tags*."""
    manifests = {}
    for name in dict.fromkeys(tags.values()):
        blobs = (
            BlobInfo(digest_of(f"{name} config"), 500, True),
            BlobInfo(digest_of(f"{name} layer"), 3_000_000, True),
        )
        manifests[name] = ManifestInfo(
            digest_of(name), OCI_MANIFEST, 400, fetched_at, fetched_at + 10, blobs
        )
    tag_infos = tuple(
        TagInfo(tag, manifests[name].digest, OCI_MANIFEST, NOW, NOW + TTL)
        for tag, name in tags.items()
    )
    return RepositoryDetail(upstream, repository, tag_infos, tuple(manifests.values()))


def seed() -> dict[tuple[str, str], RepositoryDetail]:
    images = [
        _image("docker.io", "library/alpine", {"3.19": "alpine 3.19", "latest": "alpine 3.19"}),
        _image("docker.io", "library/nginx", {"1.27": "nginx 1.27"}, fetched_at=NOW - 86400),
        _image("ghcr.io", "owner/name", {"1.0": "name 1.0", "2.0": "name 2.0"}),
    ]
    return {(d.upstream, d.repository): d for d in images}


class FakeAdmin:
    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...]]] = []
        #: method name -> exception it raises
        self.failures: dict[str, Exception] = {}
        self.is_ready = True
        #: state of new prefetch jobs ("done" lets ``prefetch --wait`` end at once)
        self.job_state = "queued"
        self.cached = seed()
        self.configs: dict[str, UpstreamConfig] = dict(PRESETS)
        self.default = "docker.io"
        self.jobs: dict[str, PrefetchJob] = {}
        self._ids = itertools.count(1)
        blobs = {
            b.digest: b.size or 0
            for d in self.cached.values()
            for m in d.manifests
            for b in m.blobs
        }
        #: what fsck finds
        self.fsck_result = FsckResult(len(blobs), sum(blobs.values()), (), (), ())
        #: when set, fsck waits for it (to test one that takes a while)
        self.fsck_gate: Deferred[None] | None = None
        #: fsck runs that ran to their end
        self.fscks_done = 0
        self._fscking = False
        #: normalised images pinned by the config file, and through the API
        self.config_pins = ["docker.io/library/alpine:3.19"]
        self.api_pins: list[str] = []

    def _call(self, name: str, *args: Any) -> None:
        self.calls.append((name, args))
        if name in self.failures:
            raise self.failures[name]

    def last(self, name: str) -> tuple[Any, ...]:
        """The arguments of the last call of *name*."""
        return [args for called, args in self.calls if called == name][-1]

    # -- numbers ------------------------------------------------------------

    async def stats(self) -> dict[str, Any]:
        self._call("stats")
        return {
            "requests": 120,
            "hits": 90,
            "misses": 30,
            "hit_ratio": 0.75,
            "bytes_from_cache": 5 * 2**20,
            "bytes_from_upstream": 2**20,
            "upstream_requests": {"docker.io": {"manifest": 10, "blob": 20}},
            "errors": {"404": 2},
            "upstream_errors": {"docker.io": 2},
            "top_pulls": [{"image": "docker.io/library/alpine:3.20", "pulls": 7}],
            "fetches_in_flight": 1,
            "fetching": [
                {
                    "digest": digest_of("downloading"),
                    "written": 2**20,
                    "size": 3 * 2**20,
                    "origin": "upstream",
                    "clients": 2,
                    "repositories": ["docker.io/library/alpine"],
                }
            ],
            "upstreams": {"docker.io": {"breaker_open": False, "last_answer": NOW}},
            "cache": {
                "max_bytes": 50 * 2**30,
                "size_bytes": 6 * 2**20,
                "blobs": 6,
                "manifests": 4,
                "tags": 5,
                "repositories": len(self.cached),
                "free_disk_bytes": 10 * 2**30,
            },
            "ratelimit_remaining": {"docker.io": 95},
            "prefetch": [attrs.asdict(j) for j in self.jobs.values()],
        }

    def history(self) -> dict[str, Any]:
        self._call("history")
        sample = {
            "requests": 120,
            "hits": 90,
            "misses": 30,
            "bytes_from_cache": 5 * 2**20,
            "bytes_from_upstream": 2**20,
        }
        hour = [{"time": NOW - 10, **sample}, {"time": NOW, **sample}]
        return {"interval": 10.0, "day_interval": 300.0, "hour": hour, "day": hour[-1:]}

    def recent_errors(self) -> list[dict[str, Any]]:
        self._call("recent_errors")
        return [
            {
                "time": NOW,
                "status": 404,
                "client": "127.0.0.1",
                "method": "GET",
                "path": "/v2/library/nope/manifests/latest",
            }
        ]

    async def metrics(self) -> tuple[bytes, str]:
        self._call("metrics")
        body = b"# HELP regproxy_requests_total Requests.\n# TYPE regproxy_requests_total counter\n"
        return body + b"regproxy_requests_total 120.0\n", "text/plain; version=0.0.4; charset=utf-8"

    async def ready(self) -> dict[str, Any]:
        self._call("ready")
        return {
            "ready": self.is_ready,
            "checks": {"storage": {"ok": True}, "upstream": {"ok": self.is_ready}},
        }

    # -- the cache ------------------------------------------------------------

    async def repositories(self, upstream: str | None, page: Page) -> RepositoryPage:
        """The page as the index makes it, in Python."""
        self._call("repositories", upstream, page)
        if upstream is not None and upstream not in self.configs:
            raise AdminError(404, f"unknown upstream {upstream!r}")
        found = [
            RepositorySummary(
                d.upstream,
                d.repository,
                len(d.tags),
                len(d.manifests),
                sum(m.size + sum(b.size or 0 for b in m.blobs) for m in d.manifests),
                max((m.last_access or 0 for m in d.manifests), default=None),
            )
            for d in self.cached.values()
            if (upstream is None or d.upstream == upstream)
            and (page.after is None or (d.upstream, d.repository) > page.after)
            and (page.contains or "").lower() in f"{d.upstream}/{d.repository}".lower()
        ]
        found.sort(key=lambda r: (r.upstream, r.repository))
        if page.by_size:
            found.sort(key=lambda r: -r.size)
        limit = len(found) if page.limit is None else page.limit
        return RepositoryPage(tuple(found[:limit]), more=len(found) > limit)

    async def repository(self, upstream: str, repository: str) -> RepositoryDetail:
        self._call("repository", upstream, repository)
        detail = self.cached.get((upstream, repository))
        if detail is None:
            raise AdminError(404, f"nothing of {upstream}/{repository} is cached")
        return detail

    async def purge(self, selector: PurgeSelector) -> PurgeResult:
        self._call("purge", selector)
        s = selector
        narrowed = any(
            v is not None
            for v in (s.upstream, s.repository, s.tag, s.digest, s.older_than, s.unused_since)
        )
        if narrowed == s.everything:
            raise AdminError(400, "say what to purge, or everything=True alone")
        if (s.tag or s.digest) and not s.repository or (s.tag and s.digest):
            raise AdminError(400, "a tag or a digest, with its repository")
        tags = manifests = freed = 0
        blobs: list[str] = []
        for key, detail in list(self.cached.items()):
            if s.upstream not in (None, detail.upstream) or s.repository not in (
                None,
                detail.repository,
            ):
                continue
            # a tag takes the manifests only it kept
            other_tags = {t.digest for t in detail.tags if t.tag != s.tag}
            gone = {
                m.digest
                for m in detail.manifests
                if (s.digest is None or m.digest == s.digest)
                and (
                    s.tag is None
                    or m.digest not in other_tags
                    and any(t.tag == s.tag and t.digest == m.digest for t in detail.tags)
                )
                and (s.older_than is None or m.fetched_at < s.older_than)
                and (s.unused_since is None or (m.last_access or 0) < s.unused_since)
            }
            kept_tags = tuple(
                t for t in detail.tags if t.digest not in gone and (s.tag is None or t.tag != s.tag)
            )
            kept = tuple(m for m in detail.manifests if m.digest not in gone)
            tags += len(detail.tags) - len(kept_tags)
            manifests += len(gone)
            for m in detail.manifests:
                if m.digest in gone:
                    freed += m.size + sum(b.size or 0 for b in m.blobs)
                    blobs.extend(b.digest for b in m.blobs)
            if kept:
                self.cached[key] = attrs.evolve(detail, tags=kept_tags, manifests=kept)
            else:
                del self.cached[key]
        return PurgeResult(tags, manifests, tuple(blobs), freed)

    # -- prefetch -------------------------------------------------------------

    def prefetch(
        self, upstream: str, repository: str, reference: str, platforms: tuple[str, ...] | None
    ) -> PrefetchJob:
        self._call("prefetch", upstream, repository, reference, platforms)
        if upstream not in self.configs:
            raise AdminError(400, f"unknown upstream {upstream!r}: add it under upstreams")
        done = self.job_state == "done"
        job = PrefetchJob(
            id=f"job{next(self._ids)}",
            upstream=upstream,
            repository=repository,
            reference=reference,
            platforms=platforms,
            state=self.job_state,
            manifests_done=2 if done else 0,
            blobs_done=3 if done else 0,
            blobs_total=3 if done else 0,
            bytes_fetched=3_000_000 if done else 0,
            error=None,
            started_at=NOW,
            finished_at=NOW + 5 if done else None,
        )
        self.jobs[job.id] = job
        return job

    def prefetch_jobs(self) -> list[PrefetchJob]:
        self._call("prefetch_jobs")
        return list(self.jobs.values())

    # -- the store and pins --------------------------------------------------

    async def fsck(self) -> FsckResult:
        self._call("fsck")
        if self._fscking:
            raise AdminError(409, "an fsck is already running")
        self._fscking = True
        try:
            if self.fsck_gate is not None:
                await self.fsck_gate
        finally:
            self._fscking = False
        self.fscks_done += 1
        return self.fsck_result

    def pins(self) -> list[Pin]:
        self._call("pins")
        return [Pin(p, "config") for p in self.config_pins] + [Pin(p, "api") for p in self.api_pins]

    @staticmethod
    def _normal(image: str) -> str:
        try:
            return str(parse_image(image))
        except ValueError as e:
            raise AdminError(400, str(e)) from None

    def pin(self, image: str) -> Pin:
        self._call("pin", image)
        text = self._normal(image)
        if text in self.config_pins:
            return Pin(text, "config")
        if text not in self.api_pins:
            self.api_pins.append(text)
        return Pin(text, "api")

    def unpin(self, image: str) -> None:
        self._call("unpin", image)
        text = self._normal(image)
        if text in self.api_pins:
            self.api_pins.remove(text)
        elif text in self.config_pins:
            raise AdminError(409, f"{text} is pinned in the config file (cache.pinned)")
        else:
            raise AdminError(404, f"{text} is not pinned")

    # -- upstreams ------------------------------------------------------------

    def _view(self, name: str) -> dict[str, Any]:
        return {
            **settings_of(self.configs[name]),
            "preset": name in PRESETS,
            "default": name == self.default,
        }

    def upstreams(self) -> dict[str, dict[str, Any]]:
        self._call("upstreams")
        return {name: self._view(name) for name in sorted(self.configs)}

    def set_upstream(
        self, name: str, settings: dict[str, Any], merge: bool = False
    ) -> dict[str, Any]:
        self._call("set_upstream", name, settings, merge)
        current = self.configs.get(name)
        if merge and current is None:
            raise AdminError(404, f"unknown upstream {name!r}")
        given = settings
        if merge:
            assert current is not None
            given = {**settings_of(current, redact=False), **settings}
            given = {k: v for k, v in given.items() if v is not None}
        try:
            upstream = upstream_from_settings(name, given)
            configs = {**self.configs, name: upstream}
            Config(upstreams=configs, default_upstream=self.default)
        except (ConfigError, ValueError) as e:
            raise AdminError(400, str(e)) from None
        self.configs = configs
        return self._view(name)

    def remove_upstream(self, name: str) -> None:
        self._call("remove_upstream", name)
        if name not in self.configs:
            raise AdminError(404, f"unknown upstream {name!r}")
        if name == self.default or name in PRESETS:
            raise AdminError(409, f"{name!r} is the default upstream or built in")
        users = [n for n, c in self.configs.items() if name in c.fallbacks]
        if users:
            raise AdminError(409, f"{name!r} is a fallback of {', '.join(users)}")
        del self.configs[name]


def serve(argv: list[str] | None = None) -> None:
    """Serve a FakeAdmin behind the real admin API until killed."""
    from twisted.internet import reactor
    from twisted.internet.endpoints import TCP4ServerEndpoint
    from twisted.web.server import Site

    from registryproxy.admin.app import AdminAPI

    parser = argparse.ArgumentParser()
    parser.add_argument("--token")
    args = parser.parse_args(argv)
    site = Site(AdminAPI(FakeAdmin(), args.token).resource())
    d = TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(site)
    d.addCallback(lambda port: print(f"listening on {port.getHost().port}", flush=True))
    reactor.run()  # type: ignore[attr-defined]


if __name__ == "__main__":
    serve()
