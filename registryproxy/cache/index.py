"""What is cached, in SQLite (WAL): manifests, tags, blobs, who may read what.

Manifest bytes live in the blob store by digest like any blob; this index
remembers which upstream repository a manifest was fetched for, its media
type, which digest a tag pointed to when (one per tag: what the registry
stores, never a conversion asked for by one client), which blobs and child
manifests each manifest lists, and sizes and access times for the admin API
and eviction.

Access times are kept in memory and written in batches (:meth:`flush`), so a
cache hit never waits for a disk write.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import attrs
from twisted.logger import Logger

log = Logger()

_SCHEMA = """
CREATE TABLE IF NOT EXISTS manifests (
    upstream TEXT NOT NULL, repo TEXT NOT NULL, digest TEXT NOT NULL,
    media_type TEXT NOT NULL, size INTEGER NOT NULL, fetched_at REAL NOT NULL,
    last_access REAL,
    PRIMARY KEY (upstream, repo, digest)
);
CREATE TABLE IF NOT EXISTS tags (
    upstream TEXT NOT NULL, repo TEXT NOT NULL, tag TEXT NOT NULL,
    media_type TEXT NOT NULL, digest TEXT NOT NULL, checked_at REAL NOT NULL,
    PRIMARY KEY (upstream, repo, tag)
);
-- what a manifest lists: blobs (config, layers) and, for an index, manifests
CREATE TABLE IF NOT EXISTS refs (
    manifest TEXT NOT NULL, child TEXT NOT NULL, kind TEXT NOT NULL,
    position INTEGER NOT NULL,
    PRIMARY KEY (manifest, child)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS refs_child ON refs (child);
-- every file in the blob store (manifests included)
CREATE TABLE IF NOT EXISTS blobs (
    digest TEXT PRIMARY KEY, size INTEGER NOT NULL, stored_at REAL NOT NULL,
    last_access REAL
);
-- which repositories may read which blobs: those whose manifests list
-- them, or whose upstream confirmed them
CREATE TABLE IF NOT EXISTS repo_blobs (
    upstream TEXT NOT NULL, repo TEXT NOT NULL, digest TEXT NOT NULL,
    PRIMARY KEY (upstream, repo, digest)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS repo_blobs_digest ON repo_blobs (digest);
"""
_VERSION = 2


@attrs.frozen
class ManifestEntry:
    digest: str
    media_type: str
    size: int


@attrs.frozen
class TagEntry:
    digest: str
    media_type: str
    checked_at: float


@attrs.frozen
class ManifestRow:
    upstream: str
    repo: str
    digest: str
    media_type: str
    size: int
    fetched_at: float
    last_access: float | None


@attrs.frozen
class TagRow:
    upstream: str
    repo: str
    tag: str
    media_type: str
    digest: str
    checked_at: float


@attrs.frozen
class RepoRow:
    upstream: str
    repo: str
    tags: int
    manifests: int
    last_access: float | None


@attrs.frozen
class Removed:
    """What a purge took out of the index; the caller deletes the blob files."""

    tags: int
    manifests: int
    #: (digest, size) of store files nothing cached lists any more
    blobs: list[tuple[str, int]]


class IndexUnusable(Exception):
    """The index file is unusable (corrupt, or written by a newer regproxy)."""


def set_aside(path: str, now: float) -> str:
    """Move an unusable index (with its WAL files) out of the way, to
    ``<path>.corrupt-<UTC time>``; the name it now has."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
    aside = f"{path}.corrupt-{stamp}"
    for suffix in ("-wal", "-shm", ""):
        try:
            os.replace(path + suffix, aside + suffix)
        except FileNotFoundError:
            pass
    return aside


class Index:
    def __init__(self, path: str) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        try:
            self._open(path)
        except sqlite3.DatabaseError as e:
            self._db.close()
            raise IndexUnusable(f"{path} is damaged ({e})") from None
        except IndexUnusable:
            self._db.close()
            raise
        self._manifest_access: dict[tuple[str, str, str], float] = {}
        self._blob_access: dict[str, float] = {}

    def _open(self, path: str) -> None:
        """Check the file and bring its schema up to date."""
        self._db.execute("PRAGMA journal_mode=WAL")
        # pages and indexes, in a time that grows with the index (not the blobs)
        problems = [row for (row,) in self._db.execute("PRAGMA quick_check(3)")]
        if problems != ["ok"]:
            raise IndexUnusable(f"{path} is damaged ({'; '.join(problems)})")
        self._db.execute("PRAGMA synchronous=NORMAL")
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version > _VERSION:
            raise IndexUnusable(f"{path} was written by a newer regproxy (schema {version})")
        tables = [
            name
            for (name,) in self._db.execute("SELECT name FROM sqlite_master WHERE type='table'")
        ]
        if version == 1:
            # Version 1 kept a digest per tag and media type, so one client's
            # narrow Accept could cache a platform fallback as the tag; tags
            # are cheap to learn again, manifests and blobs stay.
            log.info("index {path}: forgetting tags of schema 1", path=path)
            self._db.execute("DROP TABLE IF EXISTS tags")
        elif version < _VERSION and tables:
            # an index from before the schema was versioned: it is only a
            # cache of what the store holds, so start it afresh
            log.warn("index {path} has an old schema; starting a new one", path=path)
            for name in tables:
                self._db.execute(f'DROP TABLE "{name}"')
        self._db.executescript(_SCHEMA)
        self._db.execute(f"PRAGMA user_version={_VERSION}")

    def close(self) -> None:
        self.flush()
        self._db.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    # -- access times, batched ---------------------------------------------

    def touch_manifest(self, upstream: str, repo: str, digest: str, when: float) -> None:
        self._manifest_access[(upstream, repo, digest)] = when

    def touch_blob(self, digest: str, when: float) -> None:
        self._blob_access[digest] = when

    def flush(self) -> None:
        """Write the access times gathered since the last flush."""
        if not (self._manifest_access or self._blob_access):
            return
        manifests, self._manifest_access = self._manifest_access, {}
        blobs, self._blob_access = self._blob_access, {}
        with self._transaction() as db:
            db.executemany(
                "UPDATE manifests SET last_access=? WHERE upstream=? AND repo=? AND digest=?",
                [(when, *key) for key, when in manifests.items()],
            )
            db.executemany(
                "UPDATE blobs SET last_access=? WHERE digest=?",
                [(when, digest) for digest, when in blobs.items()],
            )

    # -- manifests and tags --------------------------------------------------

    def manifest(self, upstream: str, repo: str, digest: str) -> ManifestEntry | None:
        row = self._db.execute(
            "SELECT digest, media_type, size FROM manifests"
            " WHERE upstream=? AND repo=? AND digest=?",
            (upstream, repo, digest),
        ).fetchone()
        return ManifestEntry(*row) if row else None

    def put_manifest(
        self,
        upstream: str,
        repo: str,
        entry: ManifestEntry,
        fetched_at: float,
        refs: Iterable[tuple[str, str]] = (),
    ) -> None:
        """Record a manifest and what it lists: ``(digest, "blob"|"manifest")``."""
        refs = list(refs)
        with self._transaction() as db:
            db.execute(
                "INSERT OR REPLACE INTO manifests VALUES (?, ?, ?, ?, ?, ?, NULL)",
                (upstream, repo, entry.digest, entry.media_type, entry.size, fetched_at),
            )
            db.executemany(
                "INSERT OR IGNORE INTO refs VALUES (?, ?, ?, ?)",
                [(entry.digest, child, kind, i) for i, (child, kind) in enumerate(refs)],
            )
            db.executemany(
                "INSERT OR IGNORE INTO repo_blobs VALUES (?, ?, ?)",
                [(upstream, repo, child) for child, kind in refs if kind == "blob"],
            )

    def tag(self, upstream: str, repo: str, tag: str) -> TagEntry | None:
        row = self._db.execute(
            "SELECT digest, media_type, checked_at FROM tags WHERE upstream=? AND repo=? AND tag=?",
            (upstream, repo, tag),
        ).fetchone()
        return TagEntry(*row) if row else None

    def put_tag(self, upstream: str, repo: str, tag: str, entry: TagEntry) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO tags VALUES (?, ?, ?, ?, ?, ?)",
            (upstream, repo, tag, entry.media_type, entry.digest, entry.checked_at),
        )

    # -- blobs ---------------------------------------------------------------

    def put_blob(self, digest: str, size: int, stored_at: float) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO blobs VALUES (?, ?, ?, NULL)", (digest, size, stored_at)
        )

    def link_blobs(self, upstream: str, repo: str, digests: Iterable[str]) -> None:
        self._db.executemany(
            "INSERT OR IGNORE INTO repo_blobs VALUES (?, ?, ?)",
            [(upstream, repo, digest) for digest in digests],
        )

    def has_blob(self, upstream: str, repo: str, digest: str) -> bool:
        row = self._db.execute(
            "SELECT 1 FROM repo_blobs WHERE upstream=? AND repo=? AND digest=?",
            (upstream, repo, digest),
        ).fetchone()
        return row is not None

    def blob_sizes(self, digests: Iterable[str]) -> dict[str, int]:
        wanted = list(digests)
        found: dict[str, int] = {}
        for start in range(0, len(wanted), 500):
            chunk = wanted[start : start + 500]
            marks = ",".join("?" * len(chunk))
            found.update(
                self._db.execute(
                    f"SELECT digest, size FROM blobs WHERE digest IN ({marks})", chunk
                ).fetchall()
            )
        return found

    # -- listing -------------------------------------------------------------

    def total_size(self) -> int:
        return int(self._db.execute("SELECT COALESCE(SUM(size), 0) FROM blobs").fetchone()[0])

    def totals(self) -> dict[str, int]:
        db = self._db
        size, blobs = db.execute("SELECT COALESCE(SUM(size), 0), COUNT(*) FROM blobs").fetchone()
        return {
            "size_bytes": size,
            "blobs": blobs,
            "manifests": db.execute("SELECT COUNT(*) FROM manifests").fetchone()[0],
            "tags": db.execute(
                "SELECT COUNT(DISTINCT upstream||'/'||repo||':'||tag) FROM tags"
            ).fetchone()[0],
            "repositories": db.execute(
                "SELECT COUNT(*) FROM (SELECT DISTINCT upstream, repo FROM manifests)"
            ).fetchone()[0],
        }

    def repositories(self, upstream: str | None = None) -> list[RepoRow]:
        rows = self._db.execute(
            "SELECT m.upstream, m.repo,"
            " (SELECT COUNT(DISTINCT t.tag) FROM tags t"
            "   WHERE t.upstream=m.upstream AND t.repo=m.repo),"
            " COUNT(*), MAX(m.last_access)"
            " FROM manifests m WHERE (? IS NULL OR m.upstream=?)"
            " GROUP BY m.upstream, m.repo ORDER BY m.upstream, m.repo",
            (upstream, upstream),
        ).fetchall()
        return [RepoRow(*row) for row in rows]

    def repo_manifests(self, upstream: str, repo: str) -> list[ManifestRow]:
        rows = self._db.execute(
            "SELECT * FROM manifests WHERE upstream=? AND repo=? ORDER BY fetched_at",
            (upstream, repo),
        ).fetchall()
        return [ManifestRow(*row) for row in rows]

    def repo_tags(self, upstream: str, repo: str) -> list[TagRow]:
        rows = self._db.execute(
            "SELECT * FROM tags WHERE upstream=? AND repo=? ORDER BY tag",
            (upstream, repo),
        ).fetchall()
        return [TagRow(*row) for row in rows]

    def refs(self, manifest: str) -> list[tuple[str, str]]:
        return self._db.execute(
            "SELECT child, kind FROM refs WHERE manifest=? ORDER BY position", (manifest,)
        ).fetchall()

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
                entry = self.tag(upstream, repo, tag)
                roots = [entry.digest] if entry else []
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

    def all_blobs(self, stored_before: float) -> list[str]:
        return [
            digest
            for (digest,) in self._db.execute(
                "SELECT digest FROM blobs WHERE stored_at < ?", (stored_before,)
            )
        ]

    def forget_blob(self, digest: str) -> None:
        with self._transaction() as db:
            db.execute("DELETE FROM blobs WHERE digest=?", (digest,))
            db.execute("DELETE FROM repo_blobs WHERE digest=?", (digest,))

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


def _manifest_filter(
    upstream: str | None,
    repo: str | None,
    digest: str | None,
    fetched_before: float | None,
    unused_since: float | None,
) -> tuple[str, list[object]]:
    clauses: list[str] = ["1=1"]
    args: list[object] = []
    for column, value in (("upstream", upstream), ("repo", repo), ("digest", digest)):
        if value is not None:
            clauses.append(f"{column}=?")
            args.append(value)
    if fetched_before is not None:
        clauses.append("fetched_at < ?")
        args.append(fetched_before)
    if unused_since is not None:
        clauses.append("COALESCE(last_access, fetched_at) < ?")
        args.append(unused_since)
    return " AND ".join(clauses), args
