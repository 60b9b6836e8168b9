"""Manifests by digest (immutable) and tags by TTL, revalidated with HEAD.

A tag inside its TTL is answered from the cache.  After the TTL an upstream
``HEAD`` (free on Docker Hub's pull limit) tells whether the digest moved;
only then is the manifest fetched again.  Requests by digest never
revalidate.  A tag's entry is always what the registry stores for it: see
:mod:`registryproxy.mediatypes` for how each client's ``Accept`` is met.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from functools import partial

import attrs
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.defer import TimeoutError as Late
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger

from ..bounded import Bounded
from ..errors import UPSTREAM_TROUBLE, RegistryError
from ..mediatypes import LISTS, acceptable, default_platform, upstream_accept
from ..names import Digest, is_valid_digest
from ..singleflight import SingleFlight
from ..upstream.client import RegistryClient
from .access import IndexAccess
from .blobs import PeerSource
from .index import Index, ManifestEntry, Pace, TagEntry
from .shared import SharedStore
from .store import BlobStore

log = Logger()

#: how long a purge waits for manifests being cached in the background
SETTLE_SECONDS = 10.0
#: a manifest listing more descriptors is served but not cached (no image
#: has more than 128 layers; an upstream listing tens of thousands, in a
#: manifest of 4 MiB, cost seconds of index writes)
MAX_REFS = 1000
#: descriptors written ahead per step (a short transaction), the reactor
#: serving others between steps, before the manifest is recorded whole
REFS_PER_STEP = 128
#: the reactor thread's time a step may take: fewer descriptors a step when
#: they cost more (4 rows of 4 B-trees each: 128 took 7 ms at 20,000 images,
#: and every client of the proxy waited as long).  A request that comes
#: during a step waits for it at each of its two or three reactor turns: 1 ms
#: made a cached manifest's p99 3.4 ms while such lists were written, 0.5 ms
#: 1.9 ms (bench/bigindex.py's wide), the writing 13% longer.  A shared
#: index's steps run elsewhere, and are REFS_PER_STEP each.
REFS_HOLD_SECONDS = 0.0005
#: the reactor thread's CPU time, for steps done on it (an inline index's)
_busy = time.thread_time


@attrs.frozen
class CachedManifest:
    body: bytes
    media_type: str
    digest: str
    #: "HIT" or "MISS", for the X-Cache header
    cache: str


class ManifestCache:
    def __init__(
        self,
        store: BlobStore,
        index: IndexAccess,
        clock: IReactorTime,
        tag_ttl: float,
        max_stale: float | None = None,
        shared: SharedStore | None = None,
        peers: PeerSource | None = None,
    ) -> None:
        """*shared*: in a cluster, the store all nodes share, of which
        *store* is this node's local tier (see :mod:`.shared`); *peers*:
        the other nodes, one of which fetches each manifest."""
        self._store = store
        self._shared = shared
        self._peers = peers
        #: the answers served most often, without the index or the disk
        self._hot = HotAnswers()
        #: manifests answered and being cached in the background (a cluster's)
        self._caching: set[Deferred[None]] = set()
        self._index = index
        self._clock = clock
        self._tag_ttl = tag_ttl
        self._max_stale = max_stale
        self._flight: SingleFlight[tuple[str, str, str], CachedManifest] = SingleFlight()
        #: how many descriptors a step writes ahead, from how long the last took
        #: (the first few: 128 took 7 ms on the reactor thread at 20,000 images)
        self._refs_pace = Pace(REFS_PER_STEP, REFS_HOLD_SECONDS)

    async def get(
        self,
        client: RegistryClient,
        repo: str,
        reference: str,
        accept: Sequence[str],
        forward: bool = True,
    ) -> CachedManifest:
        """The manifest a client that sent *accept* gets for *reference*.

        What is cached and asked upstream does not depend on *accept*: by
        digest, the bytes of that digest; by tag, what the registry stores
        for the tag, or for a client that takes no lists, the linux/amd64
        manifest of the stored list (as Distribution picks).  A tag whose
        stored type the client does not take is ``404 MANIFEST_UNKNOWN``.
        In a cluster a manifest not cached is fetched by the node that owns
        it, unless *forward* is false (a peer's request: never passed on)."""
        manifest = await self._stored(client, repo, reference, accept, forward)
        if is_valid_digest(reference) or acceptable(manifest.media_type, accept):
            return manifest
        if manifest.media_type in LISTS:
            child = default_platform(manifest.body)
            if child is not None and is_valid_digest(child):
                platform = await self._stored(client, repo, child, accept, forward)
                if acceptable(platform.media_type, accept):
                    return platform
        raise RegistryError(
            404,
            "MANIFEST_UNKNOWN",
            f"{repo}:{reference} is a {manifest.media_type}, which the Accept header does not "
            f"take (it takes {', '.join(accept)})",
        )

    async def _stored(
        self,
        client: RegistryClient,
        repo: str,
        reference: str,
        accept: Sequence[str],
        forward: bool = True,
    ) -> CachedManifest:
        """What the registry stores under *reference*: from the cache, or
        revalidated or fetched once however many clients ask at once."""
        key = (client.name, repo, reference)
        # an answer read before a purge or an eviction that lands after it
        # is not kept (in a cluster the index and the store answer later)
        seen = self._hot.generation
        hot = self._hot.get(key, self._clock.seconds())
        if hot is not None:
            self.touch(client.name, repo, hot.digest)
            return hot
        if is_valid_digest(reference):
            known = await self._index.quick(partial(_by_digest, client.name, repo, reference))
            cached = await self._read(client.name, repo, known)
            if cached is not None:
                self._hot.put(key, cached, None, seen)
                return cached
            return await self._flight.run(
                key, lambda: self._fetch(client, repo, reference, accept, forward, seen)
            )
        entry, known = await self._index.quick(partial(_by_tag, client.name, repo, reference))
        cached = await self._read(client.name, repo, known)
        if entry is None or cached is None:
            return await self._flight.run(
                key, lambda: self._fetch(client, repo, reference, accept, forward, seen)
            )
        ttl = client.config.tag_ttl
        expired_for = (
            self._clock.seconds() - entry.checked_at - (self._tag_ttl if ttl is None else ttl)
        )
        if expired_for < 0:
            self._hot.put(key, cached, self._clock.seconds() - expired_for, seen)
            return cached
        try:
            return await self._flight.run(
                key,
                lambda: self._revalidate(
                    client, repo, reference, accept, entry, cached, forward, seen
                ),
            )
        except RegistryError as e:
            # stale-if-error: an old answer beats none while the upstream is in trouble
            if e.status not in UPSTREAM_TROUBLE:
                raise
            if self._max_stale is not None and expired_for > self._max_stale:
                raise
            log.warn(
                "serving {upstream}/{repo}:{tag} stale by {age:.0f}s: {why}",
                upstream=client.name,
                repo=repo,
                tag=reference,
                age=expired_for,
                why=e.message,
            )
            return attrs.evolve(cached, cache="STALE")

    async def _read(
        self, upstream: str, repo: str, entry: ManifestEntry | None
    ) -> CachedManifest | None:
        """The stored manifest the index knows as *entry*, if its file is
        there (in a cluster: here, or in the shared store) and whole."""
        if entry is None:
            return None
        digest = entry.digest
        parsed = Digest.parse(digest)
        try:
            with self._store.open(parsed) as f:
                body = f.read()
        except FileNotFoundError:
            if self._shared is None:
                return None
            shared = await self._from_shared(parsed)
            if shared is None:
                return None
            body = shared
        if Digest.of(body, parsed.algorithm) != parsed:
            # rotten on disk: never served; the caller fetches it again,
            # which writes the file and its index rows anew
            log.error("quarantined manifest {digest}: its bytes do not match", digest=digest)
            self._store.quarantine(parsed)
            return None
        self.touch(upstream, repo, digest)
        return CachedManifest(body, entry.media_type, digest, "HIT")

    def kept(self, upstream: str, repo: str, reference: str) -> CachedManifest | None:
        """What the registry stores under *reference*, if kept in memory and
        still valid (the same object as long as it is)."""
        return self._hot.get((upstream, repo, reference), self._clock.seconds())

    def touch(self, upstream: str, repo: str, digest: str) -> None:
        """Remember a read, for eviction (in memory: written by the next flush)."""
        now = self._clock.seconds()
        self._index.touch_manifest(upstream, repo, digest, now)
        self._index.touch_blob(digest, now)

    def forget(self) -> Deferred[None]:
        """Another node purges: land what is being cached, then forget the
        answers kept in memory."""

        async def forget() -> None:
            await self.settle()
            self.forget_hot()

        return Deferred.fromCoroutine(forget())

    def forget_hot(self) -> None:
        """Something was purged or evicted (here, or by another node of a
        cluster): answers kept in memory are asked of the index again."""
        self._hot.clear()

    async def _from_shared(self, digest: Digest) -> bytes | None:
        """A manifest another node cached, from the shared store, and a
        local copy of it for next time (only if its bytes check out)."""
        assert self._shared is not None
        try:
            body = await self._shared.get(digest)
        except Exception as e:
            log.warn(
                "cannot read manifest {digest} from the cluster: {why}", digest=str(digest), why=e
            )
            return None
        if body is None or Digest.of(body, digest.algorithm) != digest:
            return None
        try:
            await self._keep(digest, body)
        except Exception as e:  # the local copy is a convenience
            log.warn("cannot keep a local copy of {digest}: {why}", digest=str(digest), why=e)
        return body

    async def _keep(self, digest: Digest, body: bytes) -> None:
        """Write *body* into the local store, unless it is there."""
        if self._store.stat(digest) is not None:
            return
        writer = self._store.begin(digest, len(body))
        try:
            writer.write(body)
            await writer.commit()
        except BaseException:
            writer.abort()
            raise
        finally:
            writer.close()

    async def _revalidate(
        self,
        client: RegistryClient,
        repo: str,
        tag: str,
        accept: Sequence[str],
        entry: TagEntry,
        cached: CachedManifest,
        forward: bool,
        seen: int,
    ) -> CachedManifest:
        head = await client.head_manifest(repo, tag, upstream_accept(accept))
        if head.digest == entry.digest:
            log.debug("{upstream}/{repo}:{tag} unchanged", upstream=client.name, repo=repo, tag=tag)
            checked = attrs.evolve(entry, checked_at=self._clock.seconds())
            await self._index.quick(lambda index: index.put_tag(client.name, repo, tag, checked))
            return cached
        return await self._fetch(client, repo, tag, accept, forward, seen)

    async def _fetch(
        self,
        client: RegistryClient,
        repo: str,
        reference: str,
        accept: Sequence[str],
        forward: bool,
        seen: int,
    ) -> CachedManifest:
        """Fetch a manifest (in a cluster, from the node that owns it) and
        cache it; *seen*: the generation of the answers in memory when the
        client asked (one that lands after a purge is not kept there)."""
        manifest, from_peer = None, False
        if forward and self._peers is not None:
            # one upstream fetch for the cluster: the owner's (checked here
            # all the same); None if it does not answer
            peer = self._peers.owner(f"manifest:{client.name}/{repo}:{reference}")
            if peer is not None:
                manifest = await self._peers.get_manifest(peer, client, repo, reference)
                from_peer = manifest is not None
        if manifest is None:
            manifest = await client.get_manifest(repo, reference, upstream_accept(accept))
        body = manifest.body
        # more digests than a cached manifest may list descriptors: not
        # parsed (it is not cached, so a hostile upstream would have the
        # reactor thread parse up to 4 MiB of JSON at each request); served
        # if its bytes are those of its digest
        digests = body.count(b'"digest"')
        refs = references(body) if digests <= MAX_REFS else []
        if refs is None:
            raise RegistryError(
                502,
                "MANIFEST_INVALID",
                f"upstream {client.name} answered {repo}:{reference} with something that is "
                "not a manifest (not a JSON object)",
            )
        expected = None
        if is_valid_digest(reference):
            expected = Digest.parse(reference)
        elif manifest.digest and is_valid_digest(manifest.digest):
            expected = Digest.parse(manifest.digest)
        actual = Digest.of(body) if expected is None else Digest.of(body, expected.algorithm)
        if expected is not None and actual != expected:
            raise RegistryError(
                502,
                "MANIFEST_INVALID",
                f"upstream {client.name} sent a manifest for {repo}:{reference} "
                f"whose content is {actual}, not {expected}",
            )
        digest = str(actual)
        if from_peer:  # the owner cached it (bucket and index): nothing to write here
            return CachedManifest(body, manifest.media_type, digest, manifest.cache)
        fetched = CachedManifest(body, manifest.media_type, digest, "MISS")
        if digests > MAX_REFS or len(refs) > MAX_REFS:  # (keys may be escaped: \u0064igest)
            log.warn(
                "not caching {upstream}/{repo}:{reference}: it lists more than the {most} "
                "descriptors a cached manifest may",
                upstream=client.name,
                repo=repo,
                reference=reference,
                most=MAX_REFS,
            )
            return fetched
        if self._shared is None:
            await self._cache(client, repo, reference, fetched, refs)
            return fetched
        # a cluster's store takes a while (an upload, then the index): this
        # node answers from memory meanwhile, the client not waiting for it
        ttl = client.config.tag_ttl
        fresh = (
            None
            if is_valid_digest(reference)
            else self._clock.seconds() + (self._tag_ttl if ttl is None else ttl)
        )
        self._hot.put(
            (client.name, repo, reference), attrs.evolve(fetched, cache="HIT"), fresh, seen
        )
        caching = Deferred.fromCoroutine(self._cache(client, repo, reference, fetched, refs))
        self._caching.add(caching)
        caching.addBoth(lambda _: self._caching.discard(caching))
        return fetched

    async def settle(self) -> None:
        """Wait for the manifests being cached in the background (a purge
        must find them), at most :data:`SETTLE_SECONDS`."""
        pending = list(self._caching)
        if pending:
            # new Deferreds: a timeout must not cancel the caching itself
            waiting = DeferredList([_when_done(d) for d in pending])
            waiting.addTimeout(SETTLE_SECONDS, self._clock)
            try:
                await waiting
            except Late:
                log.warn("purging with {n} manifests still being cached", n=len(pending))

    async def _cache(
        self,
        client: RegistryClient,
        repo: str,
        reference: str,
        manifest: CachedManifest,
        refs: list[tuple[str, str]],
    ) -> None:
        """Keep a fetched manifest: its bytes in the store (and a cluster's
        shared store), then its rows in the index.  What it lists (*refs*)
        past a step's worth is written ahead a step at a time, then the
        rest with its row, in one transaction that writes it all again if
        any went meanwhile: no one sees it known with part of its list."""
        actual, digest = Digest.parse(manifest.digest), manifest.digest
        now = self._clock.seconds()
        try:
            await self._keep(actual, manifest.body)
            if self._shared is not None:  # in the shared store before the index says so
                await self._shared.upload(actual, self._store.path(actual), len(manifest.body))
            entry = ManifestEntry(digest, manifest.media_type, len(manifest.body))
            tag = (
                None
                if is_valid_digest(reference)
                else (reference, TagEntry(digest, entry.media_type, now))
            )
            pace, ahead, mark = self._refs_pace, 0, None
            if len(refs) > pace.size:
                mark = await self._index.quick(_removal_mark)
            while len(refs) - ahead > pace.size:
                step = refs[ahead : ahead + pace.size]
                began = _busy()
                written = self._index.quick(partial(_ahead, client.name, repo, digest, step, ahead))
                if written.called:  # on the reactor thread: paced
                    pace.took(_busy() - began, len(step))
                else:  # a shared index's, elsewhere: nothing of the reactor's to go by
                    pace.size = pace.most
                await written
                ahead += len(step)
                await deferLater(self._clock, 0, lambda: None)
            await self._index.quick(
                partial(_record, client.name, repo, entry, now, refs, ahead, mark, tag)
            )
        except Exception as e:  # the store's OSError, or the index's error
            # The client still gets its manifest; the next request tries again.
            log.error("could not cache manifest {digest}: {why}", digest=digest, why=e)
            return
        log.info(
            "cached manifest {upstream}/{repo}:{reference} as {digest}",
            upstream=client.name,
            repo=repo,
            reference=reference,
            digest=digest,
        )


def _when_done(d: Deferred[None]) -> Deferred[None]:
    """A Deferred that fires when *d* does; cancelling it leaves *d* be."""
    done: Deferred[None] = Deferred()

    def fired(result: object) -> object:
        if not done.called:
            done.callback(None)
        return result

    d.addBoth(fired)
    return done


class HotAnswers:
    """Cached manifests by (upstream, repository, reference), in memory, for
    as long as the answer holds (a tag until its TTL runs out, a digest for
    good), the least recently used dropped past :attr:`MAX_BYTES` or
    :attr:`MAX_ENTRIES`.  Emptied
    whenever anything is purged or evicted (:meth:`ManifestCache.forget_hot`)."""

    MAX_BYTES = 64 * 1024 * 1024
    #: a bound on entries too: many tiny manifests cost more than their bytes
    MAX_ENTRIES = 100_000

    def __init__(self, max_bytes: int = MAX_BYTES, max_entries: int = MAX_ENTRIES) -> None:
        self._kept: Bounded[tuple[str, str, str], CachedManifest] = Bounded(max_bytes, max_entries)
        #: how many times it was emptied
        self.generation = 0

    def get(self, key: tuple[str, str, str], now: float) -> CachedManifest | None:
        return self._kept.get(key, now)

    def put(
        self, key: tuple[str, str, str], manifest: CachedManifest, until: float | None, seen: int
    ) -> None:
        """Keep *manifest* until *until*, unless it was read (from the index
        or the upstream) in *seen*, a generation emptied since: it may name
        what a purge or an eviction took."""
        if seen == self.generation:
            self._kept.put(key, manifest, len(manifest.body), until)

    def clear(self) -> None:
        self._kept.clear()
        self.generation += 1


def _by_digest(upstream: str, repo: str, digest: str, index: Index) -> ManifestEntry | None:
    return index.manifest(upstream, repo, digest)


def _by_tag(
    upstream: str, repo: str, tag: str, index: Index
) -> tuple[TagEntry | None, ManifestEntry | None]:
    """The tag's entry and its manifest's, in one visit to the index."""
    entry = index.tag(upstream, repo, tag)
    return entry, (index.manifest(upstream, repo, entry.digest) if entry else None)


def _ahead(
    upstream: str, repo: str, digest: str, refs: list[tuple[str, str]], first: int, index: Index
) -> None:
    """Part of what a manifest lists, ahead of it (by name: whichever index it is)."""
    index.put_refs(upstream, repo, digest, refs, first)


def _removal_mark(index: Index) -> tuple[int, int] | None:
    """(By name: whichever index it is.)"""
    return index.removal_mark()


def _record(
    upstream: str,
    repo: str,
    entry: ManifestEntry,
    now: float,
    refs: list[tuple[str, str]],
    ahead: int,
    mark: tuple[int, int] | None,
    tag: tuple[str, TagEntry] | None,
    index: Index,
) -> None:
    """A fetched manifest into the index: its file, what it lists (the
    first *ahead* written ahead, after the index's removal *mark*), its tag."""
    index.put_blob(entry.digest, entry.size, now)
    index.put_manifest(upstream, repo, entry, now, refs, ahead, mark)
    if tag is not None:
        index.put_tag(upstream, repo, *tag)


def references(body: bytes) -> list[tuple[str, str]] | None:
    """What a manifest lists: ``(digest, "blob")`` for its config and layers,
    ``(digest, "manifest")`` for the platform manifests of an index; None
    for a body that is not a JSON object (no manifest)."""
    try:
        manifest = json.loads(body)
        if not isinstance(manifest, dict):
            return None
        blobs = [manifest.get("config") or {}]
        blobs += manifest.get("layers") or []
        blobs += manifest.get("blobs") or []
        children = manifest.get("manifests") or []
        return [
            (d["digest"], kind)
            for kind, descriptors in (("blob", blobs), ("manifest", children))
            for d in descriptors
            if isinstance(d, dict) and is_valid_digest(str(d.get("digest", "")))
        ]
    except (ValueError, RecursionError):  # not JSON, or nested past what Python parses
        return None
    except (TypeError, AttributeError):
        return []
