"""The cluster's cache index in PostgreSQL: :class:`~..cache.index.Index`'s
methods, signatures, return types and semantics, shared by every node.

Every method is synchronous and blocks on the database: call it from a worker
thread (``Database``'s threadpool), never the reactor's.  One object may be
used from several threads at once: each call takes a pooled connection of its
own; the access times gathered by :meth:`PgIndex.touch_manifest` and
:meth:`PgIndex.touch_blob` are this node's, behind a lock, until
:meth:`PgIndex.flush`.

Several nodes at once:

* the heavy operations (:meth:`~PgIndex.evict`, :meth:`~PgIndex.evict_loose`,
  :meth:`~PgIndex.purge`, :meth:`~PgIndex.forget_blobs`) take one
  cluster-wide advisory lock, exclusively, in each of their (short, bounded)
  transactions: they never interleave, on one node or several;
* the hot-path writes (manifests, tags, blobs, links, access times) take the
  same lock shared, so they run side by side, never inside a heavy
  transaction: a purge's choice of the blobs nothing lists any more cannot
  be overtaken by a manifest that lists one of them;
* hot-path writes are upserts whose rows are written in key order (one
  manifest before its refs and repo_blobs, the access times' manifests before
  their blobs), so that two of them never wait for each other in a cycle;
  a deadlock or serialization failure all the same is retried a few times.

The SQL is index.py's where PostgreSQL runs it unchanged, put through
:func:`_pg` (``?`` placeholders, ``temp.`` scratch tables, SQLite's
``CROSS JOIN ... ON`` join-order hint, ``INSERT OR IGNORE``); elsewhere the
PostgreSQL form is written next to a comment naming the SQLite one.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import psycopg
from psycopg import errors
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadable import isInIOThread
from twisted.python.threadpool import ThreadPool

from ..cache import index as sqlite_index
from ..cache.index import (
    Evicted,
    IndexUnusable,
    ManifestEntry,
    ManifestRow,
    Page,
    Removed,
    RepoSummary,
    TagEntry,
    TagRow,
    _manifest_filter,
    _sub,
    known,
    summaries,
    summary,
)
from ..errors import RegistryError
from ..runtime import Bounded, Busy, IReactor, Stopped
from .pg import Database, lock_id

log = Logger()

T = TypeVar("T")

Conn = psycopg.Connection[Any]

#: the tables, for ANALYZE
TABLES = ("manifests", "tags", "refs", "blobs", "repo_blobs", "blob_sources")
#: the schema version, kept as the comment of the manifests table
#: 2: repo_blobs indexed by (digest, upstream) (whether an upstream sent a
#: blob is one probe); a node of schema 1 meeting it refuses to start
#: 3: blob_sources, which upstreams sent each blob (filled from repo_blobs
#: once, on the way from 2)
VERSION = 3
_COMMENT = "regproxy index schema {}"

#: index.py's reclaim list: made whatever the schema's version (a table more
#: that nodes of the same version before it leave alone)
_RECLAIM = 'CREATE TABLE IF NOT EXISTS reclaim (digest TEXT COLLATE "C" PRIMARY KEY)'

#: index.py's schema: TEXT in byte order (COLLATE "C", as SQLite's BINARY,
#: so that both backends sort alike), REAL as double precision, no WITHOUT
#: ROWID (PostgreSQL has no rowid), the same indexes
_SCHEMA = """
CREATE TABLE IF NOT EXISTS manifests (
    upstream TEXT COLLATE "C" NOT NULL, repo TEXT COLLATE "C" NOT NULL,
    digest TEXT COLLATE "C" NOT NULL,
    media_type TEXT NOT NULL, size BIGINT NOT NULL, fetched_at DOUBLE PRECISION NOT NULL,
    last_access DOUBLE PRECISION,
    PRIMARY KEY (upstream, repo, digest)
);
CREATE TABLE IF NOT EXISTS tags (
    upstream TEXT COLLATE "C" NOT NULL, repo TEXT COLLATE "C" NOT NULL,
    tag TEXT COLLATE "C" NOT NULL,
    media_type TEXT NOT NULL, digest TEXT COLLATE "C" NOT NULL,
    checked_at DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (upstream, repo, tag)
);
CREATE TABLE IF NOT EXISTS refs (
    manifest TEXT COLLATE "C" NOT NULL, child TEXT COLLATE "C" NOT NULL,
    kind TEXT COLLATE "C" NOT NULL, position INTEGER NOT NULL,
    PRIMARY KEY (manifest, child)
);
CREATE INDEX IF NOT EXISTS refs_child ON refs (child);
CREATE TABLE IF NOT EXISTS blobs (
    digest TEXT COLLATE "C" PRIMARY KEY, size BIGINT NOT NULL,
    stored_at DOUBLE PRECISION NOT NULL, last_access DOUBLE PRECISION
);
CREATE TABLE IF NOT EXISTS repo_blobs (
    upstream TEXT COLLATE "C" NOT NULL, repo TEXT COLLATE "C" NOT NULL,
    digest TEXT COLLATE "C" NOT NULL,
    PRIMARY KEY (upstream, repo, digest)
);
-- by digest, and which upstreams' repositories: whether an upstream ever
-- served a blob is one probe however many repositories list it
DROP INDEX IF EXISTS repo_blobs_digest;
CREATE INDEX IF NOT EXISTS repo_blobs_digest_upstream ON repo_blobs (digest, upstream);
CREATE TABLE IF NOT EXISTS blob_sources (
    digest TEXT COLLATE "C" NOT NULL, upstream TEXT COLLATE "C" NOT NULL,
    PRIMARY KEY (digest, upstream)
);
CREATE INDEX IF NOT EXISTS blob_sources_upstream ON blob_sources (upstream);
CREATE INDEX IF NOT EXISTS manifests_digest ON manifests (digest);
-- with the key, as eviction's order breaks ties by it (SQLite: by rowid,
-- which its index holds), so that LIMIT stops early even among ties
CREATE INDEX IF NOT EXISTS manifests_used
    ON manifests ((COALESCE(last_access, fetched_at)), fetched_at, upstream, repo, digest);
CREATE INDEX IF NOT EXISTS tags_digest ON tags (upstream, repo, digest);
CREATE INDEX IF NOT EXISTS blobs_used ON blobs ((COALESCE(last_access, stored_at)), digest);
"""

#: index.py's _SCRATCH: temporary tables of one connection (SQLite: temp.*
#: WITHOUT ROWID; ``cand.rank`` filled by row_number() rather than as the
#: rowid, ``purging.n`` an identity column in place of the rowid)
_SCRATCH = """
CREATE TEMP TABLE IF NOT EXISTS busy (digest TEXT COLLATE "C" PRIMARY KEY);
CREATE TEMP TABLE IF NOT EXISTS pins (
    upstream TEXT COLLATE "C", repo TEXT COLLATE "C", tag TEXT COLLATE "C",
    digest TEXT COLLATE "C");
CREATE TEMP TABLE IF NOT EXISTS kept (
    upstream TEXT COLLATE "C", repo TEXT COLLATE "C", digest TEXT COLLATE "C",
    PRIMARY KEY (upstream, repo, digest));
CREATE TEMP TABLE IF NOT EXISTS cand (
    rank INTEGER PRIMARY KEY, upstream TEXT COLLATE "C", repo TEXT COLLATE "C",
    digest TEXT COLLATE "C", used DOUBLE PRECISION);
CREATE INDEX IF NOT EXISTS cand_key ON cand (upstream, repo, digest);
CREATE TEMP TABLE IF NOT EXISTS fam (
    upstream TEXT COLLATE "C", repo TEXT COLLATE "C", digest TEXT COLLATE "C",
    rank INTEGER, PRIMARY KEY (upstream, repo, digest));
CREATE TEMP TABLE IF NOT EXISTS roots (
    upstream TEXT COLLATE "C", repo TEXT COLLATE "C", digest TEXT COLLATE "C");
CREATE TEMP TABLE IF NOT EXISTS doomed (
    upstream TEXT COLLATE "C", repo TEXT COLLATE "C", digest TEXT COLLATE "C",
    PRIMARY KEY (upstream, repo, digest));
CREATE TEMP TABLE IF NOT EXISTS purging (
    n BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    upstream TEXT COLLATE "C", repo TEXT COLLATE "C", digest TEXT COLLATE "C");
CREATE TEMP TABLE IF NOT EXISTS orphans (digest TEXT COLLATE "C" PRIMARY KEY, size BIGINT)
"""

#: one cluster-wide lock: heavy operations exclusive, hot-path writes shared
HEAVY = lock_id("regproxy-index-heavy")
#: the lock under which a node creates the schema (membership's too)
SCHEMA_LOCK = lock_id("regproxy-schema")
#: transactions tried again after a deadlock or serialization failure
_RETRIES = 5
#: how long a heavy batch waits for the exclusive heavy lock before trying again
EXCLUSIVE_WAIT_MS = 1000


def _pg(sql: str) -> str:
    """index.py's SQLite text in PostgreSQL's spelling, where that is
    mechanical: ``?`` → ``%s``; ``temp.x`` → ``pg_temp.x``; ``CROSS JOIN x
    ON`` (SQLite's join-order hint; PostgreSQL allows no ON there) → ``JOIN
    x ON``; ``INSERT OR IGNORE INTO ... `` → ``INSERT INTO ... ON CONFLICT
    DO NOTHING``."""
    sql = sql.replace("?", "%s").replace("temp.", "pg_temp.").replace("CROSS JOIN", "JOIN")
    if "INSERT OR IGNORE INTO" in sql:
        sql = (
            sql.replace("INSERT OR IGNORE INTO", "INSERT INTO").rstrip() + " ON CONFLICT DO NOTHING"
        )
    return sql


# index.py's _CANDIDATES fills temp.cand's rank (its rowid) in LRU order; here
# row_number() over the same order gives the rank, ties broken by the key
_CANDIDATES = _pg(
    "INSERT INTO temp.cand (rank, upstream, repo, digest, used)"
    " SELECT row_number() OVER (ORDER BY used, fetched_at, upstream, repo, digest),"
    " upstream, repo, digest, used FROM ("
    + _sub(
        _sub(
            _sub(
                sqlite_index._CANDIDATES,
                "INSERT INTO temp.cand (upstream, repo, digest, used)\n",
                "",
            ),
            "COALESCE(m.last_access, m.fetched_at)\nFROM manifests m",
            "COALESCE(m.last_access, m.fetched_at) AS used, m.fetched_at\nFROM manifests m",
        ),
        "ORDER BY COALESCE(m.last_access, m.fetched_at), m.fetched_at\n",
        "ORDER BY COALESCE(m.last_access, m.fetched_at), m.fetched_at,"
        " m.upstream, m.repo, m.digest\n",
    )
    + ") c"
)
_PLATFORMS = _pg(sqlite_index._PLATFORMS)
# PostgreSQL 15 wants an alias for every subquery in FROM
_CUT = _pg(_sub(sqlite_index._CUT, "\n) WHERE total >= ?", "\n) AS s WHERE total >= ?"))
_ORPHANS = _pg(sqlite_index._ORPHANS)
_LOOSE = _pg(
    _sub(
        _sub(sqlite_index._LOOSE, "LIMIT ?\n    )\n", "LIMIT ?\n    ) AS u\n"),
        "\n) WHERE total - size",
        "\n) AS s WHERE total - size",
    )
)

# index.py's INSERT OR REPLACE (delete the row, insert anew) as an upsert
_PUT_MANIFEST = (
    "INSERT INTO manifests VALUES (%s, %s, %s, %s, %s, %s, NULL)"
    " ON CONFLICT (upstream, repo, digest) DO UPDATE SET media_type=EXCLUDED.media_type,"
    " size=EXCLUDED.size, fetched_at=EXCLUDED.fetched_at, last_access=NULL"
)
_PUT_TAG = (
    "INSERT INTO tags SELECT %s, %s, %s, %s, %s, %s"
    " WHERE EXISTS (SELECT 1 FROM manifests WHERE upstream=%s AND repo=%s AND digest=%s)"
    " ON CONFLICT (upstream, repo, tag) DO UPDATE SET media_type=EXCLUDED.media_type,"
    " digest=EXCLUDED.digest, checked_at=EXCLUDED.checked_at"
)
_PUT_BLOB = (
    "INSERT INTO blobs VALUES (%s, %s, %s, NULL) ON CONFLICT (digest) DO UPDATE"
    " SET size=EXCLUDED.size, stored_at=EXCLUDED.stored_at, last_access=NULL"
)
_REPOSITORY_REFS = _pg(sqlite_index._REPOSITORY_REFS)
_LINK = "INSERT INTO repo_blobs VALUES (%s, %s, %s) ON CONFLICT DO NOTHING"


def _put_refs(
    cur: Any, upstream: str, repo: str, digest: str, refs: list[tuple[str, str]], first: int
) -> None:
    """What manifest *digest* lists, from position *first* on, in key order
    (a child listed twice keeps its first position, as INSERT OR IGNORE does
    in index.py)."""
    children = sorted((child, first + i, kind) for i, (child, kind) in enumerate(refs))
    cur.executemany(
        "INSERT INTO refs VALUES (%s, %s, %s, %s) ON CONFLICT DO NOTHING",
        [(digest, child, kind, i) for child, i, kind in children],
    )
    blobs = sorted({child for child, kind in refs if kind == "blob"})
    cur.executemany(_LINK, [(upstream, repo, child) for child in blobs])


_SOURCE = "INSERT INTO blob_sources VALUES (%s, %s) ON CONFLICT DO NOTHING"
_KNOWN = _pg(sqlite_index._KNOWN)
_AHEAD = _pg(sqlite_index._AHEAD)
_SOURCES_FROM_LINKS = _pg(sqlite_index._SOURCES_FROM_LINKS)
_UNVOUCH = _pg(sqlite_index._UNVOUCH)
#: rows of blob_sources forgotten per transaction of a purge
_UNVOUCH_STEP = 2000


def _off_the_reactor() -> None:
    if isInIOThread():
        raise RuntimeError(
            "PgIndex was called on the reactor thread, where it would block every"
            " client: run it in the index's thread pool"
        )


def _retryable(e: BaseException) -> bool:
    return isinstance(
        e, (errors.DeadlockDetected, errors.SerializationFailure, errors.LockNotAvailable)
    )


class PgIndex:
    """:class:`~..cache.index.Index` over a :class:`~.pg.Database`.

    Differences: construct it anywhere, then call :meth:`open` (in a worker
    thread) to create or check the schema; :meth:`close` flushes but leaves
    the database (its owner's) open; :meth:`companion` is this object, and
    :meth:`autocheckpoint`/:meth:`checkpoint` do nothing (SQLite's WAL);
    :meth:`flush` never moves an access time back; :meth:`put_tag` of a
    manifest not cached in that repository does nothing.
    """

    def __init__(self, db: Database) -> None:
        self._database = db
        self._lock = threading.Lock()
        self._manifest_access: dict[tuple[str, str, str], float] = {}
        self._blob_access: dict[str, float] = {}
        #: connections whose scratch tables exist
        self._scratched: weakref.WeakSet[Conn] = weakref.WeakSet()
        #: transactions tried again after a deadlock or serialization failure
        #: (none, if every writer keeps to the key order)
        self.retries = 0

    # -- the schema ----------------------------------------------------------

    def open(self) -> None:
        """Create the tables if missing (one node at a time), or check that
        no newer regproxy wrote them (:class:`IndexUnusable` if so)."""

        def create(conn: Conn) -> None:
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
            row = conn.execute(
                "SELECT to_regclass('manifests') IS NOT NULL,"
                " obj_description(to_regclass('manifests'), 'pg_class')"
            ).fetchone()
            exists, comment = row if row else (False, None)
            if exists:
                prefix = _COMMENT.format("")
                number = (comment or "").removeprefix(prefix)
                if number == (comment or "") or not number.isdigit():
                    raise IndexUnusable(
                        "the PostgreSQL database has a table named manifests that regproxy did"
                        " not make: give the cluster a database of its own"
                    )
                version = int(number)
                if version > VERSION:
                    raise IndexUnusable(
                        f"the index in PostgreSQL was written by a newer regproxy (schema "
                        f"{version}): upgrade this node"
                    )
                if version == VERSION:
                    conn.execute(_RECLAIM)
                    return
            conn.execute(_SCHEMA)
            conn.execute(_RECLAIM)
            if exists and version < 3:
                # trusted once, else every cached blob is downloaded again
                # once per upstream after the upgrade
                conn.execute(_SOURCES_FROM_LINKS)
            conn.execute(f"COMMENT ON TABLE manifests IS '{_COMMENT.format(VERSION)}'")
            log.info("index schema {version} ready in PostgreSQL", version=VERSION)

        self._write(create, lock=None)

    def close(self) -> None:
        self.flush()

    def companion(self) -> PgIndex:
        """This object: it is safe to use from several threads already."""
        return self

    def autocheckpoint(self, pages: int) -> None:
        """Nothing: PostgreSQL has no WAL checkpoints of ours to schedule."""

    def checkpoint(self) -> tuple[int, int, int]:
        """Nothing to do: ``(0, 0, 0)``."""
        return 0, 0, 0

    # -- transactions ----------------------------------------------------------

    def _write(self, fn: Callable[[Conn], T], lock: str | None, scratch: bool = False) -> T:
        """``fn(conn)`` in a transaction on a pooled connection (see :meth:`_on`),
        with its scratch tables if *scratch*."""
        _off_the_reactor()
        with self._database.connection() as conn:
            if scratch:
                self._scratch(conn)
            return self._on(conn, fn, lock)

    def _on(self, conn: Conn, fn: Callable[[Conn], T], lock: str | None) -> T:
        """``fn(conn)`` in a transaction of *conn* holding the heavy lock
        ``"shared"`` or ``"exclusive"`` (or none), tried again after a
        deadlock or a serialization failure."""
        for attempt in range(_RETRIES):
            try:
                with conn.transaction():
                    if lock == "shared":
                        conn.execute("SELECT pg_advisory_xact_lock_shared(%s)", (HEAVY,))
                    elif lock == "exclusive":
                        # Waiting for it queues every node's writes (which
                        # take its shared side) behind this one: a holder
                        # that vanished would stop them all.  A moment, then
                        # again later.
                        conn.execute(f"SET LOCAL lock_timeout = {EXCLUSIVE_WAIT_MS}")
                        conn.execute("SELECT pg_advisory_xact_lock(%s)", (HEAVY,))
                        conn.execute("SET LOCAL lock_timeout = 0")
                        # compiling the heavy queries costs more than it saves;
                        # they are written for index probes from a few scratch
                        # rows (index.py's nested loops), which the default
                        # cost of a random read (4, for spinning disks) turns
                        # into scans of whole tables
                        conn.execute("SET LOCAL jit = off")
                        conn.execute("SET LOCAL random_page_cost = 1.1")
                    return fn(conn)
            except psycopg.Error as e:
                if not _retryable(e) or attempt == _RETRIES - 1:
                    raise
                with self._lock:
                    self.retries += 1
                log.warn("index transaction retried: {why}", why=e)
        raise AssertionError("unreachable")

    def _read(self, sql: str, args: Iterable[object] = ()) -> list[tuple[Any, ...]]:
        _off_the_reactor()
        with self._database.transaction() as conn:
            return conn.execute(sql, tuple(args)).fetchall()

    # -- access times, batched ---------------------------------------------

    def touch_manifest(self, upstream: str, repo: str, digest: str, when: float) -> None:
        with self._lock:
            self._manifest_access[(upstream, repo, digest)] = when

    def touch_blob(self, digest: str, when: float) -> None:
        with self._lock:
            self._blob_access[digest] = when

    def flush(self) -> None:
        """Write this node's access times gathered since the last flush; an
        access time never goes back (another node's may be later)."""
        with self._lock:
            if not (self._manifest_access or self._blob_access):
                return
            manifests, self._manifest_access = self._manifest_access, {}
            blobs, self._blob_access = self._blob_access, {}

        def write(conn: Conn) -> None:
            cur = conn.cursor()
            # index.py: UPDATE ... SET last_access=?; in key order, manifests
            # before blobs, as every writer
            cur.executemany(
                "UPDATE manifests SET last_access=GREATEST(last_access, %s)"
                " WHERE upstream=%s AND repo=%s AND digest=%s",
                [(when, *key) for key, when in sorted(manifests.items())],
            )
            cur.executemany(
                "UPDATE blobs SET last_access=GREATEST(last_access, %s) WHERE digest=%s",
                [(when, digest) for digest, when in sorted(blobs.items())],
            )

        self._write(write, "shared")

    # -- manifests and tags --------------------------------------------------

    def manifest(self, upstream: str, repo: str, digest: str) -> ManifestEntry | None:
        rows = self._read(
            "SELECT digest, media_type, size FROM manifests"
            " WHERE upstream=%s AND repo=%s AND digest=%s",
            (upstream, repo, digest),
        )
        return ManifestEntry(*rows[0]) if rows else None

    def put_manifest(
        self,
        upstream: str,
        repo: str,
        entry: ManifestEntry,
        fetched_at: float,
        refs: Iterable[tuple[str, str]] = (),
        ahead: int = 0,
        mark: None = None,
    ) -> None:
        """Record a manifest and what it lists: ``(digest, "blob"|"manifest")``,
        of which the first *ahead* were written ahead (see index.py): always
        checked, as every node writes (no *mark*)."""
        listed = list(refs)

        def write(conn: Conn) -> None:
            cur = conn.cursor()
            cur.execute(
                _PUT_MANIFEST,
                (upstream, repo, entry.digest, entry.media_type, entry.size, fetched_at),
            )
            first = 0
            if ahead:
                cur.execute(_AHEAD, (entry.digest, ahead, upstream, repo, entry.digest, ahead))
                row = cur.fetchone()
                if row is not None and sqlite_index._all_ahead(listed[:ahead], *row):
                    first = ahead
            _put_refs(cur, upstream, repo, entry.digest, listed[first:], first)

        self._write(write, "shared")

    def removal_mark(self) -> None:
        """None: many nodes write, and put_manifest always checks."""
        return None

    def put_refs(
        self, upstream: str, repo: str, digest: str, refs: list[tuple[str, str]], first: int
    ) -> None:
        """Part of what manifest *digest* lists, ahead of :meth:`put_manifest`
        (see index.py)."""
        self._write(
            lambda conn: _put_refs(conn.cursor(), upstream, repo, digest, refs, first), "shared"
        )

    def tag(self, upstream: str, repo: str, tag: str) -> TagEntry | None:
        rows = self._read(
            "SELECT digest, media_type, checked_at FROM tags"
            " WHERE upstream=%s AND repo=%s AND tag=%s",
            (upstream, repo, tag),
        )
        return TagEntry(*rows[0]) if rows else None

    def put_tag(self, upstream: str, repo: str, tag: str, entry: TagEntry) -> None:
        """Point *tag* at *entry*, if its manifest is cached in *repo*
        (index.py: unconditionally; here a purge on another node between
        a node's put_manifest and put_tag would leave a dangling tag)."""
        self._write(
            lambda conn: conn.execute(
                _PUT_TAG,
                (upstream, repo, tag, entry.media_type, entry.digest, entry.checked_at)
                + (upstream, repo, entry.digest),
            ),
            "shared",
        )

    # -- blobs ---------------------------------------------------------------

    def put_blob(self, digest: str, size: int, stored_at: float) -> None:
        self._write(lambda conn: conn.execute(_PUT_BLOB, (digest, size, stored_at)), "shared")

    def put_blobs(self, blobs: Iterable[tuple[str, int, float]]) -> None:
        """:meth:`put_blob` for many ``(digest, size, stored_at)``, in one transaction."""
        # key order; the last of a digest given twice wins, as in index.py
        rows = sorted({digest: (digest, size, at) for digest, size, at in blobs}.values())
        self._write(lambda conn: conn.cursor().executemany(_PUT_BLOB, rows), "shared")

    def link_blobs(self, upstream: str, repo: str, digests: Iterable[str]) -> None:
        ordered = sorted(set(digests))

        def link(conn: Conn) -> None:
            cur = conn.cursor()
            cur.executemany(_LINK, [(upstream, repo, digest) for digest in ordered])
            cur.executemany(_SOURCE, [(digest, upstream) for digest in ordered])

        self._write(link, "shared")

    def has_blob(self, upstream: str, repo: str, digest: str) -> bool:
        return bool(
            self._read(
                "SELECT 1 FROM repo_blobs WHERE upstream=%s AND repo=%s AND digest=%s",
                (upstream, repo, digest),
            )
        )

    def blob_known(self, upstream: str, repo: str, digest: str) -> str | None:
        ((sent, linked),) = self._read(_KNOWN, (digest, upstream, upstream, repo, digest))
        return known(sent, linked)

    def blob_sizes(self, digests: Iterable[str]) -> dict[str, int]:
        # index.py: digest IN (?, ?, ...) in chunks of 500
        wanted = list(digests)
        if not wanted:
            return {}
        rows = self._read("SELECT digest, size FROM blobs WHERE digest = ANY(%s)", (wanted,))
        return {digest: size for digest, size in rows}

    def to_reclaim(self, after: str, limit: int) -> list[str]:
        rows = self._read(
            "SELECT digest FROM reclaim WHERE digest > %s ORDER BY digest LIMIT %s", (after, limit)
        )
        return [digest for (digest,) in rows]

    def reclaimed(self, digests: Iterable[str]) -> None:
        ordered = sorted(digests)

        def delete(conn: Conn) -> None:
            conn.execute("DELETE FROM reclaim WHERE digest = ANY(%s)", (ordered,))

        self._write(delete, lock=None)

    # -- listing -------------------------------------------------------------

    def total_size(self) -> int:
        return int(self._read("SELECT COALESCE(SUM(size), 0) FROM blobs")[0][0])

    def totals(self) -> dict[str, int]:
        size, blobs, manifests, tags, repositories = self._read(
            "SELECT (SELECT COALESCE(SUM(size), 0) FROM blobs), (SELECT COUNT(*) FROM blobs),"
            " (SELECT COUNT(*) FROM manifests),"
            " (SELECT COUNT(*) FROM tags),"
            " (SELECT COUNT(*) FROM (SELECT DISTINCT upstream, repo FROM manifests) r)"
        )[0]
        return {
            "size_bytes": int(size),
            "blobs": blobs,
            "manifests": manifests,
            "tags": tags,
            "repositories": repositories,
        }

    def repository_summaries(
        self, upstream: str | None = None, page: Page = Page()
    ) -> list[RepoSummary]:
        sql, params = summaries(upstream, page)
        return [summary(row) for row in self._read(_pg(sql), params)]

    def repository_refs(self, upstream: str, repo: str) -> list[tuple[str, str, str, int | None]]:
        rows = self._read(_REPOSITORY_REFS, (upstream, repo))
        return [(manifest, child, kind, size) for manifest, child, kind, size in rows]

    def repo_manifests(self, upstream: str, repo: str) -> list[ManifestRow]:
        rows = self._read(
            "SELECT * FROM manifests WHERE upstream=%s AND repo=%s ORDER BY fetched_at",
            (upstream, repo),
        )
        return [ManifestRow(*row) for row in rows]

    def repo_tags(self, upstream: str, repo: str) -> list[TagRow]:
        rows = self._read(
            "SELECT * FROM tags WHERE upstream=%s AND repo=%s ORDER BY tag", (upstream, repo)
        )
        return [TagRow(*row) for row in rows]

    def refs(self, manifest: str) -> list[tuple[str, str]]:
        rows = self._read(
            "SELECT child, kind FROM refs WHERE manifest=%s ORDER BY position", (manifest,)
        )
        return [(child, kind) for child, kind in rows]

    # -- eviction ------------------------------------------------------------

    def evict(
        self,
        pins: Iterable[tuple[str, str, str | None, str | None]] = (),
        busy: Iterable[str] = (),
        limit: int = 100,
        used_before: float | None = None,
        excess: float | None = None,
    ) -> Evicted:
        """:meth:`Index.evict <..cache.index.Index.evict>`, one transaction
        under the cluster's heavy lock."""
        if excess is not None and excess <= 0:
            return Evicted([], Removed(0, 0, []), more=False)
        self.flush()
        pinned, in_use = list(pins), sorted(set(busy))

        def work(conn: Conn) -> Evicted:
            cur = conn.cursor()
            self._fill_pins(cur, pinned)
            cur.execute("DELETE FROM pg_temp.busy")
            cur.executemany("INSERT INTO pg_temp.busy VALUES (%s)", [(d,) for d in in_use])
            cur.execute("DELETE FROM pg_temp.cand")
            cur.execute("DELETE FROM pg_temp.fam")
            when = "" if used_before is None else "AND COALESCE(m.last_access, m.fetched_at) < %s"
            args: list[object] = [] if used_before is None else [used_before]
            cur.execute(_CANDIDATES.replace("{when}", when), [*args, limit])
            # temporary tables have no statistics but those ANALYZE gives:
            # without them the planner takes them for large and scans the
            # manifests instead of probing them (SQLite's CROSS JOIN order)
            cur.execute("ANALYZE pg_temp.cand")
            found = _one(cur.execute("SELECT COUNT(*) FROM pg_temp.cand"))
            if not found:
                return Evicted([], Removed(0, 0, []), more=False)
            cur.execute(
                "INSERT INTO pg_temp.fam SELECT upstream, repo, digest, rank FROM pg_temp.cand"
            )
            cur.execute(_PLATFORMS)
            cur.execute("ANALYZE pg_temp.fam")
            cut = found
            if excess is not None:
                row = _one(cur.execute(_CUT, (excess,)))
                if row is not None:
                    cut = row
            cur.execute("DELETE FROM pg_temp.fam WHERE rank > %s", (cut,))
            cur.execute("DELETE FROM pg_temp.doomed")
            cur.execute("INSERT INTO pg_temp.doomed SELECT upstream, repo, digest FROM pg_temp.fam")
            images = [
                (u, r, d, used)
                for u, r, d, used in cur.execute(
                    "SELECT upstream, repo, digest, used FROM pg_temp.cand"
                    " WHERE rank <= %s ORDER BY rank",
                    (cut,),
                ).fetchall()
            ]
            removed = self._remove_doomed(cur)
            return Evicted(images, removed, more=cut == found == limit)

        return self._write(work, "exclusive", scratch=True)

    def evict_loose(
        self, busy: Iterable[str], excess: float, limit: int = 500
    ) -> list[tuple[str, int]]:
        """:meth:`Index.evict_loose <..cache.index.Index.evict_loose>`, one
        transaction under the cluster's heavy lock."""
        in_use = sorted(set(busy))

        def work(conn: Conn) -> list[tuple[str, int]]:
            cur = conn.cursor()
            cur.execute("DELETE FROM pg_temp.busy")
            cur.executemany("INSERT INTO pg_temp.busy VALUES (%s)", [(d,) for d in in_use])
            loose = [(d, size) for d, size in cur.execute(_LOOSE, (limit, excess)).fetchall()]
            _doomed(cur, [d for d, _ in loose])
            _forget(cur, [d for d, _ in loose])
            return loose

        return self._write(work, "exclusive", scratch=True)

    def blobs_after(self, digest: str, limit: int) -> list[tuple[str, int]]:
        """:meth:`Index.blobs_after <..cache.index.Index.blobs_after>`."""
        return [
            (d, size)
            for d, size in self._read(
                "SELECT digest, size FROM blobs WHERE digest > %s ORDER BY digest LIMIT %s",
                (digest, limit),
            )
        ]

    def forget_blob(self, digest: str) -> None:
        self.forget_blobs([digest])

    def forget_blobs(self, digests: Iterable[str]) -> None:
        gone = sorted(set(digests))
        self._write(lambda conn: _forget(conn.cursor(), gone), "exclusive")

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
        """:meth:`Index.purge <..cache.index.Index.purge>`: the selection in
        one transaction, the removal in one per *batch* manifests, each under
        the cluster's heavy lock, all on one connection (its scratch tables)."""
        self.flush()
        where, args = _manifest_filter(upstream, repo, digest, fetched_before, unused_since)
        where = where.replace("?", "%s")
        _off_the_reactor()
        with self._database.connection() as conn:
            self._scratch(conn)

            def select(conn: Conn) -> int:
                cur = conn.cursor()
                cur.execute("DELETE FROM pg_temp.doomed")
                tags_removed = 0
                if tag is not None:
                    cur.execute("DELETE FROM pg_temp.roots")
                    cur.execute(
                        "INSERT INTO pg_temp.roots SELECT DISTINCT upstream, repo, digest"
                        " FROM tags WHERE upstream=%s AND repo=%s AND tag=%s",
                        (upstream, repo, tag),
                    )
                    tags_removed = cur.execute(
                        "DELETE FROM tags WHERE upstream=%s AND repo=%s AND tag=%s",
                        (upstream, repo, tag),
                    ).rowcount
                    self._unkept(cur, keep_tagged=True)
                elif digest is not None:
                    cur.execute("DELETE FROM pg_temp.roots")
                    cur.execute(
                        "INSERT INTO pg_temp.roots"
                        f" SELECT upstream, repo, digest FROM manifests WHERE {where}",
                        args,
                    )
                    self._unkept(cur, keep_tagged=False)
                else:
                    cur.execute(
                        "INSERT INTO pg_temp.doomed"
                        f" SELECT upstream, repo, digest FROM manifests WHERE {where}"
                        " ON CONFLICT DO NOTHING",
                        args,
                    )
                cur.execute("DELETE FROM pg_temp.purging")
                # index.py orders the batches by rowid; here by n, in key order
                cur.execute(
                    "INSERT INTO pg_temp.purging (upstream, repo, digest)"
                    " SELECT upstream, repo, digest FROM pg_temp.doomed"
                    " ORDER BY upstream, repo, digest"
                )
                return tags_removed

            tags_removed = self._on(conn, select, "exclusive")
            manifests, orphans = 0, []

            def step(conn: Conn) -> Removed | None:
                cur = conn.cursor()
                cur.execute("DELETE FROM pg_temp.doomed")
                cur.execute(
                    "INSERT INTO pg_temp.doomed SELECT upstream, repo, digest"
                    " FROM pg_temp.purging ORDER BY n LIMIT %s",
                    (batch,),
                )
                if not _one(cur.execute("SELECT COUNT(*) FROM pg_temp.doomed")):
                    return None
                cur.execute(
                    "DELETE FROM pg_temp.purging WHERE n IN"
                    " (SELECT n FROM pg_temp.purging ORDER BY n LIMIT %s)",
                    (batch,),
                )
                return self._remove_doomed(cur)

            while (removed := self._on(conn, step, "exclusive")) is not None:
                tags_removed += removed.tags
                manifests += removed.manifests
                orphans += removed.blobs

            def unvouch(conn: Conn) -> int:
                """index.py's _unvouch: a step of it, 0 when done."""
                cur = conn.cursor()
                if cur.execute(
                    "SELECT 1 FROM manifests WHERE upstream=%s LIMIT 1", (upstream,)
                ).fetchone():
                    return 0
                return cur.execute(_UNVOUCH, (upstream, _UNVOUCH_STEP)).rowcount

            while upstream is not None and self._on(conn, unvouch, "exclusive") == _UNVOUCH_STEP:
                pass
        return Removed(tags_removed, manifests, sorted(orphans))

    def _scratch(self, conn: Conn) -> None:
        """*conn*'s scratch tables (pg_temp: never shared, dropped with it),
        and statistics for tables never analyzed: filled faster than
        autovacuum looks (a new cluster), they would have the planner take a
        repository's every manifest for one row, and the heavy queries go
        quadratic.  Autovacuum keeps them up to date after that."""
        with conn.transaction():
            stale = conn.execute(
                "SELECT relname FROM pg_stat_user_tables WHERE relname = ANY(%s)"
                " AND last_analyze IS NULL AND last_autoanalyze IS NULL"
                " AND n_mod_since_analyze > 0",
                (list(TABLES),),
            ).fetchall()
            for (table,) in stale:
                log.info("index: analyzing {table}, never analyzed yet", table=table)
                conn.execute(f"ANALYZE {table}")
        if conn in self._scratched:
            return
        with conn.transaction():
            for statement in _SCRATCH.split(";"):
                if statement.strip():
                    conn.execute(statement)
        self._scratched.add(conn)

    @staticmethod
    def _fill_pins(
        cur: psycopg.Cursor[Any], pins: list[tuple[str, str, str | None, str | None]]
    ) -> None:
        """pg_temp.kept: the manifests pins keep (index.py's _fill_pins)."""
        cur.execute("DELETE FROM pg_temp.pins")
        cur.executemany("INSERT INTO pg_temp.pins VALUES (%s, %s, %s, %s)", pins)
        cur.execute("DELETE FROM pg_temp.kept")
        for statement in _KEPT:
            cur.execute(statement)

    @staticmethod
    def _unkept(cur: psycopg.Cursor[Any], keep_tagged: bool) -> None:
        """pg_temp.doomed: pg_temp.roots and their platform manifests, less
        those still kept (index.py's _unkept)."""
        cur.execute("DELETE FROM pg_temp.fam")
        cur.execute(_FAM_ROOTS)
        cur.execute(_FAM_PLATFORMS)
        cur.execute(_UNKEPT, (keep_tagged,))

    @staticmethod
    def _remove_doomed(cur: psycopg.Cursor[Any]) -> Removed:
        """index.py's _remove_doomed, in the order every writer takes its
        rows: manifests (locked in key order first), tags, repo_blobs,
        blob_sources, blobs."""
        cur.execute("ANALYZE pg_temp.doomed")
        cur.execute(
            "SELECT 1 FROM manifests WHERE (upstream, repo, digest) IN"
            " (SELECT upstream, repo, digest FROM pg_temp.doomed)"
            " ORDER BY upstream, repo, digest FOR UPDATE"
        )
        manifests = cur.execute(
            "DELETE FROM manifests WHERE (upstream, repo, digest) IN"
            " (SELECT upstream, repo, digest FROM pg_temp.doomed)"
        ).rowcount
        tags = cur.execute(
            "DELETE FROM tags WHERE (upstream, repo, digest) IN"
            " (SELECT upstream, repo, digest FROM pg_temp.doomed)"
        ).rowcount
        cur.execute(
            "DELETE FROM repo_blobs WHERE (upstream, repo) IN"
            " (SELECT DISTINCT d.upstream, d.repo FROM pg_temp.doomed d WHERE NOT EXISTS"
            "  (SELECT 1 FROM manifests m WHERE m.upstream=d.upstream AND m.repo=d.repo))"
        )
        cur.execute("DELETE FROM pg_temp.orphans")
        cur.execute(_ORPHANS)
        orphans = [
            (d, size)
            for d, size in cur.execute(
                "SELECT digest, size FROM pg_temp.orphans ORDER BY digest"
            ).fetchall()
        ]
        _doomed(cur, [d for d, _ in orphans])
        _forget(cur, [d for d, _ in orphans])
        cur.execute(
            "DELETE FROM refs WHERE manifest IN (SELECT d.digest FROM pg_temp.doomed d"
            " WHERE NOT EXISTS (SELECT 1 FROM manifests m WHERE m.digest=d.digest))"
        )
        return Removed(tags, manifests, orphans)


def _doomed(cur: psycopg.Cursor[Any], digests: list[str]) -> None:
    """index.py's reclaim list: the objects an eviction or a purge will
    delete, should this node die first."""
    cur.execute(
        "INSERT INTO reclaim SELECT unnest(%s::text[]) ON CONFLICT DO NOTHING", (sorted(digests),)
    )


def _forget(cur: psycopg.Cursor[Any], digests: list[str]) -> None:
    """Forget *digests* (in key order): their repo_blobs, then their blobs
    (index.py: blobs first; the same rows go)."""
    ordered = sorted(digests)
    cur.execute("DELETE FROM repo_blobs WHERE digest = ANY(%s)", (ordered,))
    cur.execute("DELETE FROM blob_sources WHERE digest = ANY(%s)", (ordered,))
    cur.execute("DELETE FROM blobs WHERE digest = ANY(%s)", (ordered,))


def _one(cur: psycopg.Cursor[Any]) -> Any:
    row = cur.fetchone()
    assert row is not None
    return row[0]


# index.py's _fill_pins, statement by statement, in PostgreSQL's spelling
_KEPT = [
    _pg(
        "INSERT OR IGNORE INTO temp.kept SELECT upstream, repo, digest FROM temp.pins"
        " WHERE digest IS NOT NULL"
    ),
    _pg(
        "INSERT OR IGNORE INTO temp.kept SELECT t.upstream, t.repo, t.digest"
        " FROM temp.pins pin CROSS JOIN tags t ON t.upstream=pin.upstream AND t.repo=pin.repo"
        " AND t.tag=pin.tag WHERE pin.digest IS NULL AND pin.tag IS NOT NULL"
    ),
    _pg(
        "INSERT OR IGNORE INTO temp.kept SELECT m.upstream, m.repo, m.digest"
        " FROM temp.pins pin CROSS JOIN manifests m"
        " ON m.upstream=pin.upstream AND m.repo=pin.repo"
        " WHERE pin.digest IS NULL AND pin.tag IS NULL"
    ),
    _pg(
        "INSERT OR IGNORE INTO temp.kept SELECT m.upstream, m.repo, m.digest"
        " FROM temp.kept k CROSS JOIN refs r ON r.manifest=k.digest AND r.kind='manifest'"
        " CROSS JOIN manifests m"
        " ON m.upstream=k.upstream AND m.repo=k.repo AND m.digest=r.child"
    ),
]

# index.py's _unkept
_FAM_ROOTS = _pg(
    "INSERT OR IGNORE INTO temp.fam SELECT m.upstream, m.repo, m.digest, 0"
    " FROM temp.roots x CROSS JOIN manifests m"
    " ON m.upstream=x.upstream AND m.repo=x.repo AND m.digest=x.digest"
)
_FAM_PLATFORMS = _pg(
    "INSERT OR IGNORE INTO temp.fam SELECT m.upstream, m.repo, m.digest, 0"
    " FROM temp.roots x CROSS JOIN refs r ON r.manifest=x.digest AND r.kind='manifest'"
    " CROSS JOIN manifests m"
    " ON m.upstream=x.upstream AND m.repo=x.repo AND m.digest=r.child"
)
_UNKEPT = _pg(
    "INSERT INTO temp.doomed SELECT f.upstream, f.repo, f.digest FROM temp.fam f"
    " WHERE NOT ("
    " (? AND EXISTS (SELECT 1 FROM tags t"
    "   WHERE t.upstream=f.upstream AND t.repo=f.repo AND t.digest=f.digest))"
    " OR EXISTS (SELECT 1 FROM refs r CROSS JOIN manifests p"
    "   ON p.upstream=f.upstream AND p.repo=f.repo AND p.digest=r.manifest"
    "   WHERE r.child=f.digest AND NOT EXISTS (SELECT 1 FROM temp.fam g"
    "     WHERE g.upstream=p.upstream AND g.repo=p.repo AND g.digest=p.digest)))"
)


#: quick work queued or running at once: past it, it fails at once
MOST_QUICK = 1024
#: how often an index that does not answer is said so in the log
_SAY_EVERY = 10.0


class SharedIndex:
    """The cluster's index as the cache reaches it (``cache.access.IndexAccess``):
    quick work on a pool of threads, heavy work on a thread of its own (it
    takes the cluster's heavy lock: one at a time is all it can use), never
    the reactor thread.

    Quick work is what requests wait for: a server that keeps its
    connections and never answers (stopped, stuck on its storage: neither
    TCP keepalives nor its statement_timeout end that) holds it no longer
    than *query_timeout*, and no more than :data:`MOST_QUICK` calls wait;
    either way the request is answered 503."""

    def __init__(
        self,
        index: PgIndex,
        quick: ThreadPool,
        heavy: ThreadPool,
        reactor: IReactor,
        query_timeout: float = 30.0,
    ) -> None:
        self._index = index
        # a piece given up is still made: it may be a write the cache relies
        # on (an uploaded object's row, or it is left out of the index)
        self._quick = Bounded(reactor, quick, MOST_QUICK, skip=False)
        self._heavy = heavy
        self._reactor = reactor
        self._query_timeout = query_timeout
        self._said = float("-inf")

    def quick(self, work: Callable[[PgIndex], T]) -> Deferred[T]:
        seconds = self._query_timeout

        def unanswered(failure: Failure) -> Failure:
            failure.trap(defer.TimeoutError, Busy, Stopped)
            if failure.check(defer.TimeoutError):
                why = f"did not answer within {seconds:g} s"
            elif failure.check(Busy):
                why = "is not keeping up"
            else:
                why = "is closed: this node stops"
            if self._reactor.seconds() - self._said >= _SAY_EVERY:  # not once a request
                self._said = self._reactor.seconds()
                log.error("the cluster's index (PostgreSQL) {why}", why=why)
            return Failure(
                RegistryError(503, "UNAVAILABLE", f"the cluster's index {why}: try again shortly")
            )

        return self._quick.run(seconds, work, self._index).addErrback(unanswered)

    def heavy(self, work: Callable[[PgIndex], T]) -> Deferred[T]:
        return deferToThreadPool(self._reactor, self._heavy, work, self._index)

    def read(self, work: Callable[[PgIndex], T]) -> Deferred[T]:
        # heavy reads run on a pool of their own: one waits for no purge
        return self.heavy(work)

    def room(self, work: Callable[[PgIndex], T]) -> Deferred[T]:
        # never asked: a shared index makes no room mid-download (inline is None)
        return self.heavy(work)

    def touch_manifest(self, upstream: str, repo: str, digest: str, when: float) -> None:
        self._index.touch_manifest(upstream, repo, digest, when)

    def touch_blob(self, digest: str, when: float) -> None:
        self._index.touch_blob(digest, when)

    def flush(self) -> Deferred[None]:
        return self.quick(PgIndex.flush)

    @property
    def inline(self) -> None:
        return None
