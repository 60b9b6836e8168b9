"""Growing from one node: a single regproxy's cache, filled by pulling
through the real proxy, moved into a real bucket (Swift) and PostgreSQL."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import psycopg
import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.threads import deferToThread, deferToThreadPool

from registryproxy.cache.index import Index
from registryproxy.cluster import migrate as migration
from registryproxy.cluster.bucket import key
from registryproxy.cluster.engineconfig import PgSettings, S3Settings
from registryproxy.cluster.migrate import MigrateError, Report, migrate
from registryproxy.cluster.pgindex import PgIndex
from registryproxy.cluster.s3 import MIN_PART_SIZE, S3Error, S3Store
from registryproxy.config import load_config
from registryproxy.names import Digest

pytestmark = pytest.mark.cluster

REPO_ROOT = Path(__file__).parents[2]
INDEX_TYPE = "application/vnd.docker.distribution.manifest.list.v2+json"
#: bigger than a part: goes up as a multipart upload
BIG = 2 * MIN_PART_SIZE + 12345

#: the key columns first, as migrate reads them
TABLES = {
    "blobs": "digest, size, stored_at, last_access",
    "manifests": "upstream, repo, digest, media_type, size, fetched_at, last_access",
    "refs": "manifest, child, kind, position",
    "tags": "upstream, repo, tag, media_type, digest, checked_at",
    "repo_blobs": "upstream, repo, digest",
    "blob_sources": "digest, upstream",
}


def flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


class SingleNode:
    """A stopped regproxy's cache directory, and what went wrong in it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.rotten: set[str] = set()
        self.missing: set[str] = set()
        #: the manifest whose bytes rotted (left out with its tag)
        self.rotten_manifest = ""

    def path(self, digest: str) -> Path:
        algorithm, hexpart = digest.split(":")
        return self.root / "blobs" / algorithm / hexpart[:2] / hexpart

    def rows(self, table: str) -> list[tuple[Any, ...]]:
        db = sqlite3.connect(f"file:{self.root / 'index.db'}?mode=ro", uri=True)
        try:
            columns = TABLES[table]
            order = columns.split(", ")[: 3 if table != "blobs" else 1]
            return db.execute(
                f"SELECT {columns} FROM {table} ORDER BY {', '.join(order)}"
            ).fetchall()
        finally:
            db.close()

    def good_blobs(self) -> list[tuple[Any, ...]]:
        return [r for r in self.rows("blobs") if r[0] not in self.rotten | self.missing]


@pytest_twisted.async_yield_fixture()
async def single_node(fake_registry: Any, make_proxy: Any, tmp_path: Path) -> Any:
    """Three repositories pulled through a real regproxy, which is then
    stopped: ``library/app`` (a small layer that then rots and one of BIG
    bytes), ``library/multi`` (a list over two platforms) and ``library/broken``
    (its manifest rots, one layer's file goes missing, one of BIG bytes rots); access times flushed;
    a pin added through the admin API."""
    node = SingleNode(tmp_path / "single")
    small, big = b"a small layer" * 100, os.urandom(BIG)
    app, app_body = fake_registry.add_image("library/app", "1", [small, big])
    amd, _ = fake_registry.add_image("library/multi", None, [b"amd64 layer"])
    arm, _ = fake_registry.add_image("library/multi", None, [b"arm64 layer"], architecture="arm64")
    multi = fake_registry.add_index("library/multi", "1", [amd, arm])
    rots = os.urandom(BIG)
    broken, broken_body = fake_registry.add_image("library/broken", "1", [b"broken layer", rots])

    proxy = await make_proxy(fake_registry.url, cache_dir=node.root)

    async def pull(repo: str, reference: str, **headers: list[str]) -> dict[str, Any]:
        reply = await proxy.get(f"/v2/{repo}/manifests/{reference}", **headers)
        assert reply.code == 200, reply.body
        manifest = json.loads(reply.body)
        for blob in [manifest.get("config"), *manifest.get("layers", [])]:
            if blob:
                got = await proxy.get(f"/v2/{repo}/blobs/{blob['digest']}")
                assert got.code == 200
        return dict(manifest)

    await pull("library/app", "1")
    listed = await pull("library/multi", "1", Accept=[INDEX_TYPE])
    for platform in listed["manifests"]:
        await pull("library/multi", platform["digest"])
    await pull("library/broken", "1")
    # a second read, so that access times differ from store times
    await proxy.get("/v2/library/app/manifests/1")
    await proxy.stop()

    (node.root / "pins.json").write_text(json.dumps(["library/app:1"]))
    small_digest = "sha256:" + hashlib.sha256(small).hexdigest()
    flip(node.path(small_digest))
    flip(node.path(broken))
    broken_layer = json.loads(broken_body)["layers"][0]["digest"]
    node.path(broken_layer).unlink()
    rotten_big = "sha256:" + hashlib.sha256(rots).hexdigest()
    flip(node.path(rotten_big))  # a multipart upload, aborted at the end
    node.rotten = {small_digest, broken, rotten_big}
    node.missing = {broken_layer}
    node.rotten_manifest = broken
    assert {app, multi, amd, arm, broken} <= {r[2] for r in node.rows("manifests")}
    assert any(r[1] == BIG for r in node.rows("blobs"))
    yield node


async def run(
    node: SingleNode,
    s3_settings: S3Settings,
    pg_dsn: str,
    threadpool: Any,
    **options: Any,
) -> tuple[Report, list[str]]:
    lines: list[str] = []
    report = await migrate(
        str(node.root),
        s3_settings,
        PgSettings(dsn=pg_dsn, max_size=2),
        threadpool=threadpool,
        reactor=reactor,
        progress=lines.append,
        part_size=MIN_PART_SIZE,
        page=3,  # several pages per table
        parallel=2,
        **options,
    )
    return report, lines


async def pg_rows(make_database: Any, table: str) -> list[tuple[Any, ...]]:
    db = await make_database()
    columns = TABLES[table]
    order = columns.split(", ")[: 3 if table != "blobs" else 1]

    def read(conn: Any) -> list[tuple[Any, ...]]:
        return [
            tuple(row)
            for row in conn.execute(
                f"SELECT {columns} FROM {table} ORDER BY {', '.join(order)}"
            ).fetchall()
        ]

    return await db.run(read)


async def bucket_keys(store: S3Store) -> set[str]:
    return {info.key for info in await store.list_page("blobs/")}


@pytest_twisted.ensureDeferred
async def test_a_single_node_moves_into_the_cluster(
    single_node, s3_settings, s3_store, pg_dsn, make_database, threadpool
):
    node = single_node
    report, lines = await run(node, s3_settings, pg_dsn, threadpool)

    good = node.good_blobs()
    assert (report.uploaded, report.present, report.rotten, report.missing) == (len(good), 0, 3, 1)
    assert report.uploaded_bytes == sum(size for _, size, _, _ in good)
    for digest in node.rotten:
        assert any(digest in line and "rotten" in line for line in lines), lines
    (missing,) = node.missing
    assert any(missing in line and "missing" in line for line in lines)
    assert any("pins.json" in note for note in report.notes)

    # the bucket: every good blob with its exact bytes, nothing else
    assert await bucket_keys(s3_store) == {key(Digest.parse(d)) for d, *_ in good}
    for digest, size, _, _ in good:
        data = await s3_store.get(key(Digest.parse(digest)))
        assert len(data) == size
        assert data == node.path(digest).read_bytes()
        assert "sha256:" + hashlib.sha256(data).hexdigest() == digest
    assert await s3_store.list_uploads() == []

    # PostgreSQL: the same rows, less what rotted (and its tag)
    expected: dict[str, list[tuple[Any, ...]]] = {
        "blobs": good,
        "manifests": [r for r in node.rows("manifests") if r[2] != node.rotten_manifest],
        "refs": [r for r in node.rows("refs") if r[0] != node.rotten_manifest],
        "tags": [r for r in node.rows("tags") if r[4] != node.rotten_manifest],
        "repo_blobs": node.rows("repo_blobs"),
        # of the blobs uploaded only
        "blob_sources": [r for r in node.rows("blob_sources") if r[0] in {b[0] for b in good}],
    }
    assert expected["blob_sources"]
    assert any(r[3] is not None for r in expected["blobs"])  # access times came along
    for table, rows in expected.items():
        assert await pg_rows(make_database, table) == rows, table
    assert (report.manifests, report.manifests_left_out) == (len(expected["manifests"]), 1)
    assert (report.tags, report.tags_left_out) == (len(expected["tags"]), 1)
    assert report.refs == len(expected["refs"])
    assert report.links == len(expected["repo_blobs"])
    assert report.sources == len(expected["blob_sources"])

    # and PgIndex answers as the single node's Index did
    pg = PgIndex(await make_database())
    sqlite = Index(str(node.root / "index.db"))
    try:

        def compare() -> None:
            def names(index: Any) -> list[tuple[str, str, int, int, float | None]]:
                # not the sizes: the broken blob is left behind
                return [
                    (r.upstream, r.repo, r.tags, r.manifests, r.last_access)
                    for r in index.repository_summaries()
                    if r.repo != "library/broken"
                ]

            repos = [r for r in sqlite.repository_summaries() if r.repo != "library/broken"]
            assert names(pg) == names(sqlite)
            for r in repos:
                assert pg.repo_manifests(r.upstream, r.repo) == sqlite.repo_manifests(
                    r.upstream, r.repo
                )
                assert pg.repo_tags(r.upstream, r.repo) == sqlite.repo_tags(r.upstream, r.repo)
                for m in sqlite.repo_manifests(r.upstream, r.repo):
                    assert pg.manifest(r.upstream, r.repo, m.digest) == sqlite.manifest(
                        r.upstream, r.repo, m.digest
                    )
                    assert pg.refs(m.digest) == sqlite.refs(m.digest)
            for upstream, repo, digest in node.rows("repo_blobs"):
                assert pg.has_blob(upstream, repo, digest)
            digests = [d for d, *_ in node.rows("blobs")]
            assert pg.blob_sizes(digests) == {d: s for d, s, *_ in good}
            assert pg.tag("docker.io", "library/broken", "1") is None

        await deferToThreadPool(reactor, threadpool, compare)
    finally:
        sqlite.close()

    # a second run uploads nothing and changes nothing
    before = {table: await pg_rows(make_database, table) for table in TABLES}
    again, _ = await run(node, s3_settings, pg_dsn, threadpool)
    assert (again.uploaded, again.present, again.rotten, again.missing) == (0, len(good), 3, 1)
    assert {table: await pg_rows(make_database, table) for table in TABLES} == before


@pytest_twisted.ensureDeferred
async def test_a_dry_run_changes_nothing(single_node, s3_settings, pg_dsn, threadpool):
    node = single_node
    before = {table: node.rows(table) for table in TABLES}
    report, lines = await run(node, s3_settings, pg_dsn, threadpool, dry_run=True)

    good = node.good_blobs()
    assert report.dry_run
    assert (report.uploaded, report.rotten, report.missing) == (len(good), 3, 1)
    assert report.manifests == len(before["manifests"])
    assert any(next(iter(node.rotten)) in line for line in lines)
    # no bucket made, no table made, the source as it was
    store = S3Store(s3_settings, threadpool, reactor)
    with pytest.raises(S3Error, match="NoSuchBucket"):
        await store.list_page()
    with psycopg.connect(pg_dsn) as conn:
        assert conn.execute("SELECT to_regclass('manifests')").fetchone() == (None,)
    assert {table: node.rows(table) for table in TABLES} == before


@pytest_twisted.ensureDeferred
async def test_a_cluster_keeps_what_it_knows_better(
    single_node, s3_settings, s3_store, pg_dsn, make_database, threadpool
):
    """Migrating into a cluster that already serves: its later tag check and
    access times stay; the single node's older ones do not overwrite them."""
    node = single_node
    tag = next(r for r in node.rows("tags") if r[1] == "library/app")
    blob = node.good_blobs()[0]
    db = await make_database()
    await deferToThreadPool(reactor, threadpool, PgIndex(db).open)

    def seed(conn: Any) -> None:
        conn.execute(
            "INSERT INTO manifests VALUES (%s, %s, %s, %s, 1, 1.0, NULL)",
            (tag[0], tag[1], tag[4], tag[3]),
        )
        conn.execute(
            "INSERT INTO tags VALUES (%s, %s, %s, %s, %s, %s)",
            (tag[0], tag[1], tag[2], tag[3], tag[4], tag[5] + 1000),
        )
        conn.execute("INSERT INTO blobs VALUES (%s, %s, 1.0, 9e12)", (blob[0], blob[1]))

    await db.run(seed)
    await run(node, s3_settings, pg_dsn, threadpool)
    tags = await pg_rows(make_database, "tags")
    assert [r[5] for r in tags if r[:3] == tag[:3]] == [tag[5] + 1000]
    blobs = {r[0]: r for r in await pg_rows(make_database, "blobs")}
    assert blobs[blob[0]][2:] == (1.0, 9e12)


@pytest_twisted.ensureDeferred
async def test_a_running_node_is_refused(single_node, s3_settings, pg_dsn, threadpool):
    """Another process with the index open (the regproxy not stopped)."""
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from registryproxy.cache.index import Index;"
            f" i = Index({str(single_node.root / 'index.db')!r}); print('open', flush=True);"
            " sys.stdin.read()",
        ],
        cwd=REPO_ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "open\n"
        with pytest.raises(MigrateError, match="open in another process: stop the regproxy"):
            await run(single_node, s3_settings, pg_dsn, threadpool)
    finally:
        holder.communicate("")
    # stopped: it goes
    report, _ = await run(single_node, s3_settings, pg_dsn, threadpool, dry_run=True)
    assert report.blobs


@pytest_twisted.ensureDeferred
async def test_unreachable_engines_are_one_clear_error(
    single_node, s3_settings, pg_dsn, threadpool
):
    closed = _closed_port()
    with pytest.raises(MigrateError, match="cannot connect to PostgreSQL") as e:
        await migrate(
            str(single_node.root),
            s3_settings,
            PgSettings(dsn=f"host=127.0.0.1 port={closed} dbname=x user=x", connect_timeout=2),
            threadpool=threadpool,
            reactor=reactor,
        )
    assert "\n" not in str(e.value)
    nowhere = S3Settings(
        bucket="b",
        endpoint=f"http://127.0.0.1:{closed}",
        access_key="a",
        secret_key="s",
        connect_timeout=1,
        max_attempts=1,
    )
    with pytest.raises(MigrateError, match="the bucket 'b' at http://127.0.0.1") as e:
        await migrate(
            str(single_node.root),
            nowhere,
            PgSettings(dsn=pg_dsn, max_size=2),
            threadpool=threadpool,
            reactor=reactor,
        )
    assert "\n" not in str(e.value)


def test_not_a_cache_directory(tmp_path, threadpool):
    with pytest.raises(MigrateError, match="has no index.db: is it a regproxy cache directory"):
        migration.Source(str(tmp_path))


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _command(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "registryproxy.cluster.migrate", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_command_says_what_is_wrong_in_one_line(tmp_path):
    result = _command("--config", str(tmp_path / "nowhere.yaml"))
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith("regproxy-migrate: cannot read config file")

    plain = tmp_path / "plain.yaml"
    plain.write_text(f"cache:\n  directory: {tmp_path}\n")
    result = _command("--config", str(plain))
    assert result.returncode == 1
    assert result.stderr == (
        "regproxy-migrate: cache.storage.s3 and cache.index.postgresql not set: give the"
        " config of a cluster node (README: Running a cluster)\n"
    )


@pytest_twisted.ensureDeferred
async def test_the_command_moves_a_node(single_node, swift, s3_settings, pg_dsn, tmp_path):
    config = tmp_path / "node.yaml"
    config.write_text(
        textwrap.dedent(
            f"""\
            cache:
              directory: {single_node.root}
              storage:
                s3:
                  endpoint: {swift.url}
                  bucket: {s3_settings.bucket}
                  region: {swift.region}
                  access_key: "{swift.access_key}"
                  secret_key: "{swift.secret_key}"
              index:
                postgresql:
                  dsn: "{pg_dsn}"
            cluster:
              node: "node-1"
              listen: "tcp:5002:interface=127.0.0.1"
              advertise: "http://127.0.0.1:5002"
            """
        )
    )
    load_config(str(config))  # a node's config, as the README shows it
    dry = await deferToThread(lambda: _command("--config", str(config), "--dry-run"))
    assert dry.returncode == 4, dry.stderr  # rotten and missing files found
    assert "dry run, nothing written:" in dry.stderr and "Traceback" not in dry.stderr
    done = await deferToThread(lambda: _command("--config", str(config)))
    assert done.returncode == 4, done.stderr
    assert "3 rotten, 1 missing" in done.stderr
    second = await deferToThread(lambda: _command("--config", str(config)))
    assert "blobs: 0 uploaded" in second.stderr
