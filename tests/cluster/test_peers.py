"""One upstream download per blob for a whole cluster: three nodes in this
process, their membership in a real PostgreSQL, and a fake upstream that
counts its requests."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import pytest_twisted
from fakeregistry import FakeRegistry, Fault
from integration.harness import free_port
from proxyharness import http_request, partial_get
from twisted.internet import reactor
from twisted.internet.defer import gatherResults
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.threads import deferToThread, deferToThreadPool
from twisted.python.threadpool import ThreadPool
from twisted.web.client import Agent
from twisted.web.server import Site

from registryproxy.cluster.membership import Membership
from registryproxy.cluster.peers import Peers, PeersOnly
from registryproxy.config import parse_config
from registryproxy.names import Digest
from registryproxy.proxy.plaintext import PlainHTTPFactory
from registryproxy.tap import Proxy, build_proxy

pytestmark = pytest.mark.cluster


@attrs.define
class Node:
    name: str
    url: str
    internal: str
    proxy: Proxy
    membership: Membership
    ports: list[IListeningPort]
    cache_dir: Path

    def stored(self, digest: str) -> Path:
        d = Digest.parse(digest)
        return self.cache_dir / "blobs" / d.algorithm / d.hex[:2] / d.hex

    async def stop_internal(self) -> None:
        await self.ports.pop(1).stopListening()

    async def stop(self) -> None:
        for port in self.ports:
            await port.stopListening()
        await self.membership.leave()
        await self.proxy.close()


async def start_node(name: str, db: Any, upstream: str, directory: Path) -> Node:
    internal_port = free_port()
    internal = f"http://127.0.0.1:{internal_port}"
    membership = Membership(db, name, internal, reactor, interval=0.2, timeout=5.0)
    await membership.join()
    config = parse_config(
        json.dumps(
            {
                "cache": {"directory": str(directory / name)},
                "upstreams": {"docker.io": {"url": upstream, "read_timeout": 5}},
            }
        )
    )
    peers = Peers(membership, Agent(reactor), reactor, timeout=2.0)
    proxy = build_proxy(config, reactor, peers=peers)
    public = await serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(
        PlainHTTPFactory(proxy.site)
    )
    inside = await serverFromString(reactor, f"tcp:{internal_port}:interface=127.0.0.1").listen(
        Site(PeersOnly(proxy.internal, membership.secret))
    )
    url = f"http://127.0.0.1:{public.getHost().port}"
    return Node(name, url, internal, proxy, membership, [public, inside], directory / name)


@pytest_twisted.async_yield_fixture()
async def cluster(make_database, tmp_path) -> AsyncIterator[tuple[FakeRegistry, list[Node]]]:
    registry = await FakeRegistry.start()
    nodes = []
    for i in range(3):
        db = await make_database()
        nodes.append(await start_node(f"node-{i}", db, registry.url, tmp_path))
    for node in nodes:
        await node.membership.heartbeat()
    yield registry, nodes
    for node in nodes:
        await node.stop()
    await registry.stop()


def image(registry: FakeRegistry, size: int) -> tuple[str, bytes]:
    layer = os.urandom(size)
    _, body = registry.add_image("library/big", "1", [layer])
    digest = json.loads(body)["layers"][0]["digest"]
    return digest, layer


def owner_and_others(nodes: list[Node], digest: str) -> tuple[Node, list[Node]]:
    name = nodes[0].membership.owner(digest).name  # type: ignore[union-attr]
    owner = next(n for n in nodes if n.name == name)
    return owner, [n for n in nodes if n is not owner]


@pytest_twisted.ensureDeferred
async def test_many_clients_on_every_node_cause_one_upstream_download(cluster):
    registry, nodes = cluster
    digest, layer = image(registry, 3 * 1024 * 1024)
    registry.blob_faults[digest] = Fault.slow(chunk=64 * 1024, delay=0.02)
    path = f"/v2/library/big/blobs/{digest}"
    pool = ThreadPool(minthreads=24, maxthreads=24, name="clients")
    pool.start()
    try:
        replies = await gatherResults(
            [
                deferToThreadPool(reactor, pool, http_request, nodes[i % 3].url, "GET", path, {})
                for i in range(24)
            ]
        )
    finally:
        pool.stop()
    assert {r.code for r in replies} == {200}
    assert all(r.body == layer for r in replies)
    assert registry.count("GET", f"/blobs/{digest}") == 1
    for node in nodes:  # each node keeps its copy (for now: a store per node)
        assert node.stored(digest).read_bytes() == layer
    owner, others = owner_and_others(nodes, digest)
    for node in others:  # the others got theirs from the owner, and say so
        reply = await deferToThread(http_request, node.url, "GET", path, {})
        assert (reply.code, reply.header("X-Cache")) == (200, "HIT")


@pytest_twisted.ensureDeferred
async def test_the_internal_port_is_for_nodes_only(cluster):
    registry, nodes = cluster
    digest, _ = image(registry, 1000)
    path = f"/v2/docker.io/library/big/blobs/{digest}"
    for headers in ({}, {"Authorization": ["Bearer wrong"]}, {"Authorization": ["Basic eDp5"]}):
        reply = await deferToThread(http_request, nodes[0].internal, "GET", path, headers)
        assert reply.code == 401
        assert json.loads(reply.body)["errors"][0]["code"] == "UNAUTHORIZED"
    forget = await deferToThread(http_request, nodes[0].internal, "POST", "/_regproxy/forget", {})
    assert forget.code == 401
    secret = {"Authorization": [f"Bearer {nodes[0].membership.secret}"]}
    reply = await deferToThread(http_request, nodes[0].internal, "GET", path, secret)
    assert reply.code == 200


@pytest_twisted.ensureDeferred
async def test_an_owner_that_does_not_answer_is_done_without(cluster):
    registry, nodes = cluster
    digest, layer = image(registry, 100_000)
    owner, others = owner_and_others(nodes, digest)
    await owner.stop_internal()  # gone, though the others still see its heartbeat
    reply = await deferToThread(
        http_request, others[0].url, "GET", f"/v2/library/big/blobs/{digest}", {}
    )
    assert (reply.code, reply.body) == (200, layer)
    assert registry.count("GET", f"/blobs/{digest}") == 1


@pytest_twisted.ensureDeferred
async def test_an_owner_that_accepts_but_stays_silent_is_done_without(cluster):
    """A peer that takes the connection and never answers (hung, not dead):
    after the peer timeout the node fetches the blob itself."""
    registry, nodes = cluster
    digest, layer = image(registry, 100_000)
    owner, others = owner_and_others(nodes, digest)
    port = int(owner.internal.rsplit(":", 1)[1])
    await owner.stop_internal()
    silent = await serverFromString(reactor, f"tcp:{port}:interface=127.0.0.1").listen(
        Factory.forProtocol(Protocol)
    )
    try:
        reply = await deferToThread(
            http_request, others[0].url, "GET", f"/v2/library/big/blobs/{digest}", {}
        )
    finally:
        await silent.stopListening()
    assert (reply.code, reply.body) == (200, layer)
    assert registry.count("GET", f"/blobs/{digest}") == 1


@pytest_twisted.ensureDeferred
async def test_a_failing_download_never_ends_in_a_wrong_200(cluster):
    """Cut mid-blob at the owner: its clients see their download fail, the
    other nodes' clients too or (their node taking the download over) get
    every byte: never a complete 200 with wrong bytes."""
    registry, nodes = cluster
    digest, layer = image(registry, 2 * 1024 * 1024)
    registry.blob_faults[digest] = Fault.truncate(after=1024 * 1024, times=1)
    owner, others = owner_and_others(nodes, digest)
    results = await gatherResults(
        [
            deferToThread(partial_get, node.url, f"/v2/library/big/blobs/{digest}")
            for node in (owner, *others)
        ]
    )
    status, body, short = results[0]
    assert short or status != 200, (status, len(body))
    for status, body, short in results[1:]:
        assert short or status != 200 or body == layer, (status, len(body))
    hexpart = Digest.parse(digest).hex
    assert not owner.stored(digest).exists()
    # and the next request gets it whole
    reply = await deferToThread(
        http_request, others[0].url, "GET", f"/v2/library/big/blobs/{digest}", {}
    )
    assert reply.body == layer
    assert hashlib.sha256(reply.body).hexdigest() == hexpart


@pytest_twisted.ensureDeferred
async def test_the_other_nodes_take_over_a_download_whose_node_gave_out(cluster):
    """The owner's download stalls and is given up mid-blob: the nodes that
    followed it go on from the upstream with a Range request, and their
    clients get every byte."""
    registry, nodes = cluster
    digest, layer = image(registry, 2 * 1024 * 1024)
    registry.blob_faults[digest] = Fault.stall(after=1024 * 1024, times=1)
    owner, others = owner_and_others(nodes, digest)
    results = await gatherResults(
        [
            deferToThread(partial_get, node.url, f"/v2/library/big/blobs/{digest}")
            for node in (owner, *others)
        ]
    )
    status, body, short = results[0]
    assert short or status != 200, (status, len(body))  # the owner gave up
    for status, body, short in results[1:]:
        assert (status, short, body == layer) == (200, False, True)
    ranged = [r for r in registry.requests if r.path.endswith(digest) and r.header("range")]
    assert sorted(r.header("range")[0] for r in ranged) == ["bytes=1048576-"] * len(others)
    for node in others:  # the whole blob is where the clients' bytes came from
        assert node.stored(digest).read_bytes() == layer
