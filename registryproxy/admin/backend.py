"""What the admin API can ask of the running proxy.

The Klein routes (``admin/app.py``) only parse, validate and render; every
question and every change goes through this interface, so the routes can be
tested in memory against a fake and the proxy's internals stay behind it.
All times are Unix epoch seconds.
"""

from __future__ import annotations

from typing import Any, Protocol

import attrs

from ..cache.fsck import FsckReport
from ..cache.index import Page


def api(description: str = "Unix epoch seconds", **schema: Any) -> dict[str, Any]:
    """A field's metadata: what the OpenAPI document (admin/openapi.py) adds
    to the schema it derives from the field's type."""
    return {"openapi": {"description": description, **schema}}


#: a field's metadata for a time: Unix epoch seconds
TIME = api()


@attrs.frozen
class TagInfo:
    tag: str
    digest: str
    media_type: str
    checked_at: float = attrs.field(metadata=api("when the upstream last confirmed this tag"))
    expires_at: float = attrs.field(metadata=api("when it is revalidated upstream"))


@attrs.frozen
class BlobInfo:
    digest: str
    size: int | None
    cached: bool


@attrs.frozen
class ManifestInfo:
    digest: str
    media_type: str
    size: int
    fetched_at: float = attrs.field(metadata=TIME)
    last_access: float | None = attrs.field(metadata=TIME)
    #: blobs (config, layers) an image manifest lists; empty for an index
    blobs: tuple[BlobInfo, ...] = ()
    #: child manifests an index lists
    manifests: tuple[str, ...] = ()


@attrs.frozen
class RepositorySummary:
    upstream: str
    repository: str
    tags: int
    manifests: int
    size: int = attrs.field(metadata=api("bytes of its cached manifests and blobs"))
    last_access: float | None = attrs.field(metadata=TIME)


@attrs.frozen
class RepositoryPage:
    """A page of the listing: as many repositories as it asked for at most,
    and whether more of them match."""

    repositories: tuple[RepositorySummary, ...]
    more: bool


@attrs.frozen
class RepositoryDetail:
    upstream: str
    repository: str
    tags: tuple[TagInfo, ...]
    manifests: tuple[ManifestInfo, ...]


@attrs.frozen
class PurgeSelector:
    """What to purge; fields left None do not narrow the selection.

    ``upstream`` alone: that upstream; with ``repository``: that repository;
    with ``tag``: one tag (the tag mapping and the manifests only it kept);
    with ``digest``: one manifest.  ``older_than``: manifests fetched before
    that time; ``unused_since``: manifests not served since that time.
    ``everything=True`` with nothing else: the whole cache."""

    upstream: str | None = None
    repository: str | None = None
    tag: str | None = None
    digest: str | None = None
    older_than: float | None = None
    unused_since: float | None = None
    everything: bool = False


@attrs.frozen
class PurgeResult:
    tags: int = attrs.field(metadata=api("tag mappings removed"))
    manifests: int = attrs.field(metadata=api("manifests removed"))
    blobs: tuple[str, ...] = attrs.field(
        metadata=api("digests of the blobs deleted because nothing cached lists them")
    )
    bytes_freed: int


@attrs.frozen
class PrefetchJob:
    id: str
    upstream: str
    repository: str
    reference: str = attrs.field(metadata=api("tag or digest"))
    #: else "os/arch[/variant]" strings
    platforms: tuple[str, ...] | None = attrs.field(metadata=api("null: every platform"))
    state: str = attrs.field(
        metadata={"openapi": {"enum": ["queued", "running", "done", "failed"]}}
    )
    manifests_done: int
    blobs_done: int
    blobs_total: int
    bytes_fetched: int
    error: str | None
    started_at: float = attrs.field(metadata=TIME)
    finished_at: float | None = attrs.field(metadata=TIME)


#: What an fsck found and did: the cache's own report, under the name the
#: admin API (and its OpenAPI document) gives it.
FsckResult = FsckReport


@attrs.frozen
class Pin:
    image: str = attrs.field(metadata=api("the image, normalised: docker.io/library/alpine:3.19"))
    source: str = attrs.field(
        metadata=api(
            "config: cache.pinned in the YAML; api: pinned through this API",
            enum=["config", "api"],
        )
    )


class AdminError(Exception):
    """A request the backend refuses; ``status`` 400 (bad input), 404 (no such
    thing) or 409 (conflicts with the current state). The message says what
    to do."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class AdminBackend(Protocol):
    async def stats(self) -> dict[str, Any]:
        """JSON-ready counters: requests, hits, misses, hit_ratio,
        bytes_from_cache, bytes_from_upstream, upstream_requests
        {upstream: {kind: n}}, errors {status: n}, upstream_errors
        {upstream or "none": n}, top_pulls [{image, pulls}], fetches_in_flight, fetching
        [downloads], upstreams {name: {breaker_open, last_answer}},
        cache {size_bytes, blobs, manifests, tags, repositories, free_disk_bytes,
        max_bytes},
        ratelimit_remaining {upstream: value as last seen}, prefetch [jobs]."""

    def history(self) -> dict[str, Any]:
        """The counters sampled: ``{"interval", "day_interval", "hour": [...],
        "day": [...]}``, each sample ``{time, requests, hits, misses,
        bytes_from_cache, bytes_from_upstream}``."""

    def recent_errors(self) -> list[dict[str, Any]]:
        """The last error responses to clients, oldest first:
        ``{time, status, client, method, path}``."""

    async def metrics(self) -> tuple[bytes, str]:
        """Prometheus text exposition and its content type."""

    async def ready(self) -> dict[str, Any]:
        """``{"ready": bool, "checks": {"storage": {...}, "upstream": {...}}}``."""

    async def repositories(self, upstream: str | None, page: Page) -> RepositoryPage:
        """The repositories of *page* (of *upstream*; None: all), filtered,
        ordered and cut in the index. Raises AdminError(404) for an unknown
        upstream."""

    async def repository(self, upstream: str, repository: str) -> RepositoryDetail:
        """Raises AdminError(404) if nothing of it is cached."""

    async def purge(self, selector: PurgeSelector) -> PurgeResult:
        """Raises AdminError(400) for a selector that selects nothing sensible
        (e.g. tag without repository, nothing at all without everything=True)."""

    def prefetch(
        self, upstream: str, repository: str, reference: str, platforms: tuple[str, ...] | None
    ) -> PrefetchJob:
        """Start warming the cache in the background; returns at once."""

    def prefetch_jobs(self) -> list[PrefetchJob]: ...

    async def fsck(self) -> FsckResult:
        """Re-hash every stored blob; quarantine those that do not match."""

    def pins(self) -> list[Pin]:
        """Images eviction never removes."""

    def pin(self, image: str) -> Pin:
        """Pin an image (as users type it); AdminError(400) if it is not one.
        Persisted; pinning again is not an error."""

    def unpin(self, image: str) -> None:
        """AdminError(404) if not pinned, 409 if pinned by the config file."""

    def upstreams(self) -> dict[str, dict[str, Any]]:
        """Every upstream's settings as in the YAML, secrets replaced by
        ``"<set>"``, plus ``"preset": bool`` and ``"default": bool``."""

    def set_upstream(
        self, name: str, settings: dict[str, Any], merge: bool = False
    ) -> dict[str, Any]:
        """Add or replace (``merge=False``, PUT) or change some keys of
        (``merge=True``, PATCH) an upstream from YAML-shaped settings;
        validated like the config file (AdminError(400) with the config
        message), persisted, used from the next request. Returns it as
        :meth:`upstreams` shows it."""

    def remove_upstream(self, name: str) -> None:
        """AdminError(404) if unknown, 409 if it is the default or another's fallback."""
