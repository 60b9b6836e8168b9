"""The cluster's building blocks against the real engines: S3 (Swift s3api),
PostgreSQL 15 and haproxy 2.6."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
import pytest
import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.python.threadpool import ThreadPool
from twisted.web.resource import Resource
from twisted.web.server import Site

from registryproxy.cluster.engineconfig import S3Settings
from registryproxy.cluster.pg import Database, lock_id
from registryproxy.cluster.s3 import MIN_PART_SIZE, NoSuchKey, S3Error, S3Store

from . import engines

pytestmark = pytest.mark.cluster


async def sleep(seconds: float) -> None:
    await deferLater(reactor, seconds, lambda: None)


async def eventually(check: Callable[[], Awaitable[Any]], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = await check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        await sleep(0.05)


# --------------------------------------------------------------------------
# S3
# --------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_s3_objects(s3_store: S3Store) -> None:
    assert await s3_store.ensure_bucket() is False  # ours already
    await s3_store.put("blobs/a", b"0123456789")
    assert await s3_store.head("blobs/a") == 10
    assert await s3_store.head("blobs/missing") is None
    assert await s3_store.get("blobs/a") == b"0123456789"
    assert await s3_store.get("blobs/a", 2, 5) == b"234"
    assert await s3_store.get("blobs/a", 7) == b"789"
    assert await s3_store.get("blobs/a", 9, 10) == b"9"
    assert await s3_store.get("blobs/a", 8, 100) == b"89"  # cut to the end
    with pytest.raises(NoSuchKey):
        await s3_store.get("blobs/missing")
    with pytest.raises(S3Error) as raised:
        await s3_store.get("blobs/a", 10)
    assert raised.value.code == "InvalidRange"
    await s3_store.delete("blobs/a")
    assert await s3_store.head("blobs/a") is None
    await s3_store.delete("blobs/a")  # gone already: no error


@pytest_twisted.ensureDeferred
async def test_s3_prefix_list_and_delete_many(
    s3_store: S3Store, s3_settings: S3Settings, threadpool: ThreadPool
) -> None:
    """Keys are relative to the prefix; listing pages; DeleteObjects (which
    Swift accepts only with the Content-MD5 header we add)."""
    node = S3Store(attrs.evolve(s3_settings, prefix="n1/"), threadpool, reactor)
    names = [f"blobs/{i:02d}" for i in range(5)]
    for name in names:
        await node.put(name, name.encode())
    await node.put("other/x", b"x")
    await s3_store.put("outside", b"not under n1/")

    pages = [page async for page in node.list_pages("blobs/", page_size=2)]
    assert [[info.key for info in page] for page in pages] == [names[0:2], names[2:4], names[4:]]
    assert pages[0][0].size == len(names[0])
    assert [info.key for info in await s3_store.list_page()] == [
        *(f"n1/{name}" for name in names),
        "n1/other/x",
        "outside",
    ]

    assert await node.delete_many([*names, "blobs/never-there"]) == []
    assert [info.key for info in await node.list_page()] == ["other/x"]
    assert await s3_store.head("outside") == len(b"not under n1/")


class PausingConsumer:
    """Takes what a producer writes, pausing it after every write and
    resuming it on the next reactor turn: the back-pressure a slow client gives."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.producer: Any = None
        self.pauses = 0

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        assert streaming
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None

    def write(self, data: bytes) -> None:
        self.chunks.append(data)
        producer = self.producer
        producer.pauseProducing()
        self.pauses += 1
        reactor.callLater(0.001, producer.resumeProducing)


@pytest_twisted.ensureDeferred
async def test_s3_multipart_and_streaming(s3_store: S3Store) -> None:
    first = os.urandom(MIN_PART_SIZE)
    last = os.urandom(100_000)
    upload = await s3_store.start_upload("blobs/big")
    await upload.upload_part(first)
    await upload.upload_part(last)
    with pytest.raises(ValueError, match="only the last part"):
        await upload.upload_part(b"after a short part")
    assert await s3_store.head("blobs/big") is None  # not before complete
    etag = await upload.complete()
    assert etag.strip('"').endswith("-2")
    data = first + last
    assert await s3_store.head("blobs/big") == len(data)
    # a range across the parts' boundary
    boundary = len(first)
    assert await s3_store.get("blobs/big", boundary - 3, boundary + 3) == data[-3 - len(last) :][:6]

    start, end = 1000, len(data) - 1000
    reader = await s3_store.open_read("blobs/big", start, end)
    assert (reader.length, reader.total) == (end - start, len(data))
    consumer = PausingConsumer()
    written = await reader.producer(consumer, chunk_size=256 * 1024)
    assert written == end - start
    assert b"".join(consumer.chunks) == data[start:end]
    assert max(len(chunk) for chunk in consumer.chunks) <= 256 * 1024
    assert consumer.pauses == len(consumer.chunks) > 10
    assert consumer.producer is None and reader.closed

    # a reader closed early lets go of the response; the rest is not read
    reader = await s3_store.open_read("blobs/big")
    assert len(await reader.read(10)) == 10
    reader.close()
    assert await reader.read(10) == b""
    assert await s3_store.list_uploads() == []


@pytest_twisted.ensureDeferred
async def test_s3_aborted_multipart_leaves_nothing(s3_store: S3Store) -> None:
    upload = await s3_store.start_upload("blobs/aborted")
    await upload.upload_part(os.urandom(MIN_PART_SIZE))
    assert [u.upload_id for u in await s3_store.list_uploads()] == [upload.upload_id]
    await upload.abort()
    await upload.abort()  # twice: no error
    assert await s3_store.head("blobs/aborted") is None
    assert await s3_store.list_page() == []
    assert await s3_store.list_uploads() == []
    with pytest.raises(NoSuchKey):
        await upload.complete()

    # crash recovery: uploads a dead node left behind are aborted once stale
    left = [await s3_store.start_upload(f"blobs/left-{i}") for i in range(2)]
    for pending in left:
        await pending.upload_part(b"a last part may be small")
    now = time.time()
    assert await s3_store.abort_stale_uploads(older_than=3600, now=now) == []
    aborted = await s3_store.abort_stale_uploads(older_than=3600, now=now + 7200)
    assert sorted(u.upload_id for u in aborted) == sorted(u.upload_id for u in left)
    assert await s3_store.list_uploads() == []
    assert await s3_store.list_page() == []


@pytest_twisted.ensureDeferred
async def test_s3_presigned_get(s3_store: S3Store) -> None:
    await s3_store.put("blobs/shared", b"fetched without credentials")
    url = await s3_store.presign_get("blobs/shared", expires_in=60)
    assert url.startswith(s3_store.settings.endpoint + "/" + s3_store.settings.bucket + "/")
    response = await treq.get(url)
    assert response.code == 200
    assert await response.content() == b"fetched without credentials"
    # the signature is what lets it in
    response = await treq.get(url.replace("Signature=", "Signature=0"))
    assert response.code == 403
    await response.content()
    response = await treq.get(url.split("?")[0])
    assert 400 <= response.code < 500  # Swift: 400, AWS: 403
    await response.content()


@pytest_twisted.ensureDeferred
async def test_s3_over_https_with_a_private_ca(
    swift_tls: engines.S3Endpoint, s3_settings: S3Settings, threadpool: ThreadPool
) -> None:
    """Over https botocore sends uploads aws-chunked with trailing checksums
    unless told to add checksums only when required, and Swift refuses those;
    the CA comes from ca_file."""
    settings = attrs.evolve(s3_settings, endpoint=swift_tls.url, ca_file=swift_tls.ca_file)
    store = S3Store(settings, threadpool, reactor)
    await store.ensure_bucket()
    await store.put("blobs/small", b"over tls")
    upload = await store.start_upload("blobs/big")
    first = os.urandom(MIN_PART_SIZE)
    await upload.upload_part(first)
    await upload.upload_part(b"end")
    await upload.complete()
    assert await store.get("blobs/big", MIN_PART_SIZE - 2) == first[-2:] + b"end"
    assert await store.get("blobs/small") == b"over tls"
    assert await store.delete_many(["blobs/small", "blobs/big"]) == []

    untrusting = S3Store(attrs.evolve(settings, ca_file=None), threadpool, reactor)
    with pytest.raises(S3Error) as raised:
        await untrusting.head("blobs/small")
    assert raised.value.code == "SSLError"
    assert "certificate verify failed" in str(raised.value)


# --------------------------------------------------------------------------
# PostgreSQL
# --------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_pg_run_in_transactions(make_database: Callable[..., Awaitable[Database]]) -> None:
    db = await make_database(min_size=1, max_size=2)
    await db.run(lambda conn: conn.execute("CREATE TABLE t (k text PRIMARY KEY)"))
    await db.run(lambda conn: conn.execute("INSERT INTO t VALUES ('kept')"))

    def insert_then_fail(conn: Any) -> None:
        conn.execute("INSERT INTO t VALUES ('rolled back')")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        await db.run(insert_then_fail)
    rows = await db.run(lambda conn: conn.execute("SELECT k FROM t ORDER BY k").fetchall())
    assert rows == [("kept",)]
    # more concurrent queries than connections: they wait their turn
    query = "SELECT pg_sleep(0.05), 1"
    results = await _gather(
        [db.run(lambda conn: conn.execute(query).fetchone()[1]) for _ in range(6)]
    )
    assert results == [1] * 6


async def _gather(ds: list[Deferred[Any]]) -> list[Any]:
    return [await d for d in ds]


@pytest_twisted.ensureDeferred
async def test_pg_lease_has_one_holder(make_database: Callable[..., Awaitable[Database]]) -> None:
    node1, node2 = await make_database(), await make_database()
    key = "blob:sha256:" + "a" * 64
    assert lock_id(key) == lock_id(key) != lock_id(key + "b")

    lease = await node1.try_lease(key)
    assert lease is not None and await lease.alive()
    assert await node2.try_lease(key) is None
    assert await node1.try_lease(key) is None  # its own node too: one holder per key
    other = await node2.try_lease("blob:other")
    assert other is not None

    await lease.release()
    await lease.release()  # twice: no error
    assert not await lease.alive()
    again = await node2.try_lease(key)
    assert again is not None
    await again.release()
    await other.release()


@pytest_twisted.ensureDeferred
async def test_pg_lease_freed_when_holder_connection_killed(
    make_database: Callable[..., Awaitable[Database]],
) -> None:
    node1, node2 = await make_database(), await make_database()
    key = "blob:sha256:" + "b" * 64
    lease = await node1.try_lease(key)
    assert lease is not None
    assert await node2.try_lease(key) is None

    terminate = "SELECT pg_terminate_backend(%s)"
    killed = await node2.run(
        lambda conn: conn.execute(terminate, (lease.backend_pid,)).fetchone()[0]
    )
    assert killed is True
    taken = await eventually(lambda: node2.try_lease(key), 5, "the lease freed by the server")
    assert not await lease.alive()
    await lease.release()  # lost already: no error
    await taken.release()


_HOLDER = """
import sys, time, psycopg
from registryproxy.cluster.pg import lock_id
conn = psycopg.connect(sys.argv[1], autocommit=True)
assert conn.execute("SELECT pg_try_advisory_lock(%s)", (lock_id(sys.argv[2]),)).fetchone()[0]
print("held", flush=True)
time.sleep(60)
"""


@pytest_twisted.ensureDeferred
async def test_pg_lease_freed_when_holder_process_dies(
    pg_dsn: str, make_database: Callable[..., Awaitable[Database]]
) -> None:
    """A node SIGKILLed mid-fetch: nothing of it runs any more, yet its lease
    is free at once (the kernel closes its socket; the server drops the lock)."""
    node = await make_database()
    key = "blob:sha256:" + "c" * 64
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, pg_dsn, key], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "held"
        assert await node.try_lease(key) is None
        holder.send_signal(signal.SIGKILL)
        holder.wait(10)
        lease = await eventually(lambda: node.try_lease(key), 5, "the dead holder's lease")
        await lease.release()
    finally:
        holder.kill()
        holder.wait()


# --------------------------------------------------------------------------
# haproxy
# --------------------------------------------------------------------------


class Node(Resource):
    """A tiny backend: /v2/ answers *health*, anything else names the node."""

    isLeaf = True

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name
        self.health = 200

    def render_GET(self, request: Any) -> bytes:
        if request.path == b"/v2/":
            request.setResponseCode(self.health)
            return b"{}"
        return self.name.encode()


def off_reactor(fn: Callable[..., Any], *args: Any) -> Deferred[Any]:
    """Run a blocking engine helper on a thread: it waits for haproxy, whose
    health checks need our in-process backends (on the reactor) to answer."""
    return deferToThread(fn, *args)


async def start_node(name: str) -> tuple[Node, str, Any]:
    node = Node(name)
    port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Site(node))
    return node, f"127.0.0.1:{port.getHost().port}", port


async def who_answers(url: str, requests: int) -> list[str]:
    names = []
    for _ in range(requests):
        response = await treq.get(url + "/whoami", persistent=False)
        assert response.code == 200
        names.append((await response.content()).decode())
    return names


@pytest_twisted.ensureDeferred
async def test_haproxy_round_robin_reload_and_health(
    make_haproxy: Callable[..., engines.HAProxy],
) -> None:
    nodes = [await start_node(f"node{i}") for i in (1, 2, 3)]
    try:
        proxy = await off_reactor(make_haproxy, [n[1] for n in nodes[:2]], 200)
        names = await who_answers(proxy.url, 6)
        assert sorted(set(names)) == ["node1", "node2"]
        assert names.count("node1") == names.count("node2") == 3

        await off_reactor(proxy.reload, [n[1] for n in nodes])
        names = await who_answers(proxy.url, 6)
        assert sorted(set(names)) == ["node1", "node2", "node3"]

        # a node whose /v2/ fails its health checks gets no more requests
        nodes[1][0].health = 503

        async def node2_down() -> bool:
            states = await off_reactor(proxy.server_states)
            return states["node2"].startswith("DOWN")

        await eventually(node2_down, 5, "node2 marked down")
        assert "node2" not in await who_answers(proxy.url, 6)
    finally:
        for _, _, port in nodes:
            await port.stopListening()
