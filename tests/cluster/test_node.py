"""Cluster nodes as ``twistd regproxy`` builds them (``makeService``), in this
process: their index in a real PostgreSQL, their blobs in a real bucket
(Swift's S3 API), a fake upstream that counts what it is asked."""

from __future__ import annotations

import base64
import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import attrs
import bcrypt
import boto3
import pytest
import pytest_twisted
import yaml
from fakeregistry import FakeRegistry, Fault
from integration.harness import free_port
from proxyharness import http_request, partial_get
from twisted.application.service import IService
from twisted.internet import reactor
from twisted.internet.defer import gatherResults
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

from registryproxy.cluster import node as node_module
from registryproxy.cluster.bucket import key
from registryproxy.names import Digest
from registryproxy.tap import Options, makeService

pytestmark = pytest.mark.cluster


@attrs.define
class Node:
    name: str
    url: str
    admin: str
    service: IService
    directory: Path

    def local(self, digest: str) -> Path:
        d = Digest.parse(digest)
        return self.directory / "blobs" / d.algorithm / d.hex[:2] / d.hex


@attrs.define
class Cluster:
    registry: FakeRegistry
    nodes: list[Node]
    s3: Any
    bucket: str
    start: Callable[..., Any]
    clients: ThreadPool

    def get(self, node: Node, path: str, method: str = "GET") -> Any:
        return deferToThreadPool(reactor, self.clients, http_request, node.url, method, path, {})

    def in_bucket(self, digest: str) -> bytes | None:
        try:
            answer = self.s3.get_object(Bucket=self.bucket, Key=key(Digest.parse(digest)))
        except self.s3.exceptions.NoSuchKey:
            return None
        return bytes(answer["Body"].read())


def _answers(url: str) -> bool:
    try:
        http_request(url, "GET", "/v2/", {})
        return True
    except OSError:
        return False


@pytest_twisted.async_yield_fixture()
async def cluster(swift, s3_settings, pg_dsn, tmp_path) -> AsyncIterator[Cluster]:
    registry = await FakeRegistry.start()
    clients = ThreadPool(minthreads=0, maxthreads=32, name="test-clients")
    clients.start()
    nodes: list[Node] = []

    async def start(name: str, redirect: bool = False, auth: Any = None, **postgresql: Any) -> Node:
        proxy, admin, internal = free_port(), free_port(), free_port()
        directory = tmp_path / name
        config = {
            "proxy": {
                "listen": f"tcp:{proxy}:interface=127.0.0.1",
                **({"auth": auth} if auth is not None else {}),
            },
            "admin": {"listen": f"tcp:{admin}:interface=127.0.0.1"},
            "cache": {
                "directory": str(directory),
                "storage": {
                    "s3": {
                        "endpoint": swift.url,
                        "bucket": s3_settings.bucket,
                        "region": swift.region,
                        "access_key": swift.access_key,
                        "secret_key": swift.secret_key,
                    },
                    "redirect": redirect,
                },
                "index": {"postgresql": {"dsn": pg_dsn, **postgresql}},
            },
            "upstreams": {"docker.io": {"url": registry.url, "read_timeout": 5}},
            "cluster": {
                "node": name,
                "listen": f"tcp:{internal}:interface=127.0.0.1",
                "advertise": f"http://127.0.0.1:{internal}",
                "heartbeat": 0.2,
                "node_timeout": 3,
                "peer_timeout": 2,
            },
        }
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config))
        options = Options()
        options.parseOptions(["--config", str(path)])
        service = makeService(options, reactor)
        service.startService()
        url = f"http://127.0.0.1:{proxy}"
        node = Node(name, url, f"http://127.0.0.1:{admin}", service, directory)
        nodes.append(node)
        await _wait_for(
            lambda: deferToThreadPool(reactor, clients, _answers, url), f"{name} to listen"
        )
        return node

    for i in range(3):
        await start(f"node-{i}")
    # every node sees the others
    await deferLater(reactor, 0.5, lambda: None)
    s3 = boto3.client(
        "s3",
        endpoint_url=swift.url,
        region_name=swift.region,
        aws_access_key_id=swift.access_key,
        aws_secret_access_key=swift.secret_key,
    )
    yield Cluster(registry, nodes, s3, s3_settings.bucket, start, clients)
    for node in nodes:
        if node.service.running:
            await node.service.stopService()
    clients.stop()
    await registry.stop()


async def _wait_for(d_factory: Callable[[], Any], what: str) -> Any:
    for _ in range(200):
        result = await d_factory()
        if result:
            return result
        await deferLater(reactor, 0.05, lambda: None)
    raise AssertionError(f"timed out waiting for {what}")


def image(registry: FakeRegistry, size: int, repo: str = "library/app") -> tuple[str, bytes]:
    layer = os.urandom(size)
    _, body = registry.add_image(repo, "1", [layer])
    return json.loads(body)["layers"][0]["digest"], layer


@pytest_twisted.ensureDeferred
async def test_a_blob_one_node_fetched_is_a_hit_on_every_other_from_the_bucket(cluster):
    registry = cluster.registry
    digest, layer = image(registry, 300_000)
    path = f"/v2/library/app/blobs/{digest}"
    first = await cluster.get(cluster.nodes[0], path)
    assert (first.code, first.body) == (200, layer)

    # published: in the bucket (exact bytes), then in the index
    async def indexed() -> bool:  # a HIT on every node: its row in the index
        replies = await gatherResults([cluster.get(n, path, "HEAD") for n in cluster.nodes])
        return all(r.header("X-Cache") == "HIT" for r in replies)

    await _wait_for(indexed, "the index row")
    assert cluster.in_bucket(digest) == layer  # the object went in first
    for node in cluster.nodes[1:]:
        assert not node.local(digest).exists() or node.local(digest).read_bytes() == layer
        reply = await cluster.get(node, path)
        assert (reply.code, reply.body, reply.header("X-Cache")) == (200, layer, "HIT")
        assert node.local(digest).read_bytes() == layer  # now in its local tier
    assert registry.count("GET", f"/blobs/{digest}") == 1


@pytest_twisted.ensureDeferred
async def test_many_clients_over_every_node_cause_one_upstream_get(cluster):
    registry = cluster.registry
    digest, layer = image(registry, 4 * 1024 * 1024)
    registry.blob_faults[digest] = Fault.slow(chunk=128 * 1024, delay=0.02)
    path = f"/v2/library/app/blobs/{digest}"
    replies = await gatherResults([cluster.get(cluster.nodes[i % 3], path) for i in range(30)])
    assert [r.code for r in replies] == [200] * 30
    assert all(r.body == layer for r in replies)
    if os.environ.get("DEBUG_NODE"):
        for r in registry.requests:
            print(r)
    assert registry.count("GET", f"/blobs/{digest}") == 1


@pytest_twisted.ensureDeferred
async def test_a_manifest_cached_by_one_node_is_a_hit_on_the_others_and_a_purge_a_miss_on_all(
    cluster,
):
    registry = cluster.registry
    image(registry, 1000, repo="library/purged")
    path = "/v2/library/purged/manifests/1"
    first = await cluster.get(cluster.nodes[0], path)
    assert (first.code, first.header("X-Cache")) == (200, "MISS")
    for node in cluster.nodes[1:]:
        reply = await cluster.get(node, path)
        assert (reply.code, reply.header("X-Cache"), reply.body) == (200, "HIT", first.body)
    assert registry.count("GET", "/library/purged/manifests/1") == 1
    purge = await deferToThreadPool(
        reactor,
        cluster.clients,
        http_request,
        cluster.nodes[0].admin,
        "DELETE",
        "/api/v1/cache/docker.io/library/purged",
        {},
    )
    assert purge.code == 200, purge.body
    digest = first.header("Docker-Content-Digest")
    assert cluster.in_bucket(digest) is None
    # node 1 has a local copy, but the cluster forgot it: a MISS, fetched
    # again once for everyone
    expected = {"node-1": "MISS", "node-2": "HIT", "node-0": "HIT"}
    for node in (cluster.nodes[1], cluster.nodes[2], cluster.nodes[0]):
        reply = await cluster.get(node, path)
        assert (reply.code, reply.header("X-Cache")) == (200, expected[node.name])
    assert registry.count("GET", "/library/purged/manifests/1") == 2


@pytest_twisted.ensureDeferred
async def test_a_cold_manifest_asked_of_every_node_at_once_is_fetched_once(cluster):
    registry = cluster.registry
    image(registry, 1000, repo="library/cold")
    # all of them ask while the first is fetching
    registry.manifest_faults["*"] = Fault.slow(chunk=100, delay=0.05)
    try:
        replies = await gatherResults(
            [cluster.get(cluster.nodes[i % 3], "/v2/library/cold/manifests/1") for i in range(9)]
        )
    finally:
        del registry.manifest_faults["*"]
    assert [r.code for r in replies] == [200] * 9
    assert len({r.body for r in replies}) == 1
    assert registry.count("GET", "/library/cold/manifests/1") == 1


@pytest_twisted.ensureDeferred
async def test_nothing_unverified_reaches_the_bucket(cluster):
    registry = cluster.registry
    digest, layer = image(registry, 2 * 1024 * 1024)
    registry.blob_faults[digest] = Fault.truncate(after=1024 * 1024, times=1)
    results = await gatherResults(
        [
            deferToThreadPool(
                reactor, cluster.clients, partial_get, node.url, f"/v2/library/app/blobs/{digest}"
            )
            for node in cluster.nodes
        ]
    )
    # a client either sees its download fail, or (arriving after the cut, its
    # node fetching again) gets every right byte: never a short or wrong 200
    for status, body, short in results:
        assert short or status != 200 or body == layer, (status, len(body))
    assert any(short or status != 200 for status, _, short in results)
    assert cluster.in_bucket(digest) in (None, layer)
    again = await cluster.get(cluster.nodes[2], f"/v2/library/app/blobs/{digest}")
    assert (again.code, again.body) == (200, layer)
    await _wait_for(
        lambda: deferToThreadPool(reactor, cluster.clients, cluster.in_bucket, digest),
        "the object",
    )
    assert cluster.in_bucket(digest) == layer


@pytest_twisted.ensureDeferred
async def test_admin_stats_answer_for_the_cluster(cluster):
    digest, _ = image(cluster.registry, 1000)
    await cluster.get(cluster.nodes[1], f"/v2/library/app/blobs/{digest}")
    await deferLater(reactor, 0.5, lambda: None)  # a heartbeat or two
    reply = await deferToThreadPool(
        reactor, cluster.clients, http_request, cluster.nodes[0].admin, "GET", "/api/v1/stats", {}
    )
    stats = json.loads(reply.body)["cluster"]
    assert stats["node"] == "node-0"
    assert sorted(n["name"] for n in stats["nodes"]) == ["node-0", "node-1", "node-2"]
    assert stats["summed"]["requests"] >= 1
    reply = await deferToThreadPool(
        reactor, cluster.clients, http_request, cluster.nodes[2].admin, "GET", "/readyz", {}
    )
    ready = json.loads(reply.body)
    assert (reply.code, ready["ready"]) == (200, True), ready
    assert {"index", "bucket", "cluster"} <= set(ready["checks"])
    assert sorted(ready["checks"]["cluster"]["nodes"]) == ["node-0", "node-1", "node-2"]


def _admin(url: str, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url + path, data=data, method=method)
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            raw = answer.read()
            return answer.status, json.loads(raw) if raw else None
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


@pytest_twisted.ensureDeferred
async def test_pins_and_upstreams_changed_through_one_node_hold_on_every_node(cluster):
    def admin(node: Node, method: str, path: str, body: Any = None) -> Any:
        return deferToThreadPool(reactor, cluster.clients, _admin, node.admin, method, path, body)

    first, second, third = cluster.nodes
    status, _ = await admin(first, "PUT", "/api/v1/pins", {"image": "library/app:1"})
    assert status == 201

    async def pinned_on(node: Node) -> list[str]:
        _, answer = await admin(node, "GET", "/api/v1/pins")
        return [p["image"] for p in answer["pins"]]

    async def pin_everywhere() -> bool:
        pins = [await pinned_on(n) for n in cluster.nodes]
        return pins == [["docker.io/library/app:1"]] * 3

    await _wait_for(pin_everywhere, "the pin on every node")
    status, _ = await admin(
        second, "PUT", "/api/v1/upstreams/mirror.test", {"url": "http://127.0.0.1:9"}
    )
    assert status in (200, 201)

    async def upstream_everywhere() -> bool:
        for node in cluster.nodes:
            status, _ = await admin(node, "GET", "/api/v1/upstreams/mirror.test")
            if status != 200:
                return False
        return True

    await _wait_for(upstream_everywhere, "the upstream on every node")
    status, _ = await admin(third, "DELETE", "/api/v1/pins?image=library/app:1")
    assert status == 204

    async def unpinned_everywhere() -> bool:
        return [await pinned_on(n) for n in cluster.nodes] == [[]] * 3

    await _wait_for(unpinned_everywhere, "the pin gone on every node")


@pytest_twisted.ensureDeferred
async def test_a_node_may_send_clients_to_the_bucket(cluster):
    """cache.storage.redirect: a stored blob not on the node's disk is a 307
    to a presigned URL, which gives the exact bytes without credentials."""
    digest, layer = image(cluster.registry, 200_000)
    path = f"/v2/library/app/blobs/{digest}"
    assert (await cluster.get(cluster.nodes[0], path)).body == layer
    await _wait_for(
        lambda: deferToThreadPool(reactor, cluster.clients, cluster.in_bucket, digest),
        "the object",
    )
    redirecting = await cluster.start("node-r", redirect=True)

    async def redirected() -> Any:
        reply = await cluster.get(redirecting, path)
        return reply if reply.code == 307 else None

    reply = await _wait_for(redirected, "a redirect")
    assert reply.header("Docker-Content-Digest") == digest
    location = reply.header("Location")
    assert location.startswith(cluster.s3.meta.endpoint_url)
    body = await deferToThreadPool(
        reactor, cluster.clients, lambda: urllib.request.urlopen(location, timeout=10).read()
    )
    assert body == layer
    assert not redirecting.local(digest).exists()


@pytest_twisted.ensureDeferred
async def test_a_token_from_one_node_works_on_every_node(cluster, tmp_path):
    """proxy.auth in a cluster: the nodes sign tokens with one key, derived
    from the cluster's shared secret, so a client's token from one node (a
    load balancer may send its next request anywhere) works on the others."""
    users = tmp_path / "htpasswd"
    users.write_text("alice:" + bcrypt.hashpw(b"alice-pw", bcrypt.gensalt(4)).decode() + "\n")
    cluster.registry.add_image("library/app", "1", [b"layer for the login test"])
    auth = {"htpasswd": str(users)}
    first, second = [await cluster.start(f"node-auth-{i}", auth=auth) for i in range(2)]
    path = "/v2/library/app/manifests/1"
    assert (await cluster.get(second, path)).code == 401
    basic = "Basic " + base64.b64encode(b"alice:alice-pw").decode()
    reply = await deferToThreadPool(
        reactor,
        cluster.clients,
        http_request,
        first.url,
        "GET",
        "/token?service=regproxy&scope=repository:library/app:pull",
        {"Authorization": [basic]},
    )
    assert reply.code == 200
    bearer = {"Authorization": ["Bearer " + json.loads(reply.body)["token"]]}
    for node in (first, second):
        reply = await deferToThreadPool(
            reactor, cluster.clients, http_request, node.url, "GET", path, bearer
        )
        assert reply.code == 200, node.name


@pytest_twisted.ensureDeferred
async def test_a_database_that_stops_answering_holds_no_client_past_query_timeout(
    cluster, postgres, monkeypatch
):
    """PostgreSQL stopped (its kernel keeps the connections: neither TCP
    keepalives nor its statement_timeout end that): a request that needs
    the index is answered 503 at query_timeout, /readyz says so at
    PROBE_SECONDS, and the node serves again once the database does."""
    monkeypatch.setattr(node_module, "PROBE_SECONDS", 1.0)
    node = await cluster.start("node-q", query_timeout=1)
    digest, layer = image(cluster.registry, 1000)
    path = f"/v2/library/app/blobs/{digest}"
    assert (await cluster.get(node, path)).code == 200
    with postgres.frozen():
        started = time.monotonic()
        reply = await cluster.get(node, "/v2/library/other/manifests/1")
        waited = time.monotonic() - started
        ready = await deferToThreadPool(
            reactor, cluster.clients, _admin, node.admin, "GET", "/readyz"
        )
    assert (reply.code, json.loads(reply.body)["errors"][0]["code"]) == (503, "UNAVAILABLE")
    assert b"did not answer within 1 s" in reply.body
    assert waited < 10, waited
    assert ready[0] == 503
    assert ready[1]["checks"]["index"] == {"ok": False, "error": "no answer within 1 s"}, ready

    async def served() -> bool:
        return (await cluster.get(node, path)).code == 200

    await _wait_for(served, "the node to serve again")
