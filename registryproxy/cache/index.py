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
from typing import Any

import attrs
from twisted.logger import Logger

log = Logger()

_SCHEMA = """
-- blobs an eviction or a purge forgot whose files are still to be deleted,
-- written in the transaction that forgets them: a crash before the files go
-- leaves them here, and the next sweep deletes them (else they stayed, outside
-- the budget).  A row forgotten for a file already gone (fsck, a missing
-- object) is not listed: its digest may be on its way back.
CREATE TABLE IF NOT EXISTS reclaim (digest TEXT PRIMARY KEY) WITHOUT ROWID;
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
-- them, or whose upstream confirmed them (if it is among the blob's sources)
CREATE TABLE IF NOT EXISTS repo_blobs (
    upstream TEXT NOT NULL, repo TEXT NOT NULL, digest TEXT NOT NULL,
    PRIMARY KEY (upstream, repo, digest)
) WITHOUT ROWID;
-- by digest: forgetting a blob forgets who may read it
DROP INDEX IF EXISTS repo_blobs_digest;
CREATE INDEX IF NOT EXISTS repo_blobs_digest_upstream ON repo_blobs (digest, upstream);
-- which upstreams sent a stored blob's bytes (verified): only they vouch
-- for it, as a manifest listing a digest is no proof that its upstream has
-- those bytes (a hostile upstream's could list another's private layer)
CREATE TABLE IF NOT EXISTS blob_sources (
    digest TEXT NOT NULL, upstream TEXT NOT NULL,
    PRIMARY KEY (digest, upstream)
) WITHOUT ROWID;
-- by upstream: a purged one's word is forgotten in as many steps as it
-- has sources
CREATE INDEX IF NOT EXISTS blob_sources_upstream ON blob_sources (upstream);
-- for eviction and purges: manifests by digest and in LRU order, tags by
-- what they point to, blobs in LRU order
CREATE INDEX IF NOT EXISTS manifests_digest ON manifests (digest);
CREATE INDEX IF NOT EXISTS manifests_used
    ON manifests (COALESCE(last_access, fetched_at), fetched_at);
CREATE INDEX IF NOT EXISTS tags_digest ON tags (upstream, repo, digest);
CREATE INDEX IF NOT EXISTS blobs_used ON blobs (COALESCE(last_access, stored_at), digest);
-- the store's size, kept by the database itself at every change of blobs:
-- a download that makes room on a full disk asks for it on the reactor
-- thread, where a SUM over every blob would grow with the cache (a blob is
-- written again with an upsert, as REPLACE's delete fires no trigger)
CREATE TABLE IF NOT EXISTS blob_totals (
    one INTEGER PRIMARY KEY CHECK (one = 1), count INTEGER NOT NULL, bytes INTEGER NOT NULL
);
CREATE TRIGGER IF NOT EXISTS blob_added AFTER INSERT ON blobs BEGIN
    UPDATE blob_totals SET count = count + 1, bytes = bytes + NEW.size;
END;
CREATE TRIGGER IF NOT EXISTS blob_removed AFTER DELETE ON blobs BEGIN
    UPDATE blob_totals SET count = count - 1, bytes = bytes - OLD.size;
END;
CREATE TRIGGER IF NOT EXISTS blob_resized AFTER UPDATE OF size ON blobs BEGIN
    UPDATE blob_totals SET bytes = bytes - OLD.size + NEW.size;
END;
"""
#: a blob stored (again): its size and time, its last access forgotten
_PUT_BLOB = (
    "INSERT INTO blobs VALUES (?, ?, ?, NULL) ON CONFLICT (digest) DO UPDATE SET"
    " size=excluded.size, stored_at=excluded.stored_at, last_access=NULL"
)
#: 3: blob_sources (filled from repo_blobs once, on the way from 2)
_VERSION = 3
#: an index of schema 2 or older: who sent each stored blob, from who could
#: read it, where that is one upstream only (where several could, one may
#: only have listed another's digest: each sends it again once)
_SOURCES_FROM_LINKS = (
    "INSERT OR IGNORE INTO blob_sources SELECT r.digest, MIN(r.upstream)"
    " FROM repo_blobs r JOIN blobs b ON b.digest=r.digest"
    " GROUP BY r.digest HAVING COUNT(DISTINCT r.upstream) = 1"
)
#: a step of forgetting an upstream's word (see :meth:`Index.purge`)
_UNVOUCH = (
    "DELETE FROM blob_sources WHERE (digest, upstream) IN"
    " (SELECT digest, upstream FROM blob_sources WHERE upstream=? LIMIT ?)"
)

#: how long one transaction of a heavy job (a batch of a sweep, of a purge)
#: may hold the index's write lock: the other connection's writes, the
#: reactor thread's for every pull among them, wait as long
HOLD_SECONDS = 0.010


class Pace:
    """How many items the next transaction of a heavy job takes: as many as
    fit in :data:`HOLD_SECONDS` at the last one's speed, *most* at most.

    A fixed count held the lock for 60 ms a batch of 100 images at 20,000
    (and more for images of many platforms); the time is what the reactor
    waits, whatever an item costs."""

    def __init__(self, most: int, hold: float | None = None) -> None:
        self.most = most
        #: None: HOLD_SECONDS (read when used: tests change it)
        self.hold = hold
        self.size = min(most, 8)

    def took(self, seconds: float, items: int) -> None:
        """The last transaction held the lock *seconds* for *items* items."""
        if items > 0:
            per_item = max(seconds, 1e-6) / items
            hold = HOLD_SECONDS if self.hold is None else self.hold
            self.size = max(1, min(self.most, int(hold / per_item)))


#: whether an upstream sent a blob, and whether a repository may read it
_KNOWN = (
    "SELECT EXISTS (SELECT 1 FROM blob_sources WHERE digest=? AND upstream=?),"
    " EXISTS (SELECT 1 FROM repo_blobs WHERE upstream=? AND repo=? AND digest=?)"
)


def known(sent: Any, linked: Any) -> str | None:
    """:meth:`Index.blob_known`'s answer from :data:`_KNOWN`'s."""
    if not sent:
        return None
    return "repository" if linked else "upstream"


#: how long a write waits for another connection's transaction (ms)
_BUSY_MS = 10_000

#: access times written per transaction (a few ms of the write lock)
ACCESS_BATCH = 500
_WRITE_MANIFEST_ACCESS = (
    "UPDATE manifests SET last_access=MAX(COALESCE(last_access, ?1), ?1)"
    " WHERE upstream=?2 AND repo=?3 AND digest=?4"
)
_WRITE_BLOB_ACCESS = (
    "UPDATE blobs SET last_access=MAX(COALESCE(last_access, ?1), ?1) WHERE digest=?2"
)


@attrs.frozen
class Accesses:
    """Access times gathered in memory, on their way to the index."""

    manifests: dict[tuple[str, str, str], float]
    blobs: dict[str, float]

    def __bool__(self) -> bool:
        return bool(self.manifests or self.blobs)


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
class RepoSummary:
    upstream: str
    repo: str
    tags: int
    manifests: int
    #: bytes of the repository's manifests and of the cached blobs they list
    size: int
    last_access: float | None


@attrs.frozen
class Removed:
    """What a purge took out of the index; the caller deletes the blob files."""

    tags: int
    manifests: int
    #: (digest, size) of store files nothing cached lists any more
    blobs: list[tuple[str, int]]


@attrs.frozen
class Evicted:
    """What :meth:`Index.evict` took out: the images ``(upstream, repo,
    digest, last use)``, and the store files for the caller to delete."""

    images: list[tuple[str, str, str, float]]
    removed: Removed
    #: there may be more to evict: as many images as asked for went
    more: bool


#: the admin API's listing: per repository its tags, its manifests, and
#: their bytes with those of the distinct cached blobs they list (a blob two
#: manifests list counted once); :func:`summaries` fills in which and how many
_SUMMARIES = """
SELECT m.upstream, m.repo,
    (SELECT COUNT(*) FROM tags t WHERE t.upstream=m.upstream AND t.repo=m.repo),
    COUNT(*),
    SUM(m.size) + COALESCE((
        SELECT SUM(b.size) FROM blobs b WHERE b.digest IN (
            SELECT r.child FROM manifests o JOIN refs r ON r.manifest=o.digest
            WHERE o.upstream=m.upstream AND o.repo=m.repo AND r.kind='blob'
        )
    ), 0),
    MAX(m.last_access)
FROM manifests m WHERE {where}
GROUP BY m.upstream, m.repo ORDER BY {order}
"""
_REPOSITORY_REFS = """
SELECT r.manifest, r.child, r.kind, b.size FROM refs r
LEFT JOIN blobs b ON b.digest=r.child AND r.kind='blob'
WHERE r.manifest IN (SELECT digest FROM manifests WHERE upstream=? AND repo=?)
ORDER BY r.manifest, r.position
"""


@attrs.frozen
class Page:
    """Which repositories of the listing, and how many.

    ``contains``: only those whose ``upstream/repo`` has it in it, ASCII
    letters in any case; ``after``: only those after this ``(upstream,
    repo)`` in name order (keyset paging); ``by_size``: largest first, ties
    in name order; ``limit``: at most so many (None: all)."""

    contains: str | None = None
    after: tuple[str, str] | None = None
    by_size: bool = False
    limit: int | None = None


def _like(text: str) -> str:
    """A LIKE pattern for *text* anywhere, its wildcards escaped (by ``\\``)
    and its ASCII letters lowered as the SQL's ``lower()`` lowers names."""
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return "%" + "".join(c.lower() if c.isascii() else c for c in escaped) + "%"


def summaries(upstream: str | None, page: Page) -> tuple[str, tuple[Any, ...]]:
    """:data:`_SUMMARIES` narrowed to *upstream* (None: every one) and *page*,
    and its parameters: filtered, ordered and cut in SQL (in the index's
    thread), so that its caller's work grows with the page, not the cache."""
    where: list[str] = ["1=1"]
    params: list[Any] = []
    if upstream is not None:
        where.append("m.upstream=?")
        params.append(upstream)
    if page.contains:
        where.append("lower(m.upstream || '/' || m.repo) LIKE ? ESCAPE '\\'")
        params.append(_like(page.contains))
    if page.after is not None:
        where.append("(m.upstream, m.repo) > (?, ?)")
        params.extend(page.after)
    order = "m.upstream, m.repo"
    sql = _SUMMARIES.format(
        where=" AND ".join(where), order=f"5 DESC, {order}" if page.by_size else order
    )
    if page.limit is not None:
        sql += "LIMIT ?\n"
        params.append(page.limit)
    return sql, tuple(params)


def summary(row: tuple[Any, ...]) -> RepoSummary:
    """A row of :data:`_SUMMARIES` (PostgreSQL's sums are Decimals)."""
    upstream, repo, tags, manifests, size, last_access = row
    return RepoSummary(upstream, repo, tags, manifests, int(size), last_access)


class IndexUnusable(Exception):
    """The index file is unusable (corrupt, or written by a newer regproxy)."""


class IndexUnavailable(Exception):
    """The index cannot be read or written now (a full disk, a read-only or
    locked file): nothing is wrong with it, so nothing to rebuild."""


#: SQLite's errors from the file's surroundings rather than its contents
_NOT_DAMAGE = (
    "SQLITE_FULL",
    "SQLITE_BUSY",
    "SQLITE_LOCKED",
    "SQLITE_READONLY",
    "SQLITE_CANTOPEN",
    "SQLITE_IOERR",
    "SQLITE_PERM",
)


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
            if (getattr(e, "sqlite_errorname", None) or "").startswith(_NOT_DAMAGE):
                # bringing an old schema up to date writes the most at opening
                raise IndexUnavailable(f"cannot open {path} ({e})") from None
            raise IndexUnusable(f"{path} is damaged ({e})") from None
        except IndexUnusable:
            self._db.close()
            raise
        self._manifest_access: dict[tuple[str, str, str], float] = {}
        self._blob_access: dict[str, float] = {}
        #: how many times this connection removed what manifests list
        self._removals = 0

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
        elif version == 0 and tables:
            # an index from before the schema was versioned: it is only a
            # cache of what the store holds, so start it afresh
            log.warn("index {path} has an old schema; starting a new one", path=path)
            for name in tables:
                self._db.execute(f'DROP TABLE "{name}"')
        self._db.executescript(_SCHEMA)
        with self._transaction() as db:
            if 0 < version < 3:
                # the upstreams of what each one's repositories could read:
                # trusted once, else every cached blob is downloaded again
                # once per upstream after the upgrade
                log.info("index {path}: noting the sources of cached blobs", path=path)
                db.execute(_SOURCES_FROM_LINKS)
            if db.execute("SELECT 1 FROM blob_totals").fetchone() is None:
                # new, or from before blob_totals: counted once, then kept by its triggers
                db.execute(
                    "INSERT INTO blob_totals SELECT 1, COUNT(*), COALESCE(SUM(size), 0) FROM blobs"
                )
        self._db.execute(f"PRAGMA user_version={_VERSION}")

    def close(self) -> None:
        self.flush()
        self._db.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
            self._db.execute("COMMIT")
        except BaseException:
            # SQLite may have rolled back itself (a full disk, an I/O error):
            # a ROLLBACK then fails, and its error would hide the real one
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise

    # -- access times, batched ---------------------------------------------

    def touch_manifest(self, upstream: str, repo: str, digest: str, when: float) -> None:
        self._manifest_access[(upstream, repo, digest)] = when

    def touch_blob(self, digest: str, when: float) -> None:
        self._blob_access[digest] = when

    def take_accesses(self) -> Accesses:
        """The access times gathered since the last time, to be written
        (:meth:`write_accesses`, by another connection); a swap, whatever
        their number."""
        taken = Accesses(self._manifest_access, self._blob_access)
        self._manifest_access, self._blob_access = {}, {}
        return taken

    def write_accesses(self, taken: Accesses) -> None:
        """Write access times, :data:`ACCESS_BATCH` rows a transaction (a
        scanner reading every layer makes tens of thousands).  A time never
        goes back: two connections may write theirs in either order."""
        for sql, rows in (
            (_WRITE_MANIFEST_ACCESS, [(when, *key) for key, when in taken.manifests.items()]),
            (_WRITE_BLOB_ACCESS, [(when, digest) for digest, when in taken.blobs.items()]),
        ):
            for start in range(0, len(rows), ACCESS_BATCH):
                with self._transaction() as db:
                    db.executemany(sql, rows[start : start + ACCESS_BATCH])

    def flush(self) -> None:
        """Write the access times gathered since the last flush, on this
        connection."""
        self.write_accesses(self.take_accesses())

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
        ahead: int = 0,
        mark: tuple[int, int] | None = None,
    ) -> None:
        """Record a manifest and what it lists: ``(digest, "blob"|"manifest")``,
        of which the first *ahead* were written ahead (:meth:`put_refs`),
        after :meth:`removal_mark` said *mark*."""
        listed = list(refs)
        with self._transaction() as db:
            db.execute(
                "INSERT OR REPLACE INTO manifests VALUES (?, ?, ?, ?, ?, ?, NULL)",
                (upstream, repo, entry.digest, entry.media_type, entry.size, fetched_at),
            )
            first = 0
            if ahead and mark is not None and mark == self.removal_mark():
                first = ahead  # nothing removed since: no need to look (1,000 lookups)
            elif ahead:
                args = (entry.digest, ahead, upstream, repo, entry.digest, ahead)
                if _all_ahead(listed[:ahead], *db.execute(_AHEAD, args).fetchone()):
                    first = ahead
            self._put_refs(db, upstream, repo, entry.digest, listed[first:], first)

    def removal_mark(self) -> tuple[int, int]:
        """Changes whenever another connection commits (SQLite's
        data_version) or this one removes what manifests list: the same
        mark before a manifest's list is written ahead and when it is
        recorded says that none of it can have gone meanwhile."""
        (version,) = self._db.execute("PRAGMA data_version").fetchone()
        return int(version), self._removals

    def put_refs(
        self, upstream: str, repo: str, digest: str, refs: list[tuple[str, str]], first: int
    ) -> None:
        """Record part of what manifest *digest* lists, from position
        *first* on, ahead of :meth:`put_manifest`: a manifest listing many
        is written in steps, each a short transaction, and then with its
        row, which writes them all again if any went meanwhile (a purge or
        an eviction of the same manifest elsewhere takes what no manifest
        known lists, and this one was not known yet)."""
        with self._transaction() as db:
            self._put_refs(db, upstream, repo, digest, refs, first)

    @staticmethod
    def _put_refs(
        db: sqlite3.Connection,
        upstream: str,
        repo: str,
        digest: str,
        refs: list[tuple[str, str]],
        first: int,
    ) -> None:
        db.executemany(
            "INSERT OR IGNORE INTO refs VALUES (?, ?, ?, ?)",
            [(digest, child, kind, first + i) for i, (child, kind) in enumerate(refs)],
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
        self._db.execute(_PUT_BLOB, (digest, size, stored_at))

    def link_blobs(self, upstream: str, repo: str, digests: Iterable[str]) -> None:
        """*repo* of *upstream* sent (or, a source already, confirmed) the
        bytes of *digests*: it may read them, and its upstream vouches."""
        digests = list(digests)
        with self._transaction() as db:
            db.executemany(
                "INSERT OR IGNORE INTO repo_blobs VALUES (?, ?, ?)",
                [(upstream, repo, digest) for digest in digests],
            )
            db.executemany(
                "INSERT OR IGNORE INTO blob_sources VALUES (?, ?)",
                [(digest, upstream) for digest in digests],
            )

    def has_blob(self, upstream: str, repo: str, digest: str) -> bool:
        row = self._db.execute(
            "SELECT 1 FROM repo_blobs WHERE upstream=? AND repo=? AND digest=?",
            (upstream, repo, digest),
        ).fetchone()
        return row is not None

    def blob_known(self, upstream: str, repo: str, digest: str) -> str | None:
        """None if *upstream* never sent *digest*'s bytes (whatever its
        manifests list); else whether *repo* may read them ("repository")
        or only others of its repositories ("upstream")."""
        sent, linked = self._db.execute(
            _KNOWN, (digest, upstream, upstream, repo, digest)
        ).fetchone()
        return known(sent, linked)

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
        """The store's bytes: one row, whatever the size of the cache."""
        return int(self._db.execute("SELECT bytes FROM blob_totals").fetchone()[0])

    def totals(self) -> dict[str, int]:
        db = self._db
        blobs, size = db.execute("SELECT count, bytes FROM blob_totals").fetchone()
        return {
            "size_bytes": size,
            "blobs": blobs,
            "manifests": db.execute("SELECT COUNT(*) FROM manifests").fetchone()[0],
            # (upstream, repo, tag) is the key: a count of rows, not of
            # distinct strings built for each of them
            "tags": db.execute("SELECT COUNT(*) FROM tags").fetchone()[0],
            "repositories": db.execute(
                "SELECT COUNT(*) FROM (SELECT DISTINCT upstream, repo FROM manifests)"
            ).fetchone()[0],
        }

    def repository_summaries(
        self, upstream: str | None = None, page: Page = Page()
    ) -> list[RepoSummary]:
        """The cached repositories (of *upstream*) of *page*, with their
        sizes, in one query."""
        rows = self._db.execute(*summaries(upstream, page)).fetchall()
        return [summary(row) for row in rows]

    def repository_refs(self, upstream: str, repo: str) -> list[tuple[str, str, str, int | None]]:
        """What each of the repository's manifests lists, in one query:
        ``(manifest, child, kind, size)``, in order; size is the cached
        blob's, None for a blob not cached and for a child manifest."""
        return self._db.execute(_REPOSITORY_REFS, (upstream, repo)).fetchall()

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

    # -- a second connection, and checkpoints -------------------------------

    @property
    def path(self) -> str:
        """The database's file, for another connection (or process) to open."""
        return str(self._db.execute("PRAGMA database_list").fetchone()[2])

    def companion(self) -> Index:
        """Another connection to the same file, for a worker thread of its
        own (heavy reads and batched writes off the reactor thread: WAL
        lets it read while this one writes, and the other way round)."""
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        db.execute(f"PRAGMA busy_timeout={_BUSY_MS}")
        db.execute("PRAGMA synchronous=NORMAL")
        other = Index.__new__(Index)
        other._db = db
        other._manifest_access = {}
        other._blob_access = {}
        other._removals = 0
        return other

    def autocheckpoint(self, pages: int) -> None:
        """Checkpoint the WAL after commits that leave it *pages* long
        (SQLite's default: 1000); 0 leaves checkpoints to :meth:`checkpoint`,
        called from another thread, so that the fsync they do never holds
        up this connection's commits."""
        self._db.execute(f"PRAGMA wal_autocheckpoint={int(pages)}")

    def checkpoint(self) -> tuple[int, int, int]:
        """Copy the WAL into the database as far as no reader needs it
        (PASSIVE: never waits): ``(busy, WAL pages, pages checkpointed)``."""
        busy, log_pages, done = self._db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        return busy, log_pages, done

    # -- eviction ------------------------------------------------------------
    #
    # The selection is SQL over scratch tables of this connection (temp.*):
    # pins, the blobs being read, the candidate images in LRU order with the
    # bytes each would free, cut where enough is freed; then the same removal
    # as a purge.  Each call is one short write transaction of at most
    # *limit* images, so the caller runs it in bounded steps.

    def evict(
        self,
        pins: Iterable[tuple[str, str, str | None, str | None]] = (),
        busy: Iterable[str] = (),
        limit: int = 100,
        used_before: float | None = None,
        excess: float | None = None,
    ) -> Evicted:
        """Evict up to *limit* images, least recently used (or fetched) first:
        a manifest no other cached manifest of its repository lists, with
        its platform manifests, passing over pinned images and those listing
        a *busy* blob.  With *used_before*, only images last used before
        then; with *excess*, only as many as free that many bytes (counting
        the blobs nothing else lists any more)."""
        if excess is not None and excess <= 0:
            return Evicted([], Removed(0, 0, []), more=False)
        self.flush()
        db = self._db
        self._scratch()
        with self._transaction():
            self._fill_pins(pins)
            db.execute("DELETE FROM temp.busy")
            db.executemany("INSERT OR IGNORE INTO temp.busy VALUES (?)", [(d,) for d in busy])
            db.execute("DELETE FROM temp.cand")
            db.execute("DELETE FROM temp.fam")
            when = "" if used_before is None else "AND COALESCE(m.last_access, m.fetched_at) < ?"
            args: list[object] = [] if used_before is None else [used_before]
            db.execute(_CANDIDATES.format(when=when), [*args, limit])
            found = db.execute("SELECT COUNT(*) FROM temp.cand").fetchone()[0]
            if not found:
                return Evicted([], Removed(0, 0, []), more=False)
            db.execute("INSERT INTO temp.fam SELECT upstream, repo, digest, rank FROM temp.cand")
            db.execute(_PLATFORMS)
            cut = found
            if excess is not None:
                row = db.execute(_CUT, (excess,)).fetchone()
                if row[0] is not None:
                    cut = row[0]
            db.execute("DELETE FROM temp.fam WHERE rank > ?", (cut,))
            db.execute("DELETE FROM temp.doomed")
            db.execute("INSERT INTO temp.doomed SELECT upstream, repo, digest FROM temp.fam")
            images = [
                (u, r, d, used)
                for u, r, d, used in db.execute(
                    "SELECT upstream, repo, digest, used FROM temp.cand"
                    " WHERE rank <= ? ORDER BY rank",
                    (cut,),
                )
            ]
            removed = self._remove_doomed()
        return Evicted(images, removed, more=cut == found == limit)

    def evict_loose(
        self, busy: Iterable[str], excess: float, limit: int = 500, window: int | None = None
    ) -> list[tuple[str, int]]:
        """Forget up to *limit* store files no cached manifest is or lists,
        least recently used first, until *excess* bytes: ``(digest, size)``
        for the caller to delete.  *window*: look among that many least
        recently used files only (a bounded look, for the reactor thread).

        They are chosen without the write lock: when few files are loose,
        the look reads every file's row (a quarter of a second at 80,000),
        and the other connection's writes would wait all that time.  Those
        still loose once it is taken go."""
        db = self._db
        self._scratch()
        sql, args = (
            (_LOOSE, [limit, excess]) if window is None else (_LOOSE_IN, [window, limit, excess])
        )
        db.execute("BEGIN")  # a read: the temp tables are this connection's own
        try:
            db.execute("DELETE FROM temp.busy")
            db.executemany("INSERT OR IGNORE INTO temp.busy VALUES (?)", [(d,) for d in busy])
            loose = db.execute(sql, args).fetchall()
        finally:
            db.execute("COMMIT")
        if not loose:
            return []
        with self._transaction():
            marks = ", ".join("?" * len(loose))
            still = {
                d for (d,) in db.execute(_STILL_LOOSE.format(marks=marks), [d for d, _ in loose])
            }
            loose = [(d, size) for d, size in loose if d in still]
            db.executemany("INSERT OR IGNORE INTO reclaim VALUES (?)", [(d,) for d, _ in loose])
            self._forget(db, [d for d, _ in loose])
        return loose

    def to_reclaim(self, after: str, limit: int) -> list[str]:
        """Up to *limit* digests after *after* whose rows went and whose
        files may not have (the ``reclaim`` table)."""
        rows = self._db.execute(
            "SELECT digest FROM reclaim WHERE digest > ? ORDER BY digest LIMIT ?", (after, limit)
        )
        return [digest for (digest,) in rows]

    def reclaimed(self, digests: Iterable[str]) -> None:
        """Their files are deleted, or stored again and known: off the list."""
        with self._transaction() as db:
            db.executemany("DELETE FROM reclaim WHERE digest=?", [(d,) for d in digests])

    def blobs_after(self, digest: str, limit: int) -> list[tuple[str, int]]:
        """Up to *limit* store files after *digest* in digest order:
        ``(digest, size)``, a page of a walk through the whole store."""
        return self._db.execute(
            "SELECT digest, size FROM blobs WHERE digest > ? ORDER BY digest LIMIT ?",
            (digest, limit),
        ).fetchall()

    def forget_blob(self, digest: str) -> None:
        self.forget_blobs([digest])

    def forget_blobs(self, digests: Iterable[str]) -> None:
        with self._transaction() as db:
            self._forget(db, list(digests))

    def _forget(self, db: sqlite3.Connection, digests: list[str]) -> None:
        self._removals += 1
        db.executemany("DELETE FROM blobs WHERE digest=?", [(d,) for d in digests])
        db.executemany("DELETE FROM repo_blobs WHERE digest=?", [(d,) for d in digests])
        db.executemany("DELETE FROM blob_sources WHERE digest=?", [(d,) for d in digests])

    def put_blobs(self, blobs: Iterable[tuple[str, int, float]]) -> None:
        """:meth:`put_blob` for many ``(digest, size, stored_at)``, in one transaction."""
        with self._transaction() as db:
            db.executemany(_PUT_BLOB, list(blobs))

    # -- purging -------------------------------------------------------------

    def purge(
        self,
        upstream: str | None = None,
        repo: str | None = None,
        tag: str | None = None,
        digest: str | None = None,
        fetched_before: float | None = None,
        unused_since: float | None = None,
        batch: int = 500,
    ) -> Removed:
        """Remove the selected manifests (and the tags that pointed to them)
        and report the store files nothing cached lists any more.

        With *tag*, the tag's mappings go, and the manifests only that tag
        kept (an index and its platform manifests); with *digest*, one
        manifest and the platform manifests only it listed.  The selection
        is one transaction, the removal one per :class:`Pace` of at most
        *batch* manifests, so that other connections' writes never wait long."""
        self.flush()
        self._scratch()
        with self._transaction() as db:
            where, args = _manifest_filter(upstream, repo, digest, fetched_before, unused_since)
            db.execute("DELETE FROM temp.doomed")
            tags_removed = 0
            if tag is not None:
                db.execute("DELETE FROM temp.roots")
                db.execute(
                    "INSERT INTO temp.roots SELECT DISTINCT upstream, repo, digest FROM tags"
                    " WHERE upstream=? AND repo=? AND tag=?",
                    (upstream, repo, tag),
                )
                tags_removed = db.execute(
                    "DELETE FROM tags WHERE upstream=? AND repo=? AND tag=?", (upstream, repo, tag)
                ).rowcount
                self._unkept(keep_tagged=True)
            elif digest is not None:
                db.execute("DELETE FROM temp.roots")
                db.execute(
                    "INSERT INTO temp.roots"
                    f" SELECT upstream, repo, digest FROM manifests WHERE {where}",
                    args,
                )
                self._unkept(keep_tagged=False)
            else:
                db.execute(
                    "INSERT OR IGNORE INTO temp.doomed"
                    f" SELECT upstream, repo, digest FROM manifests WHERE {where}",
                    args,
                )
            db.execute("DELETE FROM temp.purging")
            db.execute("INSERT INTO temp.purging SELECT upstream, repo, digest FROM temp.doomed")
        manifests, orphans = 0, []
        pace = Pace(batch)
        while True:
            began = time.perf_counter()
            with self._transaction() as db:
                db.execute("DELETE FROM temp.doomed")
                db.execute(
                    "INSERT INTO temp.doomed SELECT upstream, repo, digest FROM temp.purging"
                    " ORDER BY rowid LIMIT ?",
                    (pace.size,),
                )
                taken = db.execute("SELECT COUNT(*) FROM temp.doomed").fetchone()[0]
                if not taken:
                    break
                db.execute(
                    "DELETE FROM temp.purging WHERE rowid IN"
                    " (SELECT rowid FROM temp.purging ORDER BY rowid LIMIT ?)",
                    (pace.size,),
                )
                removed = self._remove_doomed()
            pace.took(time.perf_counter() - began, taken)
            tags_removed += removed.tags
            manifests += removed.manifests
            orphans += removed.blobs
        if upstream is not None:
            self._unvouch(upstream)
        return Removed(tags_removed, manifests, sorted(orphans))

    def _unvouch(self, upstream: str) -> None:
        """*upstream*, purged of every manifest, vouches for no bytes any
        more: a purged hostile upstream's word goes with it (eviction, no
        statement of trust, leaves it).  In paced steps."""
        pace = Pace(5000)
        while True:
            began = time.perf_counter()
            with self._transaction() as db:
                if db.execute(
                    "SELECT 1 FROM manifests WHERE upstream=? LIMIT 1", (upstream,)
                ).fetchone():
                    return
                gone = db.execute(_UNVOUCH, (upstream, pace.size)).rowcount
            if gone < pace.size:
                return
            pace.took(time.perf_counter() - began, gone)

    def _scratch(self) -> None:
        """This connection's scratch tables (temp.*: never shared, never on disk for long)."""
        if getattr(self, "_scratched", False):
            return
        for statement in _SCRATCH.split(";"):
            if statement.strip():
                self._db.execute(statement)
        self._scratched = True

    def _fill_pins(self, pins: Iterable[tuple[str, str, str | None, str | None]]) -> None:
        """temp.kept: the manifests pins keep (see :meth:`evict`): a pin of a
        repository keeps all of it, of a tag what the tag points to, of a
        digest that manifest, each with its platform manifests."""
        db = self._db
        db.execute("DELETE FROM temp.pins")
        db.executemany("INSERT INTO temp.pins VALUES (?, ?, ?, ?)", list(pins))
        db.execute("DELETE FROM temp.kept")
        db.execute(
            "INSERT OR IGNORE INTO temp.kept SELECT upstream, repo, digest FROM temp.pins"
            " WHERE digest IS NOT NULL"
        )
        db.execute(
            "INSERT OR IGNORE INTO temp.kept SELECT t.upstream, t.repo, t.digest"
            " FROM temp.pins pin CROSS JOIN tags t ON t.upstream=pin.upstream AND t.repo=pin.repo"
            " AND t.tag=pin.tag WHERE pin.digest IS NULL AND pin.tag IS NOT NULL"
        )
        db.execute(
            "INSERT OR IGNORE INTO temp.kept SELECT m.upstream, m.repo, m.digest"
            " FROM temp.pins pin CROSS JOIN manifests m"
            " ON m.upstream=pin.upstream AND m.repo=pin.repo"
            " WHERE pin.digest IS NULL AND pin.tag IS NULL"
        )
        db.execute(
            "INSERT OR IGNORE INTO temp.kept SELECT m.upstream, m.repo, m.digest"
            " FROM temp.kept k CROSS JOIN refs r ON r.manifest=k.digest AND r.kind='manifest'"
            " CROSS JOIN manifests m"
            " ON m.upstream=k.upstream AND m.repo=k.repo AND m.digest=r.child"
        )

    def _unkept(self, keep_tagged: bool) -> None:
        """temp.doomed: temp.roots and the platform manifests they list in the
        same repository (those cached there), less those another remaining
        tag (with *keep_tagged*) or manifest of the repository still keeps."""
        db = self._db
        db.execute("DELETE FROM temp.fam")
        db.execute(
            "INSERT OR IGNORE INTO temp.fam SELECT m.upstream, m.repo, m.digest, 0"
            " FROM temp.roots x CROSS JOIN manifests m"
            " ON m.upstream=x.upstream AND m.repo=x.repo AND m.digest=x.digest"
        )
        db.execute(
            "INSERT OR IGNORE INTO temp.fam SELECT m.upstream, m.repo, m.digest, 0"
            " FROM temp.roots x CROSS JOIN refs r ON r.manifest=x.digest AND r.kind='manifest'"
            " CROSS JOIN manifests m"
            " ON m.upstream=x.upstream AND m.repo=x.repo AND m.digest=r.child"
        )
        db.execute(
            "INSERT INTO temp.doomed SELECT f.upstream, f.repo, f.digest FROM temp.fam f"
            " WHERE NOT ("
            " (? AND EXISTS (SELECT 1 FROM tags t"
            "   WHERE t.upstream=f.upstream AND t.repo=f.repo AND t.digest=f.digest))"
            " OR EXISTS (SELECT 1 FROM refs r CROSS JOIN manifests p"
            "   ON p.upstream=f.upstream AND p.repo=f.repo AND p.digest=r.manifest"
            "   WHERE r.child=f.digest AND NOT EXISTS (SELECT 1 FROM temp.fam g"
            "     WHERE g.upstream=p.upstream AND g.repo=p.repo AND g.digest=p.digest)))",
            (keep_tagged,),
        )

    def _remove_doomed(self) -> Removed:
        """Remove the manifests in temp.doomed and their tags, and the blobs
        nothing cached is or lists any more (in a transaction)."""
        db = self._db
        self._removals += 1
        manifests = db.execute(
            "DELETE FROM manifests WHERE (upstream, repo, digest) IN"
            " (SELECT upstream, repo, digest FROM temp.doomed)"
        ).rowcount
        tags = db.execute(
            "DELETE FROM tags WHERE (upstream, repo, digest) IN"
            " (SELECT upstream, repo, digest FROM temp.doomed)"
        ).rowcount
        # repositories left with no manifest lose their read permissions
        db.execute(
            "DELETE FROM repo_blobs WHERE (upstream, repo) IN"
            " (SELECT DISTINCT d.upstream, d.repo FROM temp.doomed d WHERE NOT EXISTS"
            "  (SELECT 1 FROM manifests m WHERE m.upstream=d.upstream AND m.repo=d.repo))"
        )
        db.execute("DELETE FROM temp.orphans")
        db.execute(_ORPHANS)
        orphans = db.execute("SELECT digest, size FROM temp.orphans ORDER BY digest").fetchall()
        db.execute("INSERT OR IGNORE INTO reclaim SELECT digest FROM temp.orphans")
        db.execute("DELETE FROM blobs WHERE digest IN (SELECT digest FROM temp.orphans)")
        db.execute("DELETE FROM repo_blobs WHERE digest IN (SELECT digest FROM temp.orphans)")
        db.execute("DELETE FROM blob_sources WHERE digest IN (SELECT digest FROM temp.orphans)")
        # refs of manifests no longer cached anywhere are dead weight
        db.execute(
            "DELETE FROM refs WHERE manifest IN (SELECT d.digest FROM temp.doomed d"
            " WHERE NOT EXISTS (SELECT 1 FROM manifests m WHERE m.digest=d.digest))"
        )
        return Removed(tags, manifests, orphans)


#: scratch tables of one connection, for eviction and purges
_SCRATCH = """
CREATE TEMP TABLE IF NOT EXISTS busy (digest TEXT PRIMARY KEY) WITHOUT ROWID;
CREATE TEMP TABLE IF NOT EXISTS pins (upstream TEXT, repo TEXT, tag TEXT, digest TEXT);
CREATE TEMP TABLE IF NOT EXISTS kept (
    upstream TEXT, repo TEXT, digest TEXT, PRIMARY KEY (upstream, repo, digest)
) WITHOUT ROWID;
CREATE TEMP TABLE IF NOT EXISTS cand (
    rank INTEGER PRIMARY KEY, upstream TEXT, repo TEXT, digest TEXT, used REAL
);
CREATE INDEX IF NOT EXISTS temp.cand_key ON cand (upstream, repo, digest);
CREATE TEMP TABLE IF NOT EXISTS fam (
    upstream TEXT, repo TEXT, digest TEXT, rank INTEGER, PRIMARY KEY (upstream, repo, digest)
) WITHOUT ROWID;
CREATE TEMP TABLE IF NOT EXISTS roots (upstream TEXT, repo TEXT, digest TEXT);
CREATE TEMP TABLE IF NOT EXISTS doomed (
    upstream TEXT, repo TEXT, digest TEXT, PRIMARY KEY (upstream, repo, digest)
) WITHOUT ROWID;
CREATE TEMP TABLE IF NOT EXISTS purging (upstream TEXT, repo TEXT, digest TEXT);
CREATE TEMP TABLE IF NOT EXISTS orphans (digest TEXT PRIMARY KEY, size INTEGER) WITHOUT ROWID
"""

#: of the rows a manifest's first ? descriptors were written ahead as:
#: how many it lists, and how many of its blobs the repository may read
_AHEAD = """
SELECT (SELECT COUNT(*) FROM refs WHERE manifest=? AND position < ?),
    (SELECT COUNT(*) FROM repo_blobs WHERE upstream=? AND repo=? AND digest IN
        (SELECT child FROM refs WHERE manifest=? AND position < ? AND kind='blob'))
"""


def _all_ahead(listed: list[tuple[str, str]], refs: int, links: int) -> bool:
    """Whether the rows written ahead for *listed* are all still there."""
    first: dict[str, str] = {}
    for child, kind in listed:
        first.setdefault(child, kind)
    return refs == len(first) and links == sum(kind == "blob" for kind in first.values())


#: temp.cand: up to ? evictable images, least recently used first: manifests
#: no cached manifest of their repository lists, neither pinned (nor any of
#: their platform manifests) nor listing a blob being read
_CANDIDATES = """
INSERT INTO temp.cand (upstream, repo, digest, used)
SELECT m.upstream, m.repo, m.digest, COALESCE(m.last_access, m.fetched_at)
FROM manifests m
WHERE 1=1 {when}
AND NOT EXISTS (SELECT 1 FROM refs r CROSS JOIN manifests p
    ON p.upstream=m.upstream AND p.repo=m.repo AND p.digest=r.manifest
    WHERE r.child=m.digest)
AND NOT EXISTS (SELECT 1 FROM temp.kept k
    WHERE k.upstream=m.upstream AND k.repo=m.repo AND k.digest=m.digest)
AND NOT EXISTS (SELECT 1 FROM refs r CROSS JOIN temp.kept k
    ON k.upstream=m.upstream AND k.repo=m.repo AND k.digest=r.child
    CROSS JOIN manifests c ON c.upstream=m.upstream AND c.repo=m.repo AND c.digest=r.child
    WHERE r.manifest=m.digest AND r.kind='manifest')
AND NOT EXISTS (SELECT 1 FROM refs r CROSS JOIN temp.busy b ON b.digest=r.child
    WHERE r.manifest=m.digest)
AND NOT EXISTS (SELECT 1 FROM refs r
    CROSS JOIN manifests c ON c.upstream=m.upstream AND c.repo=m.repo AND c.digest=r.child
    CROSS JOIN refs rc ON rc.manifest=c.digest CROSS JOIN temp.busy b ON b.digest=rc.child
    WHERE r.manifest=m.digest AND r.kind='manifest')
ORDER BY COALESCE(m.last_access, m.fetched_at), m.fetched_at
LIMIT ?
"""

#: temp.fam gets the candidates' platform manifests that no manifest but
#: candidates lists, each going with the last of its candidates to go
_PLATFORMS = """
INSERT OR IGNORE INTO temp.fam
SELECT upstream, repo, digest, MAX(rank) FROM (
    SELECT c.upstream, c.repo, c.digest, x.rank
    FROM temp.cand x CROSS JOIN refs r ON r.manifest=x.digest AND r.kind='manifest'
    CROSS JOIN manifests c ON c.upstream=x.upstream AND c.repo=x.repo AND c.digest=r.child
) c
GROUP BY upstream, repo, digest
HAVING NOT EXISTS (SELECT 1 FROM refs r2 CROSS JOIN manifests p
    ON p.upstream=c.upstream AND p.repo=c.repo AND p.digest=r2.manifest
    WHERE r2.child=c.digest AND NOT EXISTS (SELECT 1 FROM temp.cand y
        WHERE y.upstream=p.upstream AND y.repo=p.repo AND y.digest=p.digest))
"""

#: the rank of the first candidate by which the blobs freed (those all of
#: whose cached holders are in temp.fam, freed with the last of them to go)
#: add up to ? bytes, or NULL.  Whether a blob is freed is asked of its
#: holders outside temp.fam, so the search ends at the first one: a base
#: layer every cached image lists costs a step, not a row per image.
_CUT = """
WITH listed(digest) AS (
    SELECT digest FROM temp.fam
    UNION SELECT r.child FROM temp.fam f JOIN refs r ON r.manifest=f.digest
), freed(blob) AS (
    SELECT l.digest FROM listed l
    WHERE NOT EXISTS (SELECT 1 FROM manifests m WHERE m.digest=l.digest
        AND NOT EXISTS (SELECT 1 FROM temp.fam f
            WHERE f.upstream=m.upstream AND f.repo=m.repo AND f.digest=m.digest))
    AND NOT EXISTS (SELECT 1 FROM refs r JOIN manifests m ON m.digest=r.manifest
        WHERE r.child=l.digest AND NOT EXISTS (SELECT 1 FROM temp.fam f
            WHERE f.upstream=m.upstream AND f.repo=m.repo AND f.digest=m.digest))
), held(blob, rank) AS (
    SELECT digest, rank FROM temp.fam
    UNION ALL SELECT r.child, f.rank FROM temp.fam f JOIN refs r ON r.manifest=f.digest
), per_rank(rank, bytes) AS (
    SELECT x.rank, SUM(COALESCE(b.size, 0)) FROM (
        SELECT h.blob, MAX(h.rank) AS rank FROM held h
        WHERE h.blob IN (SELECT blob FROM freed) GROUP BY h.blob
    ) x LEFT JOIN blobs b ON b.digest=x.blob GROUP BY x.rank
)
SELECT MIN(rank) FROM (
    SELECT rank, SUM(bytes) OVER (ORDER BY rank ROWS UNBOUNDED PRECEDING) AS total FROM per_rank
) WHERE total >= ?
"""

#: temp.orphans: what temp.doomed was and listed, that no cached manifest is or lists
_ORPHANS = """
INSERT OR IGNORE INTO temp.orphans
SELECT l.digest, COALESCE(b.size, 0) FROM (
    SELECT digest FROM temp.doomed
    UNION SELECT r.child FROM temp.doomed d JOIN refs r ON r.manifest=d.digest
) l LEFT JOIN blobs b ON b.digest=l.digest
WHERE NOT EXISTS (SELECT 1 FROM manifests m WHERE m.digest=l.digest)
AND NOT EXISTS (SELECT 1 FROM refs r JOIN manifests m ON m.digest=r.manifest
    WHERE r.child=l.digest)
"""

#: store files no cached manifest is or lists, least recently used first,
#: none being read: the first ? of them, as far as needed to free ? bytes
_LOOSE = """
SELECT digest, size FROM (
    SELECT digest, size, SUM(size) OVER (ORDER BY used, digest ROWS UNBOUNDED PRECEDING) AS total
    FROM (
        SELECT b.digest, b.size, COALESCE(b.last_access, b.stored_at) AS used FROM blobs b
        WHERE NOT EXISTS (SELECT 1 FROM manifests m WHERE m.digest=b.digest)
        AND NOT EXISTS (SELECT 1 FROM refs r CROSS JOIN manifests m ON m.digest=r.manifest
            WHERE r.child=b.digest)
        AND NOT EXISTS (SELECT 1 FROM temp.busy x WHERE x.digest=b.digest)
        ORDER BY COALESCE(b.last_access, b.stored_at), b.digest
        LIMIT ?
    )
) WHERE total - size < ? ORDER BY total
"""


def _sub(sql: str, old: str, new: str) -> str:
    """*sql* with *old* replaced, which must be there (so that a change to
    the text it is made from fails at import, not at run time)."""
    if old not in sql:
        raise AssertionError(f"index.py's SQL changed: {old!r} not found")
    return sql.replace(old, new)


#: _LOOSE among the ? least recently used store files only
_LOOSE_IN = _sub(
    _LOOSE,
    "FROM blobs b\n",
    "FROM (SELECT * FROM blobs ORDER BY COALESCE(last_access, stored_at), digest LIMIT ?) b\n",
)

#: which of the store files {marks} no cached manifest is or lists
_STILL_LOOSE = """
SELECT b.digest FROM blobs b WHERE b.digest IN ({marks})
AND NOT EXISTS (SELECT 1 FROM manifests m WHERE m.digest=b.digest)
AND NOT EXISTS (SELECT 1 FROM refs r CROSS JOIN manifests m ON m.digest=r.manifest
    WHERE r.child=b.digest)
"""


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
