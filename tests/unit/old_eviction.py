"""The eviction and purge code as it was before issue 10, kept as the oracle
that the SQL selection (:meth:`Index.evict`, the set-based :meth:`Index.purge`)
must agree with: per-row Python loops, a query each."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Collection, Iterable

from registryproxy.cache.index import Index, Removed, _manifest_filter


class OldIndex(Index):
    # -- eviction ------------------------------------------------------------

    def least_recently_used(self) -> list[tuple[str, str, str, float]]:
        """Every manifest, least recently used (or fetched) first:
        ``(upstream, repo, digest, last use)``."""
        self.flush()
        return self._db.execute(
            "SELECT upstream, repo, digest, COALESCE(last_access, fetched_at) AS used"
            " FROM manifests ORDER BY used, fetched_at"
        ).fetchall()

    def family(self, upstream: str, repo: str, digests: Iterable[str]) -> set[str]:
        """*digests* and the child manifests they list that are cached in the repo."""
        out: set[str] = set()
        for digest in digests:
            out.add(digest)
            for child, kind in self.refs(digest):
                if kind == "manifest" and self.manifest(upstream, repo, child):
                    out.add(child)
        return out

    def pinned(
        self, pins: Iterable[tuple[str, str, str | None, str | None]]
    ) -> set[tuple[str, str, str]]:
        """The manifests ``(upstream, repo, digest)`` that pins keep: a pin of a
        repository keeps all of it, of a tag what the tag points to, of a
        digest that manifest, each with its platform manifests."""
        kept: set[tuple[str, str, str]] = set()
        for upstream, repo, tag, digest in pins:
            if digest is not None:
                roots = [digest]
            elif tag is not None:
                roots = [
                    d
                    for (d,) in self._db.execute(
                        "SELECT digest FROM tags WHERE upstream=? AND repo=? AND tag=?",
                        (upstream, repo, tag),
                    )
                ]
            else:
                roots = [m.digest for m in self.repo_manifests(upstream, repo)]
            kept.update((upstream, repo, d) for d in self.family(upstream, repo, roots))
        return kept

    def loose_blobs(self) -> list[tuple[str, int]]:
        """Store files no cached manifest is or lists, least recently used first."""
        return self._db.execute(
            "SELECT b.digest, b.size FROM blobs b"
            " WHERE NOT EXISTS (SELECT 1 FROM manifests m WHERE m.digest = b.digest)"
            " AND NOT EXISTS (SELECT 1 FROM refs r JOIN manifests m ON m.digest = r.manifest"
            "                 WHERE r.child = b.digest)"
            " ORDER BY COALESCE(b.last_access, b.stored_at)"
        ).fetchall()

    # -- purging -------------------------------------------------------------

    def purge(
        self,
        upstream: str | None = None,
        repo: str | None = None,
        tag: str | None = None,
        digest: str | None = None,
        fetched_before: float | None = None,
        unused_since: float | None = None,
    ) -> Removed:
        """Remove the selected manifests (and the tags that pointed to them)
        and report the store files nothing cached lists any more.

        With *tag*, the tag's mappings go, and the manifests only that tag
        kept (an index and its platform manifests); with *digest*, one
        manifest and the platform manifests only it listed."""
        self.flush()
        with self._transaction() as db:
            where, args = _manifest_filter(upstream, repo, digest, fetched_before, unused_since)
            tags_removed = 0
            if tag is not None:
                roots = db.execute(
                    "SELECT DISTINCT upstream, repo, digest FROM tags"
                    " WHERE upstream=? AND repo=? AND tag=?",
                    (upstream, repo, tag),
                ).fetchall()
                tags_removed = db.execute(
                    "DELETE FROM tags WHERE upstream=? AND repo=? AND tag=?", (upstream, repo, tag)
                ).rowcount
                doomed = self._unkept(db, roots)
            else:
                doomed = db.execute(
                    f"SELECT upstream, repo, digest FROM manifests WHERE {where}", args
                ).fetchall()
                if digest is not None:
                    doomed = self._unkept(db, doomed, keep_tagged=False)
            doomed_set = set(doomed)
            for up, rp, dg in doomed_set:
                db.execute(
                    "DELETE FROM manifests WHERE upstream=? AND repo=? AND digest=?", (up, rp, dg)
                )
                tags_removed += db.execute(
                    "DELETE FROM tags WHERE upstream=? AND repo=? AND digest=?", (up, rp, dg)
                ).rowcount
            # repositories left with no manifest lose their read permissions
            for up, rp in {(up, rp) for up, rp, _ in doomed_set}:
                left = db.execute(
                    "SELECT 1 FROM manifests WHERE upstream=? AND repo=? LIMIT 1", (up, rp)
                ).fetchone()
                if left is None:
                    db.execute("DELETE FROM repo_blobs WHERE upstream=? AND repo=?", (up, rp))
            orphans = self._orphans(db, {dg for _, _, dg in doomed_set})
        return Removed(tags_removed, len(doomed_set), orphans)

    def _unkept(
        self, db: sqlite3.Connection, roots: list[tuple[str, str, str]], keep_tagged: bool = True
    ) -> list[tuple[str, str, str]]:
        """*roots* and the child manifests they list in the same repository,
        less those another remaining tag (or manifest) of the repository still keeps."""
        doomed: set[tuple[str, str, str]] = set()
        for up, rp, root in roots:
            family = {root} | {child for child, kind in self.refs(root) if kind == "manifest"}
            for dg in family:
                if db.execute(
                    "SELECT 1 FROM manifests WHERE upstream=? AND repo=? AND digest=?",
                    (up, rp, dg),
                ).fetchone():
                    doomed.add((up, rp, dg))
        kept: set[tuple[str, str, str]] = set()
        for up, rp, dg in doomed:
            if (
                keep_tagged
                and db.execute(
                    "SELECT 1 FROM tags WHERE upstream=? AND repo=? AND digest=? LIMIT 1",
                    (up, rp, dg),
                ).fetchone()
            ):
                kept.add((up, rp, dg))
                continue
            # a platform manifest still listed by a remaining index of the repo
            parents = db.execute(
                "SELECT m.digest FROM refs r JOIN manifests m ON m.digest = r.manifest"
                " WHERE r.child=? AND m.upstream=? AND m.repo=?",
                (dg, up, rp),
            ).fetchall()
            if any((up, rp, parent) not in doomed for (parent,) in parents):
                kept.add((up, rp, dg))
        return sorted(doomed - kept)

    def _orphans(self, db: sqlite3.Connection, removed: set[str]) -> list[tuple[str, int]]:
        candidates = set(removed)
        for manifest in removed:
            candidates.update(child for child, _ in self.refs(manifest))
        orphans: list[tuple[str, int]] = []
        for digest in sorted(candidates):
            still_manifest = db.execute(
                "SELECT 1 FROM manifests WHERE digest=? LIMIT 1", (digest,)
            ).fetchone()
            still_listed = db.execute(
                "SELECT 1 FROM refs r JOIN manifests m ON m.digest = r.manifest"
                " WHERE r.child=? LIMIT 1",
                (digest,),
            ).fetchone()
            if still_manifest or still_listed:
                continue
            row = db.execute("SELECT size FROM blobs WHERE digest=?", (digest,)).fetchone()
            db.execute("DELETE FROM blobs WHERE digest=?", (digest,))
            db.execute("DELETE FROM repo_blobs WHERE digest=?", (digest,))
            orphans.append((digest, row[0] if row else 0))
        # refs of manifests no longer cached anywhere are dead weight
        for manifest in removed:
            if not db.execute(
                "SELECT 1 FROM manifests WHERE digest=? LIMIT 1", (manifest,)
            ).fetchone():
                db.execute("DELETE FROM refs WHERE manifest=?", (manifest,))
        return orphans


def old_evict(
    index: OldIndex,
    pins: Iterable[tuple[str, str, str | None, str | None]],
    busy: Collection[str],
    wanted: Callable[[float], bool],
) -> tuple[list[tuple[str, str, str]], list[tuple[str, int]]]:
    """The old ``Evictor._evict``, less the files: (images purged, blobs freed)."""
    pinned = index.pinned(pins)
    gone: set[tuple[str, str, str]] = set()
    evicted, freed = [], []
    for upstream, repo, digest, used in index.least_recently_used():
        if (upstream, repo, digest) in pinned or (upstream, repo, digest) in gone:
            continue
        if not wanted(used):
            break
        family = index.family(upstream, repo, [digest])
        if any((upstream, repo, d) in pinned for d in family):
            continue
        if busy and any(child in busy for d in family for child, _ in index.refs(d)):
            continue
        removed = index.purge(upstream=upstream, repo=repo, digest=digest)
        gone.update((upstream, repo, d) for d in family)
        if removed.manifests:
            evicted.append((upstream, repo, digest))
        freed += removed.blobs
    return evicted, freed


def old_evict_loose(index: OldIndex, busy: Collection[str], excess: float) -> list[tuple[str, int]]:
    """The old ``Evictor._evict_loose``, with the sizes the index recorded."""
    freed: list[tuple[str, int]] = []
    for digest, size in index.loose_blobs():
        if excess - sum(s for _, s in freed) <= 0:
            break
        if digest in busy:
            continue
        index.forget_blob(digest)
        freed.append((digest, size))
    return freed
