"""The index in PostgreSQL answers as the SQLite one, and holds up with
several nodes writing, purging and evicting at once.

Every PgIndex call runs in a worker thread (``in_thread``), as in regproxy.
"""

from __future__ import annotations

import collections
import random
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import psycopg
import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadable import isInIOThread
from twisted.python.threadpool import ThreadPool

from registryproxy.cache.index import Index, IndexUnusable, ManifestEntry, Page, TagEntry
from registryproxy.cluster import pgindex
from registryproxy.cluster.pgindex import PgIndex, SharedIndex

pytestmark = pytest.mark.cluster

T = TypeVar("T")


async def in_thread(threadpool: ThreadPool, fn: Callable[[], T]) -> T:
    return await deferToThreadPool(reactor, threadpool, fn)


async def pg_index(make_database: Any, **settings: Any) -> PgIndex:
    """A PgIndex on a Database of its own (a node); call ``open()`` in a thread."""
    return PgIndex(await make_database(**settings))


# -- the differential test ----------------------------------------------------

UPSTREAMS = ["docker.io", "ghcr.io"]
REPOS = ["library/a", "library/b", "c"]
TAGS = ["1", "2", "latest"]
BLOBS = [f"sha256:b{i:02}" for i in range(16)]
#: m00-m03 are indexes listing platform manifests among m04-m11 (and maybe a blob)
MANIFESTS = [f"sha256:m{i:02}" for i in range(12)]
INDEX_TYPE = "application/vnd.oci.image.index.v1+json"
MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"


class Differ:
    """One seeded random sequence of operations on both indexes, every
    answer compared; the log of operations in the failure message."""

    def __init__(self, seed: int, sqlite: Index, pg: PgIndex) -> None:
        self.rng = random.Random(seed)
        self.seed = seed
        self.sqlite, self.pg = sqlite, pg
        self.clock = 1000.0
        self.log: list[str] = []
        #: how much the sequence did (that it is worth comparing)
        self.stats: collections.Counter[str] = collections.Counter()
        rng = self.rng
        # content by digest never changes: each manifest lists the same things
        self.listed: dict[str, list[tuple[str, str]]] = {}
        for i, digest in enumerate(MANIFESTS):
            if i < 4:
                children = rng.sample(MANIFESTS[4:], rng.randint(1, 3))
                refs = [(c, "manifest") for c in children]
                if rng.random() < 0.3:
                    refs.append((rng.choice(BLOBS), "blob"))
            else:
                layers = rng.sample(BLOBS, rng.randint(1, 4))
                if rng.random() < 0.2:
                    layers.append(layers[0])  # a layer listed twice
                refs = [(b, "blob") for b in layers]
            self.listed[digest] = refs
        self.sizes = {d: rng.randint(1, 1000) for d in BLOBS + MANIFESTS}

    def now(self) -> float:
        # every time distinct: ties in LRU order are unspecified
        self.clock += 1.0 + self.rng.random()
        return self.clock

    def call(self, method: str, *args: Any, normalize: Callable[[Any], Any] = lambda x: x) -> Any:
        """``method(*args)`` on both indexes, the answers compared."""
        shown = ", ".join(repr(a) for a in args)
        return self.same(
            f"{method}({shown})", lambda ix: getattr(ix, method)(*args), normalize=normalize
        )

    def same(
        self, what: str, call: Callable[[Any], T], normalize: Callable[[T], Any] = lambda x: x
    ) -> T:
        self.log.append(what)
        expected = call(self.sqlite)
        got = call(self.pg)
        if normalize(expected) != normalize(got):
            ops = "\n".join(f"  {i}: {op}" for i, op in enumerate(self.log))
            raise AssertionError(
                f"seed {self.seed}, operation {len(self.log) - 1}: {what}\n"
                f"  sqlite:   {expected!r}\n  postgres: {got!r}\noperations:\n{ops}"
            )
        return expected

    def key(self) -> tuple[str, str]:
        return self.rng.choice(UPSTREAMS), self.rng.choice(REPOS)

    def cached(self, upstream: str, repo: str) -> list[str]:
        return [m.digest for m in self.sqlite.repo_manifests(upstream, repo)]

    def step(self) -> None:
        rng = self.rng
        op = rng.choices(
            [
                self.put_manifest,
                self.put_tag,
                self.put_blob,
                self.link,
                self.touch,
                self.purge,
                self.evict,
                self.evict_loose,
                self.forget,
                self.read,
            ],
            weights=[12, 12, 8, 4, 8, 8, 8, 3, 2, 12],
        )[0]
        op()

    def put_manifest(self) -> None:
        upstream, repo = self.key()
        digest = self.rng.choice(MANIFESTS)
        kind = INDEX_TYPE if digest < MANIFESTS[4] else MANIFEST_TYPE
        entry = ManifestEntry(digest, kind, self.sizes[digest])
        listed = self.listed[digest]
        # sometimes written ahead, as a manifest listing many is (and
        # sometimes not all ahead: as if a purge took some meanwhile)
        ahead = self.rng.randrange(len(listed) + 1) if self.rng.random() < 0.3 else 0
        if ahead:
            written = ahead if self.rng.random() < 0.7 else self.rng.randrange(ahead)
            self.call("put_refs", upstream, repo, digest, listed[:written], 0)
        self.call("put_manifest", upstream, repo, entry, self.now(), listed, ahead)
        if kind == INDEX_TYPE and self.rng.random() < 0.7:
            # a pull of an index caches its platform manifests too, mostly
            for child, what in self.listed[digest]:
                if what == "manifest" and self.rng.random() < 0.8:
                    entry = ManifestEntry(child, MANIFEST_TYPE, self.sizes[child])
                    self.call("put_manifest", upstream, repo, entry, self.now(), self.listed[child])
        if self.rng.random() < 0.5:
            self.call("put_blob", digest, self.sizes[digest], self.now())

    def put_tag(self) -> None:
        upstream, repo = self.key()
        tag = self.rng.choice(TAGS)
        cached = self.cached(upstream, repo)
        if not cached or self.rng.random() < 0.1:
            # PgIndex's one difference: no tag for a manifest not cached there
            digest = self.rng.choice(MANIFESTS)
            if digest in cached:
                return
            entry = TagEntry(digest, MANIFEST_TYPE, self.now())
            self.log.append(f"postgres only: put_tag({upstream!r}, {repo!r}, {tag!r}, {entry!r})")
            before = self.pg.tag(upstream, repo, tag)
            self.pg.put_tag(upstream, repo, tag, entry)
            assert self.pg.tag(upstream, repo, tag) == before, self.log[-1]
            return
        tagged = [t.digest for t in self.sqlite.repo_tags(upstream, repo)]
        if tagged and self.rng.random() < 0.4:
            # a second tag for a manifest already tagged
            cached = [d for d in tagged if d in cached] or cached
        entry = TagEntry(self.rng.choice(cached), MANIFEST_TYPE, self.now())
        self.call("put_tag", upstream, repo, tag, entry)

    def put_blob(self) -> None:
        rng = self.rng
        if rng.random() < 0.7:
            digest = rng.choice(BLOBS)
            self.call("put_blob", digest, self.sizes[digest], self.now())
        else:
            at = self.now()
            rows = [(d, self.sizes[d], at) for d in rng.sample(BLOBS, rng.randint(0, 5))]
            self.call("put_blobs", rows)

    def link(self) -> None:
        upstream, repo = self.key()
        self.call("link_blobs", upstream, repo, self.rng.sample(BLOBS, self.rng.randint(0, 3)))

    def touch(self) -> None:
        rng = self.rng
        for _ in range(rng.randint(1, 4)):
            if rng.random() < 0.5:
                upstream, repo = self.key()
                cached = self.cached(upstream, repo)
                digest = rng.choice(cached) if cached and rng.random() < 0.9 else MANIFESTS[0]
                self.call("touch_manifest", upstream, repo, digest, self.now())
            else:
                self.call("touch_blob", rng.choice(BLOBS + MANIFESTS), self.now())
        if rng.random() < 0.5:
            self.call("flush")

    def purge(self) -> None:
        rng = self.rng
        upstream, repo = self.key()
        cached = self.cached(upstream, repo)
        kwargs: dict[str, Any] = {"batch": rng.randint(1, 4)}
        kind = rng.choice([0, 1, 2, 3, 3, 3, 4, 4, 5, 6, 7])
        if kind == 0:
            # everything: now and then, or the index stays nearly empty
            if rng.random() < 0.7:
                kwargs["upstream"] = upstream
        elif kind == 1:
            kwargs["upstream"] = upstream
        elif kind == 2:
            kwargs.update(upstream=upstream, repo=repo)
        elif kind == 3:
            kwargs.update(upstream=upstream, repo=repo, tag=rng.choice(TAGS))
        elif kind == 4:
            digest = rng.choice(cached) if cached else rng.choice(MANIFESTS)
            kwargs.update(upstream=upstream, repo=repo, digest=digest)
        elif kind == 5:
            # as fsck: a rotten manifest, wherever it is cached
            kwargs["digest"] = rng.choice(MANIFESTS)
        elif kind == 6:
            kwargs["fetched_before"] = self.clock - rng.uniform(0, 60)
            if rng.random() < 0.5:
                kwargs["upstream"] = upstream
        else:
            kwargs["unused_since"] = self.clock - rng.uniform(0, 60)
        removed = self.same(f"purge(**{kwargs!r})", lambda ix: ix.purge(**kwargs))
        self.stats["purged"] += removed.manifests

    def pins(self) -> list[tuple[str, str, str | None, str | None]]:
        rng = self.rng
        pins: list[tuple[str, str, str | None, str | None]] = []
        for _ in range(rng.randint(0, 3)):
            upstream, repo = self.key()
            kind = rng.randrange(3)
            if kind == 0:
                pins.append((upstream, repo, None, None))
            elif kind == 1:
                pins.append((upstream, repo, rng.choice(TAGS), None))
            else:
                pins.append((upstream, repo, None, rng.choice(MANIFESTS)))
        return pins

    def evict(self) -> None:
        rng = self.rng
        pins = self.pins()
        busy = rng.sample(BLOBS, rng.randint(0, 3))
        limit = rng.randint(1, 6)
        used_before = self.clock - rng.uniform(0, 80) if rng.random() < 0.3 else None
        excess: float | None = None
        if rng.random() < 0.5:
            excess = rng.uniform(-10, self.sqlite.total_size() * 0.7)
        evicted = self.call("evict", pins, busy, limit, used_before, excess)
        self.stats["evicted"] += len(evicted.images)
        self.stats["evicted more"] += evicted.more

    def evict_loose(self) -> None:
        rng = self.rng
        busy = rng.sample(BLOBS, rng.randint(0, 3))
        loose = self.call("evict_loose", busy, rng.uniform(0, 3000), rng.randint(1, 5))
        self.stats["loose"] += len(loose)

    def forget(self) -> None:
        rng = self.rng
        if rng.random() < 0.5:
            self.call("forget_blob", rng.choice(BLOBS))
        else:
            self.call("forget_blobs", rng.sample(BLOBS, rng.randint(0, 3)))

    def read(self) -> None:
        rng = self.rng
        upstream, repo = self.key()
        kind = rng.randrange(12)
        if kind == 0:
            self.call("manifest", upstream, repo, rng.choice(MANIFESTS))
        elif kind == 1:
            self.call("tag", upstream, repo, rng.choice(TAGS))
        elif kind == 2:
            self.call("has_blob", upstream, repo, rng.choice(BLOBS + MANIFESTS))
        elif kind == 3:
            self.call("blob_sizes", rng.sample(BLOBS + MANIFESTS, 8))
        elif kind == 4:
            self.call("total_size")
        elif kind == 5:
            self.call("totals")
        elif kind == 6:
            self.call("repository_summaries")
        elif kind == 7:
            self.call("repository_summaries", upstream)
            self.call("repository_summaries", rng.choice([None, upstream]), self.page())
        elif kind == 8:
            self.call("repo_manifests", upstream, repo)
            self.call("repository_refs", upstream, repo)
        elif kind == 9:
            self.call("repo_tags", upstream, repo)
        elif kind == 10:
            self.call("refs", rng.choice(MANIFESTS))
        else:
            self.call("blob_sizes", rng.sample(BLOBS + MANIFESTS, 5))

    def page(self) -> Page:
        """A page of the listing: by name after a key, or by size; narrowed
        by a substring (LIKE's wildcards, case) or not; cut or not."""
        rng = self.rng
        return Page(
            contains=rng.choice([None, "a", "LIB", "y/c", "_", "%", "\\", "io/library/"]),
            after=rng.choice([None, (rng.choice(UPSTREAMS), rng.choice(REPOS))]),
            by_size=rng.random() < 0.5,
            limit=rng.choice([None, 1, 2, 4]),
        )

    def tables(self) -> None:
        """Every row of every table, compared: what no call shows yet (a
        blob's access time) must agree too."""
        for table in TABLES:
            self.log.append(f"(the rows of {table})")
            expected = sorted(self.sqlite._db.execute(f"SELECT * FROM {table}").fetchall())
            with self.pg._database.transaction() as conn:
                got = sorted(conn.execute(f"SELECT * FROM {table}").fetchall())
            if expected != got:
                ops = "\n".join(f"  {i}: {op}" for i, op in enumerate(self.log))
                raise AssertionError(
                    f"seed {self.seed}, after operation {len(self.log) - 2}: {table} differs\n"
                    f"  only sqlite:   {sorted(set(expected) - set(got))!r}\n"
                    f"  only postgres: {sorted(set(got) - set(expected))!r}\n"
                    f"operations:\n{ops}"
                )

    def final(self) -> None:
        """Everything that can be listed, compared."""
        for method in ("flush", "totals", "repository_summaries"):
            self.call(method)
        for _ in range(20):
            self.call("repository_summaries", self.rng.choice([None, *UPSTREAMS]), self.page())
        for upstream in UPSTREAMS:
            for repo in REPOS:
                self.call("repo_manifests", upstream, repo)
                self.call("repo_tags", upstream, repo)
                self.call("repository_refs", upstream, repo)
                for blob in BLOBS:
                    self.call("has_blob", upstream, repo, blob)
        for digest in MANIFESTS:
            self.call("refs", digest)
        self.call("blob_sizes", BLOBS + MANIFESTS)
        self.call("blobs_after", "", 50)
        self.call("blobs_after", "sha256:8", 10)
        self.tables()


TABLES = ["manifests", "tags", "refs", "blobs", "repo_blobs", "blob_sources"]


def _empty(pg: PgIndex) -> None:
    """Empty the tables between seeds (one database for the test)."""
    with pg._database.transaction() as conn:
        conn.execute("TRUNCATE manifests, tags, refs, blobs, repo_blobs, blob_sources")


SEEDS = list(range(1, 9))
STEPS = 300


@pytest_twisted.ensureDeferred
async def test_postgres_answers_as_sqlite(make_database, threadpool, tmp_path: Path):
    pg = await pg_index(make_database)

    def run() -> int:
        pg.open()
        compared = 0
        for seed in SEEDS:
            _empty(pg)
            sqlite = Index(str(tmp_path / f"index-{seed}.db"))
            try:
                differ = Differ(seed, sqlite, pg)
                for step in range(STEPS):
                    differ.step()
                    if step % 25 == 24:
                        differ.tables()
                differ.final()
                compared += len(differ.log)
                print(f"seed {seed}: {len(differ.log)} calls compared, {dict(differ.stats)}")
                # the sequence did something worth comparing
                assert differ.stats["evicted"] and differ.stats["purged"], differ.stats
            finally:
                sqlite.close()
        return compared

    compared = await in_thread(threadpool, run)
    assert compared > len(SEEDS) * STEPS


# -- what differs on purpose --------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_access_times_never_go_back_and_tags_need_their_manifest(make_database, threadpool):
    one = await pg_index(make_database)
    two = PgIndex(one._database)

    def run() -> None:
        one.open()
        entry = ManifestEntry("sha256:m", MANIFEST_TYPE, 10)
        one.put_manifest("u", "r", entry, 100.0, [("sha256:b", "blob")])
        one.put_blob("sha256:b", 5, 100.0)
        # node one saw a pull at 300, node two (whose batch is older) at 200
        one.touch_manifest("u", "r", "sha256:m", 300.0)
        one.touch_blob("sha256:b", 300.0)
        two.touch_manifest("u", "r", "sha256:m", 200.0)
        two.touch_blob("sha256:b", 200.0)
        one.flush()
        two.flush()
        assert [m.last_access for m in one.repo_manifests("u", "r")] == [300.0]
        assert one.evict_loose([], 1e9) == []  # listed: not loose
        one.put_tag("u", "r", "1", TagEntry("sha256:m", MANIFEST_TYPE, 1.0))
        one.put_tag("u", "other", "1", TagEntry("sha256:m", MANIFEST_TYPE, 1.0))
        assert one.tag("u", "r", "1") is not None
        assert one.tag("u", "other", "1") is None
        assert one.companion() is one
        assert one.checkpoint() == (0, 0, 0)
        one.autocheckpoint(0)

    await in_thread(threadpool, run)
    # and never on the reactor thread
    with pytest.raises(RuntimeError, match="reactor thread"):
        one.tag("u", "r", "1")


@pytest_twisted.ensureDeferred
async def test_what_the_index_forgets_is_listed_to_reclaim_until_deleted(make_database, threadpool):
    """(index.py's reclaim list: a node that dies between forgetting blobs
    and deleting their objects leaves them there for the next sweep.)"""
    index = await pg_index(make_database)

    def run() -> None:
        index.open()
        index.put_blob("sha256:m", 10, 100.0)
        index.put_manifest(
            "u", "r", ManifestEntry("sha256:m", MANIFEST_TYPE, 10), 100.0, [("sha256:b", "blob")]
        )
        index.put_blob("sha256:b", 5, 100.0)
        removed = index.purge("u", "r")
        listed = index.to_reclaim("", 10)
        assert sorted(d for d, _ in removed.blobs) == listed == ["sha256:b", "sha256:m"]
        index.reclaimed(["sha256:b"])
        assert index.to_reclaim("", 10) == ["sha256:m"]
        assert index.to_reclaim("sha256:m", 10) == []
        # a database made before the list, at the same schema version, gets it
        index._write(lambda conn: conn.execute("DROP TABLE reclaim"), lock=None)
        index.open()
        assert index.to_reclaim("", 10) == []

    await in_thread(threadpool, run)


# -- the schema ----------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_nodes_starting_at_once_create_the_schema_once(make_database, threadpool):
    databases = [await make_database(min_size=0, max_size=2) for _ in range(3)]

    def run() -> list[BaseException]:
        failures: list[BaseException] = []
        start = threading.Barrier(6)

        def node(db: Any) -> None:
            start.wait()
            try:
                PgIndex(db).open()
            except BaseException as e:  # reported below
                failures.append(e)

        threads = [threading.Thread(target=node, args=(databases[i % 3],)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        return failures

    assert await in_thread(threadpool, run) == []
    index = PgIndex(databases[0])

    def check() -> None:
        index.open()  # and again: nothing to do
        # a schema 1 index gains repo_blobs' (digest, upstream) index, and
        # blob_sources from the links of stored blobs (schema 3)
        with index._database.transaction() as conn:
            conn.execute("DROP INDEX repo_blobs_digest_upstream")
            conn.execute("CREATE INDEX repo_blobs_digest ON repo_blobs (digest)")
            conn.execute("DROP TABLE blob_sources")
            conn.execute(
                "INSERT INTO blobs VALUES ('sha256:b', 1, 1.0, NULL), ('sha256:c', 1, 1.0, NULL)"
            )
            # c: one upstream's; b: two upstreams' (one may only list it)
            conn.execute(
                "INSERT INTO repo_blobs VALUES ('u', 'r1', 'sha256:c'), ('u', 'r2', 'sha256:c'),"
                " ('u', 'r', 'sha256:b'), ('v', 'r', 'sha256:b'), ('u', 'r', 'sha256:unstored')"
            )
            conn.execute("COMMENT ON TABLE manifests IS 'regproxy index schema 1'")
        index.open()
        with index._database.transaction() as conn:
            rows = conn.execute("SELECT * FROM blob_sources ORDER BY 1, 2").fetchall()
            assert rows == [("sha256:c", "u")]
        assert index.blob_known("u", "r3", "sha256:c") == "upstream"
        assert index.blob_known("v", "r", "sha256:b") is None
        assert index.blob_known("u", "r", "sha256:unstored") is None
        with index._database.transaction() as conn:
            indexes = {
                name
                for (name,) in conn.execute(
                    "SELECT indexname FROM pg_indexes WHERE tablename='repo_blobs'"
                ).fetchall()
            }
            assert {"repo_blobs_digest_upstream"} <= indexes
            assert "repo_blobs_digest" not in indexes
        with index._database.transaction() as conn:
            row = conn.execute(
                "SELECT obj_description('manifests'::regclass, 'pg_class')"
            ).fetchone()
            assert row == (f"regproxy index schema {pgindex.VERSION}",)
            conn.execute("COMMENT ON TABLE manifests IS 'regproxy index schema 99'")
        with pytest.raises(IndexUnusable, match="newer regproxy"):
            index.open()
        with index._database.transaction() as conn:
            conn.execute("DROP TABLE manifests")
            conn.execute("CREATE TABLE manifests (name TEXT)")
        with pytest.raises(IndexUnusable, match="did not make"):
            index.open()

    await in_thread(threadpool, check)


@pytest_twisted.ensureDeferred
async def test_the_indexes_serve_the_queries(make_database, threadpool):
    """EXPLAIN on a few thousand rows: the lookups by key and the heavy
    queries' probes use the indexes, not sequential scans."""
    index = await pg_index(make_database)

    def run() -> None:
        index.open()
        rng = random.Random(7)
        blobs = [(f"sha256:{i:06}", rng.randint(1, 10**6), float(i)) for i in range(4000)]
        index.put_blobs(blobs)
        for i in range(2000):
            refs = [(blobs[(i * 3 + k) % 4000][0], "blob") for k in range(3)]
            entry = ManifestEntry(f"sha256:m{i:06}", MANIFEST_TYPE, 5)
            index.put_manifest("u", f"r{i % 50}", entry, i, refs)
            index.put_tag("u", f"r{i % 50}", f"t{i}", TagEntry(entry.digest, MANIFEST_TYPE, i))
        with index._database.transaction() as conn:
            conn.execute("ANALYZE")
            for sql, wanted in [
                ("SELECT 1 FROM refs WHERE child='sha256:000001'", "refs_child"),
                ("SELECT 1 FROM manifests WHERE digest='sha256:m000001'", "manifests_digest"),
                (
                    "SELECT digest FROM manifests ORDER BY COALESCE(last_access, fetched_at),"
                    " fetched_at LIMIT 10",
                    "manifests_used",
                ),
                (
                    "SELECT digest FROM blobs ORDER BY COALESCE(last_access, stored_at), digest"
                    " LIMIT 10",
                    "blobs_used",
                ),
                (
                    "SELECT 1 FROM repo_blobs WHERE digest='sha256:000001' AND upstream='u'",
                    "repo_blobs_digest_upstream",
                ),
                (
                    "SELECT 1 FROM tags WHERE upstream='u' AND repo='r1'"
                    " AND digest='sha256:m000001'",
                    "tags_digest",
                ),
            ]:
                shown = "\n".join(row[0] for row in conn.execute("EXPLAIN " + sql).fetchall())
                assert wanted in shown, f"{sql}\n{shown}"

    await in_thread(threadpool, run)


# -- several nodes at once -----------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_writes_and_heavy_work_wait_for_another_nodes_heavy_transaction(
    make_database, threadpool, pg_dsn
):
    """While another node is inside a purge's or an eviction's transaction
    (it holds the heavy lock), this node's writes and heavy work wait for
    it to end, and its reads go on."""
    index = await pg_index(make_database)

    def run() -> None:
        index.open()
        entry = ManifestEntry("sha256:m", MANIFEST_TYPE, 10)
        index.put_manifest("u", "r", entry, 1.0, [("sha256:b", "blob")])
        calls: list[Callable[[], object]] = [
            lambda: index.put_tag("u", "r", "1", TagEntry("sha256:m", MANIFEST_TYPE, 2.0)),
            lambda: index.put_blob("sha256:b", 5, 3.0),
            lambda: index.link_blobs("u", "other", ["sha256:b"]),
            lambda: index.evict_loose([], 1e9),
            lambda: index.purge("u", "gone"),
        ]
        with psycopg.connect(pg_dsn) as other:
            other.execute("SELECT pg_advisory_xact_lock(%s)", (pgindex.HEAVY,))
            done = [threading.Event() for _ in calls]

            def call(i: int) -> None:
                calls[i]()
                done[i].set()

            threads = [threading.Thread(target=call, args=(i,)) for i in range(len(calls))]
            for t in threads:
                t.start()
            assert index.manifest("u", "r", "sha256:m") == entry
            assert index.totals()["manifests"] == 1
            time.sleep(0.5)
            assert not any(d.is_set() for d in done)
            other.commit()
            for t in threads:
                t.join(10)
            assert all(d.is_set() for d in done)
        assert index.tag("u", "r", "1") is not None
        assert index.has_blob("u", "other", "sha256:b")

    await in_thread(threadpool, run)


@pytest_twisted.ensureDeferred
async def test_heavy_work_does_not_queue_the_writes_behind_a_vanished_node(
    make_database, threadpool, pg_dsn, monkeypatch
):
    """A node that vanished inside a write holds the heavy lock's shared
    side.  Heavy work waiting for the exclusive side would queue every
    node's writes behind it: it waits a moment, tries again a few times,
    then fails, and the writes go on.  The pool's sessions are set up so
    that the server ends such a transaction and probes silent peers."""
    monkeypatch.setattr(pgindex, "EXCLUSIVE_WAIT_MS", 100)
    index = await pg_index(make_database)

    def run() -> None:
        index.open()
        entry = ManifestEntry("sha256:m", MANIFEST_TYPE, 10)
        index.put_manifest("u", "r", entry, 1.0, [("sha256:b", "blob")])
        with index._database.connection() as conn:
            settings = {
                name: conn.execute(f"SHOW {name}").fetchone()[0]  # type: ignore[index]
                for name in (
                    "idle_in_transaction_session_timeout",
                    "statement_timeout",
                    "tcp_keepalives_idle",
                )
            }
        assert settings == {
            "idle_in_transaction_session_timeout": "30s",
            "statement_timeout": "2min",
            "tcp_keepalives_idle": "10",
        }
        with psycopg.connect(pg_dsn) as vanished:
            vanished.execute("SELECT pg_advisory_xact_lock_shared(%s)", (pgindex.HEAVY,))
            began = time.monotonic()
            with pytest.raises(psycopg.errors.LockNotAvailable):
                index.purge("u", "gone")
            assert time.monotonic() - began < 5
            # and the writes go on beside the vanished one
            index.put_tag("u", "r", "1", TagEntry("sha256:m", MANIFEST_TYPE, 2.0))
        assert index.tag("u", "r", "1") is not None

    await in_thread(threadpool, run)


def _invariants(index: PgIndex) -> None:
    with index._database.transaction() as conn:

        def rows(sql: str) -> list[tuple[Any, ...]]:
            return conn.execute(sql).fetchall()

        dangling = rows(
            "SELECT t.upstream, t.repo, t.tag FROM tags t WHERE NOT EXISTS (SELECT 1 FROM"
            " manifests m WHERE m.upstream=t.upstream AND m.repo=t.repo AND m.digest=t.digest)"
        )
        assert dangling == [], f"tags pointing to missing manifests: {dangling}"
        lost = rows(
            "SELECT m.repo, r.child FROM manifests m JOIN refs r ON r.manifest=m.digest"
            " WHERE r.kind='blob' AND NOT EXISTS (SELECT 1 FROM blobs b WHERE b.digest=r.child)"
        )
        assert lost == [], f"blobs listed by a cached manifest but forgotten: {lost}"
        no_refs = rows(
            "SELECT digest FROM manifests m WHERE NOT EXISTS"
            " (SELECT 1 FROM refs r WHERE r.manifest=m.digest)"
        )
        assert no_refs == [], f"manifests whose refs went: {no_refs}"
        (size, blobs, manifests, tags, repos) = rows(
            "SELECT (SELECT COALESCE(SUM(size), 0) FROM blobs), (SELECT COUNT(*) FROM blobs),"
            " (SELECT COUNT(*) FROM manifests), (SELECT COUNT(*) FROM tags),"
            " (SELECT COUNT(DISTINCT (upstream, repo)) FROM manifests)"
        )[0]
    assert index.totals() == {
        "size_bytes": size,
        "blobs": blobs,
        "manifests": manifests,
        "tags": tags,
        "repositories": repos,
    }
    assert index.total_size() == size


@pytest_twisted.ensureDeferred
async def test_two_nodes_write_purge_and_evict_at_once(make_database, threadpool):
    """Two nodes (a PgIndex and a pool each), each with two threads pulling
    images (manifest, then its layers, tag, links, access times: the order
    regproxy writes them in) and one purging and evicting, for a few
    seconds: no error escapes, and the index is consistent after."""
    nodes = [await pg_index(make_database, max_size=4) for _ in range(2)]
    base_layers = [f"sha256:base{i}" for i in range(3)]
    common_layers = [f"sha256:common{i}" for i in range(4)]
    pins = [("u", "base", None, None)]
    repos = ["r0", "r1", "r2", "r3"]

    def run() -> dict[str, int]:
        nodes[0].open()
        nodes[1].open()
        nodes[0].put_blobs([(d, 100, 1.0) for d in base_layers])
        nodes[0].put_manifest(
            "u",
            "base",
            ManifestEntry("sha256:base", MANIFEST_TYPE, 1),
            1.0,
            [(d, "blob") for d in base_layers],
        )
        stop = time.monotonic() + 4.0
        failures: list[str] = []
        counts = {"pulls": 0, "heavy": 0}
        count_lock = threading.Lock()

        def enough() -> bool:
            """Four seconds and some work of each kind (a busy machine
            takes longer), or half a minute at most."""
            now = time.monotonic()
            done = counts["pulls"] > 50 and counts["heavy"] > 10
            return (now >= stop and done) or now >= stop + 30.0

        def guarded(fn: Callable[[random.Random, PgIndex], None], seed: int, node: PgIndex):
            def loop() -> None:
                rng = random.Random(seed)
                try:
                    while not enough():
                        fn(rng, node)
                except BaseException as e:  # reported below
                    failures.append(f"{fn.__name__} {seed}: {e!r}")

            return threading.Thread(target=loop)

        def pull(rng: random.Random, node: PgIndex) -> None:
            image = f"{rng.random():.12f}"
            repo = rng.choice(repos)
            digest = f"sha256:m{image}"
            layers = [f"sha256:l{image}-{k}" for k in range(rng.randint(1, 3))]
            layers.append(rng.choice(base_layers))
            # a layer other images share, that no pin keeps
            layers.append(rng.choice(common_layers))
            now = time.time()
            listed, kind = [(d, "blob") for d in layers], MANIFEST_TYPE
            if rng.random() < 0.3:
                # an index and its platform manifest
                child = f"sha256:c{image}"
                node.put_manifest("u", repo, ManifestEntry(child, kind, 1), now, listed)
                listed, kind = [(child, "manifest")], INDEX_TYPE
            node.put_manifest("u", repo, ManifestEntry(digest, kind, 1), now, listed)
            node.put_tag("u", repo, rng.choice(["1", "2", "3"]), TagEntry(digest, kind, now))
            node.put_blobs([(d, rng.randint(1, 1000), now) for d in layers])
            node.link_blobs("u", repo, layers)
            node.touch_manifest("u", repo, digest, now)
            for d in layers:
                node.touch_blob(d, now)
            if rng.random() < 0.3:
                node.flush()
            with count_lock:
                counts["pulls"] += 1

        def heavy(rng: random.Random, node: PgIndex) -> None:
            kind = rng.randrange(7)
            repo = rng.choice(repos)
            if kind == 0:
                node.evict(pins, [], rng.randint(1, 5), excess=rng.uniform(0, 5000))
            elif kind == 1:
                node.evict(pins, [], 3, used_before=time.time() - 0.5)
            elif kind == 2:
                node.evict_loose([], rng.uniform(0, 3000), 20)
            elif kind == 3:
                node.purge("u", repo, tag=rng.choice(["1", "2", "3"]), batch=5)
            elif kind == 4:
                node.purge("u", repo, unused_since=time.time() - 0.3, batch=3)
            elif kind == 5:
                node.purge("u", repo, batch=rng.randint(1, 10))
            else:
                cached = node.repo_manifests("u", repo)
                if cached:
                    node.purge("u", repo, digest=rng.choice(cached).digest)
            with count_lock:
                counts["heavy"] += 1

        threads = []
        for n, node in enumerate(nodes):
            threads += [guarded(pull, 10 * n + k, node) for k in range(2)]
            threads.append(guarded(heavy, 10 * n + 5, node))
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not any(t.is_alive() for t in threads), "a thread is stuck"
        assert failures == []
        for node in nodes:
            node.flush()
        _invariants(nodes[0])
        # the pinned image and its layers are all there
        assert nodes[1].manifest("u", "base", "sha256:base") is not None
        assert set(nodes[1].blob_sizes(base_layers)) == set(base_layers)
        counts["retries"] = nodes[0].retries + nodes[1].retries
        return counts

    counts = await in_thread(threadpool, run)
    print(f"two nodes: {counts}")
    assert counts["pulls"] > 50 and counts["heavy"] > 10, counts
    # writes in key order never deadlock, so nothing was tried again
    assert counts["retries"] == 0, counts


@pytest_twisted.ensureDeferred
async def test_the_cache_reaches_it_off_the_reactor_thread(make_database, threadpool):
    """SharedIndex, the seam the cache uses: quick and heavy work both run
    on threads, and see what the other wrote."""
    index = await pg_index(make_database)
    await in_thread(threadpool, index.open)
    heavy = ThreadPool(minthreads=1, maxthreads=1, name="test-heavy")
    heavy.start()
    try:
        shared = SharedIndex(index, threadpool, heavy, reactor)
        assert shared.inline is None
        threads: list[bool] = []

        def put(ix: PgIndex) -> None:
            threads.append(isInIOThread())
            ix.put_blob("sha256:" + "a" * 64, 10, 1.0)

        await shared.quick(put)
        assert (
            await shared.heavy(lambda ix: (threads.append(isInIOThread()), ix.total_size())[1])
            == 10
        )
        assert threads == [False, False]
        shared.touch_blob("sha256:" + "a" * 64, 5.0)
        await shared.heavy(lambda ix: ix.flush())
        with pytest.raises(RuntimeError, match="reactor thread"):
            index.total_size()  # called here, on the reactor thread: refused
    finally:
        heavy.stop()
