"""The SQLite index: listing, access times, and purges that free exactly the unshared blobs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import pytest_twisted

from registryproxy.cache import index as index_module
from registryproxy.cache.index import Accesses, Index, ManifestEntry, Page, TagEntry


def d(name: str) -> str:
    return "sha256:" + name.encode().hex().ljust(64, "0")[:64]


@pytest.fixture
def index(tmp_path):
    index = Index(str(tmp_path / "index.db"))
    yield index
    index.close()


def add_image(index, upstream, repo, manifest, layers, tag=None, when=100.0):
    for layer in layers:
        index.put_blob(d(layer), 1000, when)
    index.put_blob(d(manifest), 10, when)
    index.put_manifest(
        upstream,
        repo,
        ManifestEntry(d(manifest), "application/vnd.oci.image.manifest.v1+json", 10),
        when,
        [(d(layer), "blob") for layer in layers],
    )
    if tag:
        index.put_tag(upstream, repo, tag, TagEntry(d(manifest), "m", when))


def add_index(index, upstream, repo, name, children, tag, when=100.0):
    index.put_blob(d(name), 20, when)
    index.put_manifest(
        upstream,
        repo,
        ManifestEntry(d(name), "application/vnd.oci.image.index.v1+json", 20),
        when,
        [(d(child), "manifest") for child in children],
    )
    index.put_tag(upstream, repo, tag, TagEntry(d(name), "i", when))


def test_tag_purge_takes_the_index_and_its_platforms_but_not_shared_layers(index):
    add_image(index, "docker.io", "library/a", "amd64", ["base", "a1"])
    add_image(index, "docker.io", "library/a", "arm64", ["base", "a2"])
    add_index(index, "docker.io", "library/a", "idx", ["amd64", "arm64"], tag="1")
    add_image(index, "docker.io", "library/b", "bman", ["base", "b1"], tag="1")

    removed = index.purge(upstream="docker.io", repo="library/a", tag="1")
    assert (removed.tags, removed.manifests) == (1, 3)
    freed = {digest for digest, _ in removed.blobs}
    assert freed == {d("idx"), d("amd64"), d("arm64"), d("a1"), d("a2")}
    assert sum(size for _, size in removed.blobs) == 20 + 10 + 10 + 1000 + 1000
    assert [r.repo for r in index.repository_summaries()] == ["library/b"]
    assert index.has_blob("docker.io", "library/b", d("base"))
    assert not index.has_blob("docker.io", "library/a", d("base"))


def test_tag_purge_keeps_a_manifest_another_tag_still_names(index):
    add_image(index, "docker.io", "library/a", "m", ["l"], tag="1")
    index.put_tag("docker.io", "library/a", "latest", TagEntry(d("m"), "m", 100.0))
    removed = index.purge(upstream="docker.io", repo="library/a", tag="1")
    assert (removed.tags, removed.manifests, removed.blobs) == (1, 0, [])
    assert index.tag("docker.io", "library/a", "latest")


def test_digest_purge_removes_its_tags_too(index):
    add_image(index, "docker.io", "library/a", "m1", ["l1"], tag="1")
    add_image(index, "docker.io", "library/a", "m2", ["l2"], tag="2")
    removed = index.purge(upstream="docker.io", repo="library/a", digest=d("m1"))
    assert (removed.tags, removed.manifests) == (1, 1)
    assert {digest for digest, _ in removed.blobs} == {d("m1"), d("l1")}
    assert index.tag("docker.io", "library/a", "2")


def test_same_manifest_in_two_upstreams_survives_purge_of_one(index):
    add_image(index, "docker.io", "library/a", "m", ["l"], tag="1")
    add_image(index, "mirror.example", "library/a", "m", ["l"], tag="1")
    removed = index.purge(upstream="docker.io")
    assert removed.manifests == 1
    assert removed.blobs == []
    assert index.manifest("mirror.example", "library/a", d("m"))


def test_purge_everything(index):
    add_image(index, "docker.io", "library/a", "m", ["l"], tag="1")
    add_image(index, "ghcr.io", "o/b", "n", ["k"], tag="1")
    removed = index.purge()
    assert removed.manifests == 2
    assert {digest for digest, _ in removed.blobs} == {d("m"), d("l"), d("n"), d("k")}
    assert index.totals() == {
        "size_bytes": 0,
        "blobs": 0,
        "manifests": 0,
        "tags": 0,
        "repositories": 0,
    }


def test_purge_by_age_and_by_last_use(index):
    add_image(index, "docker.io", "library/old", "o", ["lo"], tag="1", when=100.0)
    add_image(index, "docker.io", "library/new", "n", ["ln"], tag="1", when=500.0)
    add_image(index, "docker.io", "library/used", "u", ["lu"], tag="1", when=100.0)
    index.touch_manifest("docker.io", "library/used", d("u"), 900.0)

    removed = index.purge(unused_since=400.0)
    assert [r.repo for r in index.repository_summaries()] == ["library/new", "library/used"]
    assert removed.manifests == 1

    removed = index.purge(fetched_before=400.0)
    assert [r.repo for r in index.repository_summaries()] == ["library/new"]


def test_access_times_go_in_short_transactions_and_never_back(index, monkeypatch):
    """A few hundred rows a transaction (the write lock's other users wait
    for one); another connection writing an older time leaves the later."""
    monkeypatch.setattr(index_module, "ACCESS_BATCH", 2)
    for i in range(5):
        index.put_blob(d(f"b{i}"), 1, 100.0)
        index.touch_blob(d(f"b{i}"), 500.0)
    transactions: list[int] = []
    real = index._transaction
    monkeypatch.setattr(index, "_transaction", lambda: transactions.append(1) or real())
    index.flush()
    assert len(transactions) == 3
    other = index.companion()
    other.write_accesses(Accesses({}, {d("b0"): 200.0, d("b1"): 900.0}))
    other.close()
    times = dict(index._db.execute("SELECT digest, last_access FROM blobs"))
    assert times == {d(f"b{i}"): 900.0 if i == 1 else 500.0 for i in range(5)}
    assert not index.take_accesses()  # all taken


def test_listing_and_totals(index):
    add_image(index, "docker.io", "library/a", "m1", ["l1", "l2"], tag="1")
    add_image(index, "docker.io", "library/a", "m2", ["l1"], tag="2")
    index.touch_manifest("docker.io", "library/a", d("m2"), 777.0)
    index.flush()
    (repo,) = index.repository_summaries("docker.io")
    assert (repo.tags, repo.manifests, repo.last_access) == (2, 2, 777.0)
    assert index.repository_summaries("ghcr.io") == []
    assert index.totals()["size_bytes"] == 3 * 1000 - 1000 + 2 * 10
    assert [t.tag for t in index.repo_tags("docker.io", "library/a")] == ["1", "2"]
    assert index.refs(d("m1")) == [(d("l1"), "blob"), (d("l2"), "blob")]


def test_repository_summaries_in_one_statement(index):
    """Sizes count each cached blob once per repository (shared layers, a
    layer not cached), an index's platform manifests, and nothing of
    another repository; the whole listing is one SQL statement."""
    add_image(index, "docker.io", "library/a", "m1", ["l1", "l2"], tag="1")
    add_image(index, "docker.io", "library/a", "m2", ["l1", "l3"], tag="2")
    index.forget_blob(d("l3"))  # listed, not cached
    add_image(index, "docker.io", "library/b", "m3", ["l1"])
    add_index(index, "docker.io", "library/b", "i1", ["m3"], tag="x")
    add_image(index, "ghcr.io", "c", "m4", ["l4"], tag="1")
    index.touch_manifest("docker.io", "library/b", d("m3"), 555.0)
    index.flush()
    statements: list[str] = []
    index._db.set_trace_callback(statements.append)
    summaries = index.repository_summaries()
    index._db.set_trace_callback(None)
    assert len(statements) == 1
    shown = [(s.upstream, s.repo, s.tags, s.manifests, s.size, s.last_access) for s in summaries]
    assert shown == [
        ("docker.io", "library/a", 2, 2, 10 + 10 + 1000 + 1000, None),
        ("docker.io", "library/b", 1, 2, 10 + 20 + 1000, 555.0),
        ("ghcr.io", "c", 1, 1, 10 + 1000, None),
    ]
    assert [s.repo for s in index.repository_summaries("ghcr.io")] == ["c"]
    assert index.repository_summaries("quay.io") == []


def test_repository_refs_in_one_statement(index):
    """What a repository's manifests list, with the cached blobs' sizes:
    as refs() and blob_sizes() tell it manifest by manifest."""
    add_image(index, "docker.io", "library/a", "m1", ["l1", "l2"])
    add_image(index, "docker.io", "library/a", "m2", ["l2", "l1"])
    add_index(index, "docker.io", "library/a", "i1", ["m1", "m2", "m9"], tag="x")
    add_image(index, "docker.io", "library/b", "m3", ["l3"])
    index.forget_blob(d("l2"))
    statements: list[str] = []
    index._db.set_trace_callback(statements.append)
    refs = index.repository_refs("docker.io", "library/a")
    index._db.set_trace_callback(None)
    assert len(statements) == 1
    expected = []
    for m in sorted(m.digest for m in index.repo_manifests("docker.io", "library/a")):
        sizes = index.blob_sizes(child for child, _ in index.refs(m))
        for child, kind in index.refs(m):
            expected.append((m, child, kind, sizes.get(child) if kind == "blob" else None))
    assert refs == expected
    assert (d("m2"), d("l2"), "blob", None) in refs and (d("m2"), d("l1"), "blob", 1000) in refs
    assert [r[1] for r in refs if r[0] == d("m2")] == [d("l2"), d("l1")]  # in the manifest's order
    assert index.repository_refs("docker.io", "library/none") == []


def test_an_unversioned_index_is_started_afresh(tmp_path):
    import sqlite3

    path = tmp_path / "index.db"
    old = sqlite3.connect(path)
    old.execute("CREATE TABLE manifests (upstream TEXT, repo TEXT, digest TEXT)")
    old.execute("INSERT INTO manifests VALUES ('docker.io', 'x', 'y')")
    old.commit()
    old.close()
    index = Index(str(path))
    assert index.repository_summaries() == []
    add_image(index, "docker.io", "library/a", "m", ["l"], tag="1")
    assert [r.repo for r in index.repository_summaries()] == ["library/a"]
    index.close()


def test_repository_summaries_by_page(index):
    """A page of the listing is one statement: in name order after a key
    (the keyset), by size (ties by name), narrowed by a substring whose LIKE
    wildcards are plain characters, at most so many rows."""
    names = ["a_b", "axb", "a%b", "big", "Big2", "c/d", "zz"]
    for i, repo in enumerate(names):
        add_image(index, "docker.io", repo, f"m{i}", [f"l{i}"], tag="1")
    add_image(index, "ghcr.io", "big", "g", ["l0", "l3"], tag="1")  # 2010 bytes
    index.put_blob(d("l3"), 5000, 100.0)  # big's layer: docker.io/big is the largest
    everything = index.repository_summaries()
    keys = [(s.upstream, s.repo) for s in everything]
    assert keys == sorted(keys) and len(keys) == 8

    def page(upstream=None, **narrowed):
        statements: list[str] = []
        index._db.set_trace_callback(statements.append)
        rows = index.repository_summaries(upstream, Page(**narrowed))
        index._db.set_trace_callback(None)
        assert len(statements) == 1, statements
        return [(s.upstream, s.repo) for s in rows]

    # keyset pages in name order add up to the whole listing
    seen, after = [], None
    while True:
        rows = page(after=after, limit=3)
        if not rows:
            break
        assert len(rows) <= 3
        seen += rows
        after = rows[-1]
    assert seen == keys
    assert page(after=("docker.io", "zz")) == [("ghcr.io", "big")]
    assert page("docker.io", after=("docker.io", "c/d")) == [("docker.io", "zz")]
    # the largest first (6010, 5010 bytes), ties (1010 bytes each) by name, in byte order
    expected = [
        ("ghcr.io", "big"),
        ("docker.io", "big"),
        ("docker.io", "Big2"),
        ("docker.io", "a%b"),
        ("docker.io", "a_b"),
        ("docker.io", "axb"),
        ("docker.io", "c/d"),
        ("docker.io", "zz"),
    ]
    assert [s.size for s in index.repository_summaries(None, Page(by_size=True, limit=3))] == [
        6010,
        5010,
        1010,
    ]
    assert page(by_size=True) == expected
    assert page(by_size=True, limit=4) == expected[:4]
    # substrings: _ and % are plain characters, letters in any case
    assert page(contains="_") == [("docker.io", "a_b")]
    assert page(contains="%") == [("docker.io", "a%b")]
    assert page(contains="a_") == [("docker.io", "a_b")]
    assert page(contains="BIG") == [("docker.io", "Big2"), ("docker.io", "big"), ("ghcr.io", "big")]
    assert page(contains="io/big") == [
        ("docker.io", "Big2"),
        ("docker.io", "big"),
        ("ghcr.io", "big"),
    ]
    assert page(contains="io/big2") == [("docker.io", "Big2")]
    assert page(contains="\\") == []
    assert page(contains="ghcr.io/", by_size=True) == [("ghcr.io", "big")]
    assert page("ghcr.io", contains="big") == [("ghcr.io", "big")]
    assert page(contains="b", after=("docker.io", "a_b"), limit=2) == [
        ("docker.io", "axb"),
        ("docker.io", "big"),
    ]


def sums(index):
    """What blob_totals stands for, counted the slow way."""
    return index._db.execute("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM blobs").fetchone()


def kept(index):
    totals = index.totals()
    assert index.total_size() == totals["size_bytes"]
    return (totals["blobs"], totals["size_bytes"])


def test_the_store_size_is_kept_through_every_change(index):
    import random

    rng = random.Random(7)
    names = [f"b{n}" for n in range(40)]
    for step in range(300):
        what = rng.choice(["put", "put", "put_many", "forget", "forget_many", "image", "evict"])
        if what == "put":  # new, or stored again with another size
            index.put_blob(d(rng.choice(names)), rng.randint(0, 5000), float(step))
        elif what == "put_many":
            index.put_blobs(
                [(d(rng.choice(names)), rng.randint(0, 5000), float(step)) for _ in range(5)]
            )
        elif what == "forget":
            index.forget_blob(d(rng.choice(names)))
        elif what == "forget_many":
            index.forget_blobs({d(rng.choice(names)) for _ in range(4)})
        elif what == "image":
            layers = rng.sample(names, 2)
            add_image(index, "docker.io", f"r{step % 5}", f"m{step}", layers, tag="t", when=step)
        else:
            index.evict(limit=2)
        assert kept(index) == sums(index), (step, what)
    index.purge()
    assert kept(index) == sums(index)


def test_an_index_from_before_blob_totals_is_counted_when_opened(tmp_path):
    import sqlite3

    path = str(tmp_path / "index.db")
    index = Index(path)
    add_image(index, "docker.io", "library/a", "m", ["l1", "l2"], tag="1")
    index.close()
    old = sqlite3.connect(path)
    for trigger in ("blob_added", "blob_removed", "blob_resized"):
        old.execute(f"DROP TRIGGER {trigger}")
    old.execute("DROP TABLE blob_totals")
    old.execute("INSERT INTO blobs VALUES (?, 500, 1.0, NULL)", (d("loose"),))
    old.commit()
    old.close()
    again = Index(path)
    try:
        assert kept(again) == sums(again) == (4, 2510)
        again.forget_blob(d("loose"))
        assert kept(again) == (3, 2010)
    finally:
        again.close()


def test_only_upstreams_that_sent_a_blob_vouch_for_it(index):
    """A manifest listing a digest links its repository, but its upstream is
    no source of the bytes until it sent them; forgetting the blob forgets
    who sent it."""
    add_image(index, "ghcr.io", "owner/private", "m", ["secret"])
    index.link_blobs("ghcr.io", "owner/private", [d("secret")])
    add_image(index, "docker.io", "evil/lure", "lure", ["secret"])
    assert index.has_blob("docker.io", "evil/lure", d("secret"))
    assert index.blob_known("docker.io", "evil/lure", d("secret")) is None
    assert index.blob_known("ghcr.io", "owner/private", d("secret")) == "repository"
    assert index.blob_known("ghcr.io", "owner/other", d("secret")) == "upstream"

    index.link_blobs("docker.io", "evil/lure", [d("secret")])  # it sent them after all
    assert index.blob_known("docker.io", "evil/lure", d("secret")) == "repository"
    index.forget_blob(d("secret"))
    assert index._db.execute("SELECT COUNT(*) FROM blob_sources").fetchone() == (0,)
    assert index.blob_known("ghcr.io", "owner/private", d("secret")) is None


def test_a_purge_forgets_who_sent_the_blobs_it_frees(index):
    add_image(index, "ghcr.io", "owner/a", "m", ["l1", "l2"], tag="1")
    add_image(index, "ghcr.io", "owner/b", "n", ["l3"], tag="1")  # ghcr.io keeps a manifest
    index.link_blobs("ghcr.io", "owner/a", [d("l1"), d("l2")])
    index.link_blobs("ghcr.io", "owner/b", [d("l3")])
    index.purge(upstream="ghcr.io", repo="owner/a")
    rows = index._db.execute("SELECT digest, upstream FROM blob_sources").fetchall()
    assert rows == [(d("l3"), "ghcr.io")]


def test_an_upstream_with_nothing_cached_vouches_for_nothing(index):
    """Purging an upstream takes its word with it, for blobs that stay
    because another upstream lists them too."""
    for upstream in ("ghcr.io", "evil.example"):
        add_image(index, upstream, "x/a", "m-" + upstream, ["shared"], tag="1")
        add_image(index, upstream, "x/b", "n-" + upstream, ["shared"], tag="1")
        index.link_blobs(upstream, "x/a", [d("shared")])
    index.purge(upstream="evil.example", repo="x/a")  # it still has x/b
    assert index.blob_known("evil.example", "x/b", d("shared")) == "repository"
    index.purge(upstream="evil.example")
    add_image(index, "evil.example", "x/lure", "lure", ["shared"])
    assert index.blob_known("evil.example", "x/lure", d("shared")) is None
    assert index.blob_known("ghcr.io", "x/b", d("shared")) == "repository"


def test_an_index_of_schema_2_takes_its_links_as_sources_once(tmp_path):
    """Upgrading trusts what each upstream's repositories could read, else
    every cached blob would be downloaded again once per upstream."""
    import sqlite3

    path = str(tmp_path / "index.db")
    index = Index(path)
    add_image(index, "ghcr.io", "owner/a", "m", ["l1", "l2"], tag="1")
    add_image(index, "docker.io", "library/b", "n", ["l2"], tag="1")
    index.put_manifest(
        "docker.io", "library/c", ManifestEntry(d("o"), "m", 1), 1.0, [(d("gone"), "blob")]
    )
    index.close()
    old = sqlite3.connect(path)
    old.execute("DROP TABLE blob_sources")
    old.execute("PRAGMA user_version=2")
    old.commit()
    old.close()
    again = Index(path)
    try:
        # l2: two upstreams' repositories list it, and one may only have
        # listed the other's digest: neither vouches, each sends it again
        rows = again._db.execute("SELECT digest, upstream FROM blob_sources").fetchall()
        assert rows == [(d("l1"), "ghcr.io")]
        assert again._db.execute("PRAGMA user_version").fetchone() == (3,)
        assert again.blob_known("ghcr.io", "owner/a", d("l1")) == "repository"
        assert again.blob_known("docker.io", "library/b", d("l2")) is None
        add_image(again, "docker.io", "evil/lure", "lure", ["l1"])
    finally:
        again.close()
    # once: a listing's link is no source when the index opens next
    third = Index(path)
    try:
        assert third.blob_known("docker.io", "evil/lure", d("l1")) is None
    finally:
        third.close()


#: in a process of its own: a schema 2 index brought up to date where files
#: may not grow past *limit* bytes (the write fails, as on a full disk)
_UPGRADE_UNDER_A_LIMIT = """
import resource, signal, sys
from registryproxy.cache.index import Index, IndexUnavailable, IndexUnusable
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a failed write, not a killed process
limit = int(sys.argv[2])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
try:
    Index(sys.argv[1]).close()
    print("opened")
except (IndexUnavailable, IndexUnusable) as e:
    print(type(e).__name__, e)
"""


def test_an_upgrade_the_disk_cannot_hold_is_not_called_damage(tmp_path):
    """SQLite rolls a failed write's transaction back itself; rolling back
    again failed, and that error ("no transaction is active") hid the real
    one, so a full disk at the schema's upgrade read as a damaged index."""
    import sqlite3
    import subprocess
    import sys

    path = str(tmp_path / "index.db")
    index = Index(path)
    rows = [(d(f"l{i}"), 1000, 1.0) for i in range(20000)]
    index.put_blobs(rows)
    index._db.executemany(
        "INSERT INTO repo_blobs VALUES ('docker.io', 'r', ?)", [(r[0],) for r in rows]
    )
    index.close()
    old = sqlite3.connect(path)
    old.execute("DROP TABLE blob_sources")
    old.execute("PRAGMA user_version=2")
    old.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    old.commit()
    old.close()
    # the WAL may not grow past 256 KiB: the upgrade writes megabytes
    assert os.path.getsize(path) > 1024 * 1024
    run = subprocess.run(
        [sys.executable, "-c", _UPGRADE_UNDER_A_LIMIT, path, str(256 * 1024)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).parent.parent.parent,
    )
    assert run.stdout.startswith("IndexUnavailable"), run.stdout + run.stderr
    # and it is sound: with room, it opens and is brought up to date
    again = Index(path)
    try:
        assert again.blob_known("docker.io", "r", d("l1")) == "repository"
    finally:
        again.close()


@pytest_twisted.ensureDeferred
async def test_reads_do_not_wait_for_heavy_work(tmp_path):
    """The admin API's listings and totals read on a connection and a
    thread of their own: a purge of the whole cache (18 s at 20,000
    images) held them up for as long, behind it in the worker thread."""
    import threading

    from twisted.internet import reactor
    from twisted.python.threadpool import ThreadPool

    from registryproxy.cache.access import LocalIndex
    from registryproxy.cache.background import IndexThread

    index = Index(str(tmp_path / "index.db"))
    add_image(index, "docker.io", "library/a", "m", ["l1"], tag="1")
    local = LocalIndex(
        index,
        IndexThread(index, reactor, ThreadPool(1, 1, "test-index")),
        IndexThread(index, reactor, ThreadPool(1, 1, "test-index-reads")),
    )
    gate = threading.Event()
    heavy = local.heavy(lambda _: gate.wait(10))
    try:
        totals = await local.read(lambda ix: ix.totals())
        assert totals["manifests"] == 1
        assert not heavy.called  # still running: the read did not wait for it
        gate.set()
        assert await heavy is True
    finally:
        gate.set()
        await local.close()


def test_only_files_an_eviction_or_purge_will_delete_are_listed_to_reclaim(index):
    """A row forgotten because its file is already gone (fsck, an object
    missing from a cluster's bucket) is not listed: the digest may be on its
    way back, and the next sweep would delete it again."""
    for name in ("gone", "loose"):
        index.put_blob(d(name), 10, 100.0)
    add_image(index, "docker.io", "library/a", "m", ["l"], tag="1")
    index.forget_blobs([d("gone")])
    assert index.to_reclaim("", 10) == []
    assert [digest for digest, _ in index.evict_loose([], 1)] == [d("loose")]
    removed = index.purge("docker.io", "library/a")
    assert index.to_reclaim("", 10) == sorted([d("loose"), *(b for b, _ in removed.blobs)])
