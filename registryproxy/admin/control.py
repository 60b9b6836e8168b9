"""The running proxy as the admin API sees it: the real :class:`AdminBackend`."""

from __future__ import annotations

import json
import os
import secrets
import tempfile
from collections.abc import Sequence
from functools import partial
from typing import Any, Protocol

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from ..cache.access import IndexAccess
from ..cache.blobs import BlobCache
from ..cache.eviction import Evictor
from ..cache.eviction import Pin as EvictionPin
from ..cache.fsck import fsck
from ..cache.index import Index
from ..cache.manifests import ManifestCache, references
from ..cache.store import BlobStore, FileStore
from ..config import PRESETS, Config, ConfigError, settings_of, upstream_from_settings
from ..errors import RegistryError
from ..mediatypes import MODERN
from ..metrics import TOP_PULLS, Metrics
from ..names import Digest, is_valid_digest, is_valid_tag
from ..reference import parse_image
from ..upstream.registry import Upstreams
from ..upstream.rules import refused_by
from .backend import (
    AdminError,
    BlobInfo,
    FsckResult,
    ManifestInfo,
    Pin,
    PrefetchJob,
    PurgeResult,
    PurgeSelector,
    RepositoryDetail,
    RepositorySummary,
    TagInfo,
)

log = Logger()


class SavedUpstreamsStore(Protocol):
    """Where upstream changes made through the API are kept."""

    def load(self) -> dict[str, dict[str, Any] | None]: ...
    def put(self, name: str, settings: dict[str, Any] | None) -> None: ...
    def apply(self, config: Config) -> Config: ...


class SavedPinsStore(Protocol):
    """Where pins made through the API are kept."""

    def load(self) -> list[str]: ...
    def save(self, pins: list[str]) -> None: ...


class ClusterView(Protocol):
    """The nodes of a cluster, as :class:`~..cluster.membership.Membership` sees them."""

    @property
    def name(self) -> str | None: ...

    @property
    def live(self) -> Sequence[Any]: ...

    async def check(self) -> dict[str, dict[str, Any]]:
        """Whether the cluster's engines answer (for /readyz)."""

    async def forget_everywhere(self) -> None:
        """Make every live node drop the answers it keeps in memory."""


#: how long an upstream answer counts as "recent" for /readyz
_RECENT = 300.0
_KEEP_JOBS = 100


class Control:
    def __init__(
        self,
        config: Config,
        cache_dir: str,
        store: BlobStore,
        access: IndexAccess,
        manifests: ManifestCache,
        blobs: BlobCache,
        upstreams: Upstreams,
        metrics: Metrics,
        clock: IReactorTime,
        evictor: Evictor,
        cluster: ClusterView | None = None,
        saved: tuple[SavedUpstreamsStore, SavedPinsStore] | None = None,
    ) -> None:
        """*cluster*: the live nodes, when this node is one of a cluster's;
        *saved*: where upstream changes and pins made through the API are
        kept (default: JSON files beside the cache)."""
        self._config = config
        self._cache_dir = cache_dir
        self._store = store
        self._access = access
        self._manifests = manifests
        self._blobs = blobs
        self._upstreams = upstreams
        self._metrics = metrics
        self._clock = clock
        self._evictor = evictor
        self._cluster = cluster
        self._jobs: dict[str, _Job] = {}
        self._saved, self._saved_pins = saved or (
            SavedUpstreams(os.path.join(cache_dir, "upstreams.json")),
            SavedPins(os.path.join(cache_dir, "pins.json")),
        )
        self._fscking = False
        self._apply_pins()
        # the day's chart survives a restart; the hour's starts anew
        self._saved_history = os.path.join(cache_dir, "history.json")
        self._metrics.history.restore(_load_json(self._saved_history))

    # -- stats -----------------------------------------------------------------

    async def _refresh_gauges(self) -> dict[str, int]:
        totals = await self._access.heavy(lambda index: index.totals())
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
            "cache": {**cache, "max_bytes": self._config.cache.max_bytes},
            "prefetch": [attrs.asdict(job.snapshot()) for job in self._jobs.values()],
            **({} if self._cluster is None else {"cluster": self._cluster_stats()}),
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

    def history(self) -> dict[str, Any]:
        return self._metrics.history.snapshot()

    def sample_history(self) -> None:
        """Sample the counters for the dashboard's charts (called every
        ``history.interval``); a day's sample is saved beside the cache."""
        history = self._metrics.history
        if history.sample():
            try:
                _save_json(self._saved_history, history.day)
            except OSError as e:
                log.warn("could not save {path}: {why}", path=self._saved_history, why=e)

    def recent_errors(self) -> list[dict[str, Any]]:
        return list(self._metrics.recent_errors)

    def _cluster_stats(self) -> dict[str, Any]:
        """The live nodes as their last heartbeats told, and their counters summed."""
        assert self._cluster is not None
        nodes = []
        for node in self._cluster.live:
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
        summed = {
            key: sum(int(n.get(key) or 0) for n in nodes)
            for key in ("requests", "hits", "misses", "bytes_from_cache", "bytes_from_upstream")
        }
        looked_up = summed["hits"] + summed["misses"]
        summed["hit_ratio"] = summed["hits"] / looked_up if looked_up else None  # type: ignore[assignment]
        return {"node": self._cluster.name, "nodes": nodes, "summed": summed}

    def status(self) -> dict[str, Any]:
        """What this node tells the others of a cluster at each heartbeat."""
        summary = self._metrics.summary()
        return {
            key: summary[key]
            for key in ("requests", "hits", "misses", "bytes_from_cache", "bytes_from_upstream")
        } | {"fetching": self._blobs.fetching()[:50]}

    async def metrics(self) -> tuple[bytes, str]:
        await self._refresh_gauges()
        return self._metrics.render()

    async def ready(self) -> dict[str, Any]:
        checks = {"storage": self._storage_check(), "upstream": await self._upstream_check()}
        if self._cluster is not None:
            checks.update(await self._cluster.check())
        return {"ready": all(check["ok"] for check in checks.values()), "checks": checks}

    def _storage_check(self) -> dict[str, Any]:
        try:
            with tempfile.NamedTemporaryFile(dir=os.path.join(self._cache_dir, "tmp")) as f:
                f.write(b"ready?")
                f.flush()
            return {"ok": True}
        except OSError as e:
            return {"ok": False, "error": f"cache directory not writable: {e.strerror}"}

    async def _upstream_check(self) -> dict[str, Any]:
        client = self._upstreams.default_client()
        now = self._clock.seconds()
        if client.last_answer is None or now - client.last_answer > _RECENT:
            try:
                await client.ping()
            except RegistryError as e:
                return {"ok": False, "upstream": client.name, "error": e.message}
        assert client.last_answer is not None
        return {"ok": True, "upstream": client.name, "answered_at": client.last_answer}

    # -- what is cached --------------------------------------------------------

    def _canonical(self, name: str) -> str:
        """An upstream's own name for one of its aliases (registry-1.docker.io -> docker.io)."""
        if name in self._upstreams.configs:
            return name
        client = self._upstreams.get(name)
        return client.name if client is not None else name

    async def repositories(self, upstream: str | None = None) -> list[RepositorySummary]:
        if upstream is not None:
            upstream = self._canonical(upstream)
            await self._known_upstream(upstream, status=404)
        return await self._access.heavy(partial(_summaries, upstream))

    async def repository(self, upstream: str, repository: str) -> RepositoryDetail:
        upstream = self._canonical(upstream)
        ttl = self._tag_ttl(upstream)
        detail = await self._access.heavy(partial(_detail, upstream, repository, ttl))
        if detail is None:
            raise AdminError(404, f"nothing of {upstream}/{repository} is cached")
        return detail

    def _tag_ttl(self, upstream: str) -> float:
        config = self._upstreams.configs.get(upstream)
        if config is not None and config.tag_ttl is not None:
            return config.tag_ttl
        return self._config.cache.tag_ttl

    async def _known_upstream(self, name: str, status: int = 400) -> None:
        if name in self._upstreams.configs:
            return
        if not await self._access.heavy(lambda index: bool(index.repositories(name))):
            raise AdminError(status, f"unknown upstream {name!r}")

    # -- purging ---------------------------------------------------------------

    async def purge(self, selector: PurgeSelector) -> PurgeResult:
        s = selector
        if s.upstream is not None:
            s = attrs.evolve(s, upstream=self._canonical(s.upstream))
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
            await self._cluster.forget_everywhere()
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

    # -- prefetch --------------------------------------------------------------

    def prefetch(
        self, upstream: str, repository: str, reference: str, platforms: tuple[str, ...] | None
    ) -> PrefetchJob:
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
        job = _Job(
            id=secrets.token_hex(8),
            upstream=client.name,
            repository=repository,
            reference=reference,
            platforms=platforms,
            started_at=self._clock.seconds(),
        )
        self._jobs[job.id] = job
        while len(self._jobs) > _KEEP_JOBS:
            oldest = next(iter(self._jobs))
            if self._jobs[oldest].state in ("queued", "running"):
                break
            del self._jobs[oldest]
        Deferred.fromCoroutine(self._run(job, client))
        return job.snapshot()

    def prefetch_jobs(self) -> list[PrefetchJob]:
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
            wanted = [d for body in images for d, kind in references(body) if kind == "blob"]
            job.blobs_total = len(set(wanted))
            for digest in dict.fromkeys(wanted):
                parsed = Digest.parse(digest)
                if await self._blobs.stored_size(parsed) is None:
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

    # -- integrity and pins ----------------------------------------------------

    async def fsck(self) -> FsckResult:
        if not isinstance(self._store, FileStore) or self._cluster is not None:
            raise AdminError(
                409,
                "fsck checks a single node's file store; a cluster node's disk is only a "
                "local copy of the bucket",
            )
        if self._fscking:
            raise AdminError(409, "an fsck is already running")
        self._fscking = True
        try:
            return await fsck(self._store, self._access)
        finally:
            self._fscking = False

    def pins(self) -> list[Pin]:
        pins = [Pin(_normal(p), "config") for p in self._config.cache.pinned]
        return pins + [Pin(p, "api") for p in self._saved_pins.load()]

    def pin(self, image: str) -> Pin:
        try:
            text = _normal(image)
        except ValueError as e:
            raise AdminError(400, str(e)) from None
        saved = self._saved_pins.load()
        if text not in saved and all(p.image != text for p in self.pins()):
            self._saved_pins.save([*saved, text])
        self._apply_pins()
        return Pin(text, "api" if text in self._saved_pins.load() else "config")

    def unpin(self, image: str) -> None:
        try:
            text = _normal(image)
        except ValueError as e:
            raise AdminError(400, str(e)) from None
        saved = self._saved_pins.load()
        if text not in saved:
            if any(p.image == text for p in self.pins()):
                raise AdminError(409, f"{text} is pinned in the config file (cache.pinned)")
            raise AdminError(404, f"{text} is not pinned")
        self._saved_pins.save([p for p in saved if p != text])
        self._apply_pins()

    def reload_saved(self) -> None:
        """Apply the saved upstreams and pins again (another node of a
        cluster changed them)."""
        configs = self._saved.apply(self._config).upstreams
        if dict(configs) != dict(self._upstreams.configs):
            self._upstreams.update(configs, self._upstreams.default)
            log.info("upstreams changed by another node applied")
        self._apply_pins()

    def _apply_pins(self) -> None:
        self._evictor.pins = [as_pin(p.image) for p in self.pins()]

    # -- upstreams -------------------------------------------------------------

    def upstreams(self) -> dict[str, dict[str, Any]]:
        return {name: self._view(name) for name in sorted(self._upstreams.configs)}

    def _view(self, name: str) -> dict[str, Any]:
        config = self._upstreams.configs[name]
        return {
            **settings_of(config),
            "preset": name in PRESETS,
            "default": name == self._upstreams.default,
        }

    def set_upstream(
        self, name: str, settings: dict[str, Any], merge: bool = False
    ) -> dict[str, Any]:
        current = self._upstreams.configs.get(name)
        if merge and current is None:
            raise AdminError(404, f"unknown upstream {name!r}: PUT it to add it")
        if not isinstance(settings, dict):
            raise AdminError(400, "upstream settings must be a JSON object")
        local = sorted(set(settings) & _LOCAL_REFERENCES)
        if local:
            # they would let an API caller read the daemon's files and environment
            raise AdminError(
                400,
                f"{', '.join(local)} can be set in the config file only; "
                "through the API give the password itself",
            )
        if merge and current is not None and "url" in settings and settings["url"] != current.url:
            # credentials stay with the host they were given for: the new one
            # gets only those this request gives again
            settings = {**dict.fromkeys(_CREDENTIALS), **settings}
        if merge:
            given = {**settings_of(current, redact=False), **settings}  # type: ignore[arg-type]
            given = {k: v for k, v in given.items() if v is not None}
        else:
            given = dict(settings)
        try:
            upstream = upstream_from_settings(name, given)
            configs = {**self._upstreams.configs, name: upstream}
            attrs.evolve(self._config, upstreams=configs)  # cross-checks fallbacks, aliases
        except ConfigError as e:
            raise AdminError(400, str(e)) from None
        except ValueError as e:
            raise AdminError(400, str(e)) from None
        self._upstreams.update(configs, self._upstreams.default)
        self._saved.put(name, settings_of(upstream, redact=False))
        log.info("upstream {name} set through the admin API", name=name)
        return self._view(name)

    def remove_upstream(self, name: str) -> None:
        if name not in self._upstreams.configs:
            raise AdminError(404, f"unknown upstream {name!r}")
        if name == self._upstreams.default:
            raise AdminError(409, f"{name!r} is the default upstream")
        users = [n for n, c in self._upstreams.configs.items() if name in c.fallbacks]
        if users:
            raise AdminError(409, f"{name!r} is a fallback of {', '.join(users)}")
        if name in PRESETS:
            raise AdminError(409, f"{name!r} is built in; PUT it to change it")
        configs = {n: c for n, c in self._upstreams.configs.items() if n != name}
        self._upstreams.update(configs, self._upstreams.default)
        self._saved.put(name, None)
        log.info("upstream {name} removed through the admin API", name=name)


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


#: every setting that is (or leads to) an upstream's credentials
_CREDENTIALS = ("username", "password", "password_env", "password_file")
#: settings that name files or environment variables of the machine regproxy runs on
_LOCAL_REFERENCES = {"password_file", "password_env", "ca_file"}


def _normal(image: str) -> str:
    """An image reference as users type it, in its one normal form."""
    return str(parse_image(image))


def as_pin(image: str) -> EvictionPin:
    parsed = parse_image(image)
    return (parsed.upstream, parsed.repository, parsed.tag, parsed.digest)


class SavedPins:
    """Pins added through the admin API, in a JSON list beside the cache."""

    def __init__(self, path: str) -> None:
        self.path = path

    def load(self) -> list[str]:
        data = _load_json(self.path)
        return [p for p in data if isinstance(p, str)] if isinstance(data, list) else []

    def save(self, pins: list[str]) -> None:
        _save_json(self.path, pins)


def _load_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        log.error("ignoring unreadable {path}: {why}", path=path, why=e)
        return None


def _save_json(path: str, data: Any) -> None:
    """Atomically, durably, readable by the owner only (it may hold passwords)."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".saving.")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class SavedUpstreams:
    """Upstream changes made through the admin API, in a JSON file beside
    the cache (mode 0600: it may hold passwords), so they survive restarts."""

    def __init__(self, path: str) -> None:
        self.path = path

    def load(self) -> dict[str, dict[str, Any] | None]:
        data = _load_json(self.path)
        return data if isinstance(data, dict) else {}

    def put(self, name: str, settings: dict[str, Any] | None) -> None:
        data = self.load()
        data[name] = settings
        _save_json(self.path, data)

    def apply(self, config: Config) -> Config:
        return apply_upstreams(config, self.load())


def apply_upstreams(config: Config, saved: dict[str, dict[str, Any] | None]) -> Config:
    """*config* with the *saved* changes on top; a saved entry that no
    longer validates is logged and skipped."""
    configs = dict(config.upstreams)
    for name, settings in saved.items():
        if settings is None:
            configs.pop(name, None)
            continue
        try:
            configs[name] = upstream_from_settings(name, settings)
        except ConfigError as e:
            log.error("ignoring saved upstream {name}: {why}", name=name, why=e)
    try:
        return attrs.evolve(config, upstreams=configs)
    except ValueError as e:
        log.error("ignoring saved upstream changes: {why}", why=e)
        return config


# -- in the index's worker thread ----------------------------------------------


def _summaries(upstream: str | None, index: Index) -> list[RepositorySummary]:
    out = []
    for row in index.repositories(upstream):
        manifests = index.repo_manifests(row.upstream, row.repo)
        blobs = {child for m in manifests for child, kind in index.refs(m.digest) if kind == "blob"}
        size = sum(m.size for m in manifests) + sum(index.blob_sizes(blobs).values())
        out.append(
            RepositorySummary(
                row.upstream, row.repo, row.tags, row.manifests, size, row.last_access
            )
        )
    return out


def _detail(upstream: str, repository: str, ttl: float, index: Index) -> RepositoryDetail | None:
    manifests = index.repo_manifests(upstream, repository)
    if not manifests:
        return None
    tags = tuple(
        TagInfo(t.tag, t.digest, t.media_type, t.checked_at, t.checked_at + ttl)
        for t in index.repo_tags(upstream, repository)
    )
    infos = []
    for m in manifests:
        refs = index.refs(m.digest)
        blob_digests = [child for child, kind in refs if kind == "blob"]
        sizes = index.blob_sizes(blob_digests)
        infos.append(
            ManifestInfo(
                m.digest,
                m.media_type,
                m.size,
                m.fetched_at,
                m.last_access,
                tuple(BlobInfo(b, sizes.get(b), b in sizes) for b in blob_digests),
                tuple(child for child, kind in refs if kind == "manifest"),
            )
        )
    return RepositoryDetail(upstream, repository, tags, tuple(infos))
