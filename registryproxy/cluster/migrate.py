"""``regproxy-migrate``: grow from one node.  Moves a single node's cache
(``blobs/`` and ``index.db`` in its directory) into a cluster's bucket and
PostgreSQL index.

* The source regproxy must be stopped: the migration reads a cache that
  nothing changes, and refuses one whose ``index.db`` another process has
  open.  It writes nothing there.
* Blobs go first, a page of the index at a time: each file is hashed while
  it is read and sent (one PUT, or a multipart upload completed only once
  the whole file hashed to its digest, aborted otherwise), so a rotten file
  is reported and never uploaded.  An object already in the bucket with the
  right size is left as it is, so a second run uploads nothing.  A page's
  blob rows are written only after its objects are in the bucket.
* Then the index rows, a page per transaction: manifests whose bytes are in
  the bucket (the others are left out with their tags: the next pull asks the
  upstream again), what they list, tags with the time they were last checked
  (their TTL runs on from there), and which repository may read which blob.
  Rows the cluster already has keep the cluster's values, but for the later
  access time and the later checked tag.  The writes take the index's heavy
  lock shared, as a node's writes do, so a live cluster may be running.

Memory stays bounded whatever the cache's size: the SQLite tables are read in
pages by key, a file in parts of at most ``part_size`` bytes, a few at once.

Exit status: 0 done, 1 could not (config, engines, source; one line says
why), 2 bad command line, 4 done, but rotten or missing files were left out
(the cluster fetches those blobs again when they are asked for).
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import json
import os
import sqlite3
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import attrs
import psycopg
from psycopg import errors
from psycopg_pool import PoolTimeout
from twisted.internet.defer import Deferred, DeferredList, DeferredSemaphore
from twisted.internet.task import react
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from ..admin.cli import size as human
from ..cache import index as sqlite_index
from ..cache.index import IndexUnusable
from ..config import Config, ConfigError, load_config
from ..names import ALGORITHMS, Digest
from ..runtime import IReactor
from .bucket import PART_SIZE, key
from .engineconfig import PgSettings, S3Settings
from .pg import Database, Unavailable
from .pgindex import HEAVY, TABLES, PgIndex
from .s3 import S3Error, S3Store

PROG = "regproxy-migrate"
EXIT_FAILED, EXIT_USAGE, EXIT_LEFT_OUT = 1, 2, 4

T = TypeVar("T")

#: rows read from SQLite and written to PostgreSQL at a time
PAGE = 500
#: files read and uploaded at once (each holds at most one part in memory)
PARALLEL = 4
#: transactions tried again after a deadlock with a live node's writes
_RETRIES = 5


class MigrateError(Exception):
    """The migration cannot start or go on; the message says what to do."""


@attrs.define
class Report:
    dry_run: bool = False
    #: blobs in the source's index, and their bytes
    blobs: int = 0
    blob_bytes: int = 0
    uploaded: int = 0
    uploaded_bytes: int = 0
    #: already in the bucket with the right size
    present: int = 0
    #: bytes that do not hash to their digest (or a size not the index's)
    rotten: int = 0
    #: in the index, not on disk
    missing: int = 0
    manifests: int = 0
    #: left out: their bytes are not in the bucket (rotten or missing)
    manifests_left_out: int = 0
    refs: int = 0
    tags: int = 0
    tags_left_out: int = 0
    links: int = 0
    #: which upstreams sent which blobs
    sources: int = 0
    #: files beside the index that hold no rows: what they are, what to do
    notes: list[str] = attrs.Factory(list)

    def lines(self) -> list[str]:
        would = "would be " if self.dry_run else ""
        lines = [
            f"blobs: {self.uploaded} {would}uploaded ({human(self.uploaded_bytes)}),"
            f" {self.present} already in the bucket, {self.rotten} rotten,"
            f" {self.missing} missing, of {self.blobs} ({human(self.blob_bytes)})",
        ]
        if self.dry_run:
            lines.append(
                f"index: {self.manifests} manifests, {self.tags} tags, {self.refs} refs,"
                f" {self.links} links, {self.sources} sources would be copied"
                " (less those of blobs not uploaded)"
            )
        else:
            lines.append(
                f"index: {self.manifests} manifests ({self.manifests_left_out} left out: bytes"
                f" not in the bucket), {self.tags} tags ({self.tags_left_out} left out),"
                f" {self.refs} refs, {self.links} links, {self.sources} sources copied"
            )
        return lines + self.notes


# -- the source: a stopped single node's directory ------------------------------


def blob_path(root: str, digest: Digest) -> str:
    """Where :class:`~..cache.store.FileStore` keeps *digest* under *root*
    (not opened here: opening it clears its ``tmp/``)."""
    return os.path.join(root, "blobs", digest.algorithm, digest.hex[:2], digest.hex)


def in_use(index_path: str) -> bool:
    """Whether another process has the SQLite index at *index_path* open.

    In WAL mode every SQLite connection holds a shared lock on one byte of
    the ``-shm`` file (its "DMS" byte, offset 128) for as long as it is open,
    and the last one to close removes the file; so an exclusive lock on that
    byte is refused exactly while someone has the database open.  Call this
    before opening the index in this process: closing our descriptor drops
    every POSIX lock this process holds on the file.
    """
    try:
        fd = os.open(index_path + "-shm", os.O_RDWR)
    except FileNotFoundError:
        return False
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, 128)
    except OSError as e:
        if e.errno in (errno.EAGAIN, errno.EACCES):
            return True
        raise
    finally:
        os.close(fd)
    return False


class Source:
    """The SQLite index of a stopped regproxy, read in pages, never written."""

    def __init__(self, directory: str) -> None:
        self.root = os.path.abspath(directory)
        path = os.path.join(self.root, "index.db")
        if not os.path.isfile(path):
            raise MigrateError(
                f"{self.root} has no index.db: is it a regproxy cache directory?"
                " (--from names it; the default is the config's cache.directory)"
            )
        try:
            busy = in_use(path)
        except OSError as e:
            raise MigrateError(f"cannot read {path}-shm: {e.strerror}") from None
        if busy:
            raise MigrateError(
                f"{path} is open in another process: stop the regproxy that uses"
                f" {self.root} first (the migration reads a cache nothing changes)"
            )
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        try:
            self._check(path)
        except BaseException:
            self._db.close()
            raise

    def _check(self, path: str) -> None:
        db = self._db
        try:
            db.execute("PRAGMA query_only=ON")
            problems = [row for (row,) in db.execute("PRAGMA quick_check(3)")]
            version = db.execute("PRAGMA user_version").fetchone()[0]
        except sqlite3.DatabaseError as e:
            problems, version = [str(e)], 0
        if problems != ["ok"]:
            raise MigrateError(
                f"{path} is damaged ({'; '.join(problems)}): `twistd regproxy --rebuild-index`"
                " recovers its blobs; then run the migration again"
            )
        if version != sqlite_index._VERSION:
            raise MigrateError(
                f"{path} has index schema {version}, this regproxy reads"
                f" {sqlite_index._VERSION}: start this version of regproxy on the directory"
                " once, stop it, and run the migration again"
            )

    def close(self) -> None:
        self._db.close()

    def count(self, table: str) -> int:
        return int(self._db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])

    def blob_totals(self) -> tuple[int, int]:
        count, size = self._db.execute(
            "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM blobs"
        ).fetchone()
        return int(count), int(size)

    def pages(
        self, table: str, keys: Sequence[str], columns: Sequence[str], size: int
    ) -> Iterator[list[tuple[Any, ...]]]:
        """*table*'s rows (*keys* first, then *columns*), in key order, *size*
        at a time: each page a query of its own, after the last key seen."""
        names = ", ".join([*keys, *columns])
        order = ", ".join(keys)
        after: tuple[Any, ...] | None = None
        while True:
            if after is None:
                rows = self._db.execute(
                    f"SELECT {names} FROM {table} ORDER BY {order} LIMIT ?", (size,)
                ).fetchall()
            else:
                marks = ", ".join("?" * len(keys))
                rows = self._db.execute(
                    f"SELECT {names} FROM {table} WHERE ({order}) > ({marks})"
                    f" ORDER BY {order} LIMIT ?",
                    (*after, size),
                ).fetchall()
            if rows:
                yield rows
            if len(rows) < size:
                return
            after = tuple(rows[-1][: len(keys)])

    def notes(self) -> list[str]:
        """What the directory keeps beside the index that is not migrated."""
        found = []
        for name, what in (
            ("pins.json", "pins added through the admin API"),
            ("upstreams.json", "upstreams changed through the admin API"),
        ):
            path = os.path.join(self.root, name)
            try:
                with open(path, encoding="utf-8") as f:
                    data = json.load(f)
            except (OSError, ValueError):
                continue
            if data:
                found.append(
                    f"not migrated: {path} ({what}): it is not index data; copy it into each"
                    " node's cache.directory, or move its entries into the nodes' config"
                )
        return found


# -- the index rows, in PostgreSQL's spelling -----------------------------------

#: a blob already in the cluster keeps its row, but for the later access time
_BLOBS = (
    "INSERT INTO blobs VALUES (%s, %s, %s, %s) ON CONFLICT (digest) DO UPDATE"
    " SET last_access=GREATEST(blobs.last_access, EXCLUDED.last_access)"
)
#: a manifest whose bytes are in the bucket (its blob row written before)
_MANIFESTS = (
    "INSERT INTO manifests SELECT %s, %s, %s, %s, %s::bigint, %s::double precision,"
    " %s::double precision WHERE EXISTS (SELECT 1 FROM blobs WHERE digest=%s)"
    " ON CONFLICT (upstream, repo, digest) DO UPDATE"
    " SET last_access=GREATEST(manifests.last_access, EXCLUDED.last_access)"
)
_REFS = (
    "INSERT INTO refs SELECT %s, %s, %s, %s::integer"
    " WHERE EXISTS (SELECT 1 FROM manifests WHERE digest=%s) ON CONFLICT DO NOTHING"
)
#: a tag of a manifest copied; the cluster's own, if checked later, stays
_TAGS = (
    "INSERT INTO tags SELECT %s, %s, %s, %s, %s, %s::double precision"
    " WHERE EXISTS (SELECT 1 FROM manifests WHERE upstream=%s AND repo=%s AND digest=%s)"
    " ON CONFLICT (upstream, repo, tag) DO UPDATE SET media_type=EXCLUDED.media_type,"
    " digest=EXCLUDED.digest, checked_at=EXCLUDED.checked_at"
    " WHERE tags.checked_at < EXCLUDED.checked_at"
)
_LINKS = "INSERT INTO repo_blobs VALUES (%s, %s, %s) ON CONFLICT DO NOTHING"
#: of blobs in the bucket only (the rest are left out)
_SOURCES = (
    "INSERT INTO blob_sources SELECT %s, %s"
    " WHERE EXISTS (SELECT 1 FROM blobs WHERE digest=%s) ON CONFLICT DO NOTHING"
)


# -- the migration ----------------------------------------------------------------


class _Migration:
    def __init__(
        self,
        source: Source,
        s3: S3Store,
        db: Database,
        threadpool: ThreadPool,
        reactor: IReactor,
        dry_run: bool,
        progress: Callable[[str], None],
        page: int,
        parallel: int,
        part_size: int,
    ) -> None:
        self.source = source
        self.s3 = s3
        self.db = db
        self.threadpool = threadpool
        self.reactor = reactor
        self.dry_run = dry_run
        self.say = progress
        self.page = page
        self.slots = DeferredSemaphore(parallel)
        self.part_size = part_size
        self.report = Report(dry_run=dry_run)
        self._said_at: float | None = None

    def _progress(self, line: str, last: bool) -> None:
        """A progress line, at most one a second but a table's last."""
        now = self.reactor.seconds()
        if last or self._said_at is None or now - self._said_at >= 1:
            self._said_at = now
            self.say(line)

    def _in_thread(self, fn: Callable[..., T], *args: Any) -> Deferred[T]:
        return deferToThreadPool(self.reactor, self.threadpool, fn, *args)

    async def _write(self, sql: str, rows: list[tuple[Any, ...]]) -> int:
        """*rows* through *sql* in one transaction holding the index's heavy
        lock shared (as a node's hot-path writes); the rows it changed."""

        def work(conn: psycopg.Connection[Any]) -> int:
            conn.execute("SELECT pg_advisory_xact_lock_shared(%s)", (HEAVY,))
            cur = conn.cursor()
            cur.executemany(sql, rows)  # pipelined; rowcount: the rows changed, all told
            return cur.rowcount

        for attempt in range(_RETRIES):
            try:
                return await self.db.run(work)
            except (errors.DeadlockDetected, errors.SerializationFailure):
                if attempt == _RETRIES - 1:
                    raise
        raise AssertionError("unreachable")

    # -- blobs --------------------------------------------------------------

    async def blobs(self) -> None:
        report = self.report
        report.blobs, report.blob_bytes = self.source.blob_totals()
        self.say(f"{report.blobs} blobs ({human(report.blob_bytes)}) in {self.source.root}")
        done = 0
        for rows in self.source.pages(
            "blobs", ["digest"], ["size", "stored_at", "last_access"], self.page
        ):
            results = await DeferredList(
                [self.slots.run(self._blob_task, row) for row in rows], consumeErrors=True
            )
            # every file of the page is done (none left uploading) before a
            # failure stops the migration
            for _, result in results:
                if isinstance(result, Failure):
                    result.raiseException()
            stored = [row for row, (_, there) in zip(rows, results, strict=True) if there is True]
            if stored and not self.dry_run:
                await self._write(_BLOBS, stored)
            done += len(rows)
            self._progress(
                f"blobs: {done}/{report.blobs}: {report.uploaded} uploaded"
                f" ({human(report.uploaded_bytes)}), {report.present} already there,"
                f" {report.rotten} rotten, {report.missing} missing",
                last=done == report.blobs,
            )

    def _blob_task(self, row: tuple[Any, ...]) -> Deferred[bool]:
        return Deferred.fromCoroutine(self._blob(row))

    async def _blob(self, row: tuple[Any, ...]) -> bool:
        """Put one blob in the bucket, unless there; whether it is there now
        (or would be, in a dry run)."""
        text, size = row[0], row[1]
        try:
            digest = Digest.parse(text)
            if digest.algorithm not in ALGORITHMS:
                raise ValueError(text)
        except ValueError:
            self.report.rotten += 1
            self.say(f"skipped {text!r}: not a digest regproxy can check")
            return False
        if await self.s3.head(key(digest)) == size:
            self.report.present += 1
            return True
        problem = await self._upload(digest, blob_path(self.source.root, digest), size)
        if problem is None:
            self.report.uploaded += 1
            self.report.uploaded_bytes += size
            return True
        if problem == "missing":
            self.report.missing += 1
            self.say(f"skipped {text}: its file is missing")
        else:
            self.report.rotten += 1
            self.say(f"skipped {text}: rotten ({problem}); not uploaded")
        return False

    async def _upload(self, digest: Digest, path: str, size: int) -> str | None:
        """Send the file at *path* as *digest*'s object, hashing it as it is
        read; None if it went (or would go) up, else what is wrong with it.
        An object appears only if every byte checked out: a file up to
        ``part_size`` goes in one PUT after it is hashed, a larger one as a
        multipart upload completed after the last part is hashed."""
        try:
            f = open(path, "rb")
        except FileNotFoundError:
            return "missing"
        with f:
            on_disk = os.fstat(f.fileno()).st_size
            if on_disk != size:
                return f"{on_disk} bytes on disk, the index says {size}"
            hasher = digest.hasher()

            def part(n: int) -> bytes:
                data = f.read(n)
                hasher.update(data)
                return data

            def wrong(read: int) -> str | None:
                if read != size:
                    return f"read {read} bytes, the index says {size}"
                actual = hasher.hexdigest()
                return None if actual == digest.hex else f"its bytes hash to {actual}"

            name = key(digest)
            if size <= self.part_size:
                data = await self._in_thread(part, size)
                problem = wrong(len(data))
                if problem is None and not self.dry_run:
                    await self.s3.put(name, data)
                return problem
            upload = None if self.dry_run else await self.s3.start_upload(name)
            try:
                read = 0
                while read < size:
                    data = await self._in_thread(part, min(self.part_size, size - read))
                    if not data:
                        break
                    read += len(data)
                    if upload is not None:
                        await upload.upload_part(data)
                    del data
                problem = wrong(read)
                if upload is not None:
                    if problem is None:
                        await upload.complete()
                    else:
                        await upload.abort()
                return problem
            except BaseException:
                if upload is not None:
                    await upload.abort()
                raise

    # -- index rows ------------------------------------------------------------

    async def rows(self) -> None:
        report = self.report
        if self.dry_run:
            report.manifests = self.source.count("manifests")
            report.refs = self.source.count("refs")
            report.tags = self.source.count("tags")
            report.links = self.source.count("repo_blobs")
            report.sources = self.source.count("blob_sources")
            return
        tables: list[
            tuple[str, list[str], list[str], str, Callable[[tuple[Any, ...]], tuple[Any, ...]]]
        ] = [
            (
                "manifests",
                ["upstream", "repo", "digest"],
                ["media_type", "size", "fetched_at", "last_access"],
                _MANIFESTS,
                lambda r: (*r, r[2]),
            ),
            ("refs", ["manifest", "child"], ["kind", "position"], _REFS, lambda r: (*r, r[0])),
            (
                "tags",
                ["upstream", "repo", "tag"],
                ["media_type", "digest", "checked_at"],
                _TAGS,
                lambda r: (*r, r[0], r[1], r[4]),
            ),
            ("repo_blobs", ["upstream", "repo", "digest"], [], _LINKS, lambda r: r),
            ("blob_sources", ["digest", "upstream"], [], _SOURCES, lambda r: (*r, r[0])),
        ]
        for table, keys, columns, sql, args in tables:
            total, read, copied = self.source.count(table), 0, 0
            for rows in self.source.pages(table, keys, columns, self.page):
                copied += await self._write(sql, [args(r) for r in rows])
                read += len(rows)
                self._progress(f"{table}: {read}/{total}", last=read == total)
            if table == "manifests":
                report.manifests, report.manifests_left_out = copied, read - copied
            elif table == "refs":
                report.refs = copied
            elif table == "tags":
                report.tags, report.tags_left_out = copied, read - copied
            elif table == "repo_blobs":
                report.links = copied
            else:
                report.sources = copied
        await self.db.run(lambda conn: [conn.execute(f"ANALYZE {t}") for t in TABLES])


async def migrate(
    source: str,
    s3: S3Settings,
    pg: PgSettings,
    *,
    threadpool: ThreadPool,
    reactor: IReactor,
    dry_run: bool = False,
    progress: Callable[[str], None] = lambda line: None,
    page: int = PAGE,
    parallel: int = PARALLEL,
    part_size: int = PART_SIZE,
) -> Report:
    """Move the stopped single node's cache in the directory *source* into
    the bucket of *s3* and the index in *pg*; what was done.  With
    *dry_run*, read everything (hashing the files that would go up) and
    write nothing anywhere.  Raises :class:`MigrateError` (with what to do)
    if it cannot start or go on; run it again then: what is done stays done.
    *threadpool* (started by the caller) runs the S3, PostgreSQL and file
    work, and should have at least ``pg.max_size`` + 2 * *parallel* threads.
    """
    src = Source(source)
    db = Database(pg, threadpool, reactor)
    store = S3Store(s3, threadpool, reactor)
    try:
        try:
            await db.open()
        except Unavailable as e:
            raise MigrateError(str(e)) from None
        try:
            await _prepare(store, db, threadpool, reactor, dry_run)
            work = _Migration(
                src, store, db, threadpool, reactor, dry_run, progress, page, parallel, part_size
            )
            await work.blobs()
            await work.rows()
        except S3Error as e:
            raise MigrateError(
                f"the bucket {s3.bucket!r} at {s3.endpoint or 'AWS S3'}: {e};"
                " run the migration again when it answers (what is done stays done)"
            ) from None
        except (psycopg.Error, PoolTimeout) as e:
            raise MigrateError(
                f"PostgreSQL: {e}; run the migration again when it answers (what is done"
                " stays done)"
            ) from None
        work.report.notes.extend(src.notes())
        return work.report
    finally:
        src.close()
        await db.close()


async def _prepare(
    store: S3Store, db: Database, threadpool: ThreadPool, reactor: IReactor, dry_run: bool
) -> None:
    """The bucket and the index's tables, made if missing (a dry run only
    checks that both answer)."""
    if dry_run:
        try:
            await store.list_page("blobs/", limit=1)
        except S3Error as e:
            if e.code != "NoSuchBucket":
                raise
        return
    await store.ensure_bucket()
    try:
        await deferToThreadPool(reactor, threadpool, PgIndex(db).open)
    except IndexUnusable as e:
        raise MigrateError(str(e)) from None


# -- the command -----------------------------------------------------------------


def cluster_settings(config: Config) -> tuple[S3Settings, PgSettings]:
    """The bucket and the database of a cluster node's config."""
    s3 = config.cache.storage.s3
    pg = config.cache.index.postgresql
    missing = [
        name
        for name, value in (("cache.storage.s3", s3), ("cache.index.postgresql", pg))
        if value is None
    ]
    if missing:
        raise MigrateError(
            f"{' and '.join(missing)} not set: give the config of a cluster node"
            " (README: Running a cluster)"
        )
    assert s3 is not None and pg is not None
    return s3, pg


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Move a stopped single regproxy's cache into a cluster's bucket and"
        " PostgreSQL index (blobs verified on the way; safe to run again).",
    )
    parser.add_argument("--config", required=True, help="a cluster node's regproxy.yaml")
    parser.add_argument(
        "--from",
        dest="source",
        metavar="DIR",
        help="the single node's cache directory (default: the config's cache.directory)",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="read and hash everything, say what would be done, write nothing",
    )
    parser.add_argument(
        "--parallel", type=int, default=PARALLEL, help=f"files uploaded at once ({PARALLEL})"
    )
    return parser


def _say(line: str) -> None:
    print(f"{PROG}: {line}", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, or a usage error argparse printed
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    if args.parallel < 1:
        _say("--parallel: at least 1")
        return EXIT_USAGE
    try:
        config = load_config(args.config)
        s3, pg = cluster_settings(config)
    except (ConfigError, MigrateError) as e:
        _say(str(e))
        return EXIT_FAILED
    source = args.source or config.cache.directory

    async def run(reactor: IReactor) -> None:
        threadpool = ThreadPool(0, pg.max_size + 2 * args.parallel, name=PROG)
        threadpool.start()
        try:
            report = await migrate(
                source,
                s3,
                pg,
                threadpool=threadpool,
                reactor=reactor,
                dry_run=args.dry_run,
                progress=_say,
                parallel=args.parallel,
            )
        except MigrateError as e:
            _say(str(e))
            raise SystemExit(EXIT_FAILED) from None
        finally:
            threadpool.stop()
        _say("dry run, nothing written:" if args.dry_run else "done:")
        for line in report.lines():
            _say(f"  {line}")
        if report.rotten or report.missing:
            raise SystemExit(EXIT_LEFT_OUT)

    try:
        react(lambda r: Deferred.fromCoroutine(run(r)), [])
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else EXIT_FAILED
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
