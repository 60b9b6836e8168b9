"""Prefetch jobs: an image's manifests and blobs cached in the background,
so that its first pull is a hit; the last jobs kept to be shown."""

from __future__ import annotations

import json
import secrets
from typing import Any

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from ..cache.blobs import BlobCache
from ..cache.manifests import ManifestCache, references
from ..errors import RegistryError
from ..mediatypes import MODERN
from ..names import Digest, is_valid_digest, is_valid_tag
from ..upstream.registry import Upstreams
from ..upstream.rules import refused_by
from .backend import AdminError, PrefetchJob

log = Logger()

#: finished jobs kept to be shown (running ones are never dropped)
KEEP_JOBS = 100
_UNDER_WAY = ("queued", "running")
#: prefetches queued or running at once; more are refused until one ends
RUNNING_JOBS = 16


class Prefetcher:
    def __init__(
        self,
        upstreams: Upstreams,
        manifests: ManifestCache,
        blobs: BlobCache,
        clock: IReactorTime,
        keep: int = KEEP_JOBS,
    ) -> None:
        self._upstreams = upstreams
        self._manifests = manifests
        self._blobs = blobs
        self._clock = clock
        self._keep = keep
        self._jobs: dict[str, _Job] = {}

    def prefetch(
        self, upstream: str, repository: str, reference: str, platforms: tuple[str, ...] | None
    ) -> PrefetchJob:
        """Start warming the cache; returns at once. AdminError(400) for an
        unknown upstream, or an image its rules would never serve."""
        client = self._upstreams.get(upstream)
        if client is None:
            raise AdminError(400, f"unknown upstream {upstream!r}")
        config = client.config
        if config.library_prefix and "/" not in repository:
            repository = "library/" + repository
        tag = reference if is_valid_tag(reference) else None
        why = refused_by(
            client.name, config.allow, config.deny, repository, tag, config.library_prefix
        )
        if why is not None:  # cached, it would never be served
            raise AdminError(400, f"{why}: not prefetched")
        if sum(j.state in _UNDER_WAY for j in self._jobs.values()) >= RUNNING_JOBS:
            raise AdminError(
                409, f"{RUNNING_JOBS} prefetches are under way: start more when one has ended"
            )
        job = _Job(
            id=secrets.token_hex(8),
            upstream=client.name,
            repository=repository,
            reference=reference,
            platforms=platforms,
            started_at=self._clock.seconds(),
        )
        self._jobs[job.id] = job
        # the oldest ended jobs go, passing over those under way (at most
        # RUNNING_JOBS): a long one no longer keeps every later one
        ended = [i for i, j in self._jobs.items() if j.state not in _UNDER_WAY]
        for oldest in ended[: max(len(self._jobs) - self._keep, 0)]:
            del self._jobs[oldest]
        Deferred.fromCoroutine(self._run(job, client))
        return job.snapshot()

    def jobs(self) -> list[PrefetchJob]:
        return [job.snapshot() for job in self._jobs.values()]

    async def _run(self, job: _Job, client: Any) -> None:
        job.state = "running"
        try:
            top = await self._manifests.get(client, job.repository, job.reference, MODERN)
            job.manifests_done += 1
            images = [top.body]
            children = _platform_children(top.body, job.platforms)
            for child in children:
                manifest = await self._manifests.get(client, job.repository, child, MODERN)
                job.manifests_done += 1
                images.append(manifest.body)
            wanted = [d for body in images for d, kind in references(body) or [] if kind == "blob"]
            job.blobs_total = len(set(wanted))
            for digest in dict.fromkeys(wanted):
                parsed = Digest.parse(digest)
                # cached for this repository's pulls: a file on disk is not
                # enough (one the index does not know, left by a crash, is
                # not served without the upstream)
                stored = await self._blobs.stored_size(parsed) is not None
                if not (stored and await self._blobs.confirm(client, job.repository, parsed)):
                    fetch = await self._blobs.fetch(client, job.repository, parsed)
                    try:
                        if fetch.relayed:
                            raise RuntimeError(f"no room in the cache for {digest}")
                        await fetch.when_stored()
                        job.bytes_fetched += fetch.written
                    finally:
                        fetch.release()
                job.blobs_done += 1
            job.state = "done"
        except (RegistryError, RuntimeError) as e:
            job.state, job.error = "failed", str(e.args[0] if isinstance(e, RuntimeError) else e)
        except Exception as e:
            log.failure("prefetch {id} failed", id=job.id)
            job.state, job.error = "failed", f"internal error: {type(e).__name__}"
        job.finished_at = self._clock.seconds()


def _platform_children(body: bytes, platforms: tuple[str, ...] | None) -> list[str]:
    try:
        index = json.loads(body)
        entries = index.get("manifests") or []
    except (ValueError, AttributeError):
        return []
    children = []
    for entry in entries:
        if not isinstance(entry, dict) or not is_valid_digest(str(entry.get("digest", ""))):
            continue
        platform = entry.get("platform") or {}
        names = {
            f"{platform.get('os')}/{platform.get('architecture')}",
            f"{platform.get('os')}/{platform.get('architecture')}/{platform.get('variant')}",
        }
        if platforms is None or names & set(platforms):
            children.append(entry["digest"])
    return children


@attrs.define
class _Job:
    id: str
    upstream: str
    repository: str
    reference: str
    platforms: tuple[str, ...] | None
    started_at: float
    state: str = "queued"
    manifests_done: int = 0
    blobs_done: int = 0
    blobs_total: int = 0
    bytes_fetched: int = 0
    error: str | None = None
    finished_at: float | None = None

    def snapshot(self) -> PrefetchJob:
        return PrefetchJob(**attrs.asdict(self))
