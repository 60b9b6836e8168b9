"""The in-memory network behaves as loopback TCP does where the tests lean on it.

Each behaviour runs the same protocols over both and expects what TCP does:
a test that passes in memory then says something about sockets too."""

from __future__ import annotations

import http.client
from collections.abc import Callable
from typing import Any

import pytest
import pytest_twisted
from memorynet import MemoryNetwork
from proxyharness import _Once, _ReadAll, until
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPullProducer, IPushProducer
from twisted.internet.protocol import ClientCreator, Factory, Protocol
from twisted.internet.task import deferLater
from twisted.python.failure import Failure
from zope.interface import implementer

KINDS = ["memory", "tcp"]


class _Server(Protocol):
    def __init__(self, made: Callable[[Any], None]) -> None:
        self._made = made
        self.lost: Deferred[str] = Deferred()

    def connectionMade(self) -> None:
        self._made(self)

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        self.lost.callback(reason.type.__name__)  # type: ignore[union-attr]


class _Client(Protocol):
    def __init__(self) -> None:
        self.got: list[bytes] = []
        self.done: Deferred[tuple[bytes, str]] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.got.append(data)

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        self.done.callback((b"".join(self.got), reason.type.__name__))  # type: ignore[union-attr]


async def _pair(kind: str, made: Callable[[Any], None]) -> tuple[_Client, _Server]:
    servers: list[_Server] = []

    def server() -> _Server:
        servers.append(_Server(made))
        return servers[-1]

    factory = Factory.forProtocol(server)  # type: ignore[arg-type]
    client = _Client()
    if kind == "memory":
        network = MemoryNetwork(reactor)
        network.serve("127.0.0.1", 1, factory)
        await network.connect("127.0.0.1", 1, _Once(client))
    else:
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")  # type: ignore[attr-defined]
        await ClientCreator(reactor, lambda: client).connectTCP(  # type: ignore[arg-type]
            "127.0.0.1", port.getHost().port
        )
        client.done.addBoth(lambda result: port.stopListening().addCallback(lambda _: result))
    await until(lambda: bool(servers))
    return client, servers[0]


@implementer(IPushProducer)
class _Push:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def pauseProducing(self) -> None:
        self.calls.append("pause")

    def resumeProducing(self) -> None:
        self.calls.append("resume")

    def stopProducing(self) -> None:
        self.calls.append("stop")


@implementer(IPullProducer)
class _Pull:
    def __init__(self, transport: Any) -> None:
        self._transport = transport
        self._sent = 0

    def resumeProducing(self) -> None:
        self._sent += 1
        if self._sent <= 3:
            self._transport.write(b"p%d" % self._sent)
        else:
            self._transport.unregisterProducer()

    def stopProducing(self) -> None:
        pass


@pytest.mark.parametrize("kind", KINDS)
@pytest_twisted.ensureDeferred
async def test_what_is_written_before_a_close_and_after_it_arrives(kind):
    def made(server: _Server) -> None:
        server.transport.write(b"a")  # type: ignore[union-attr]
        server.transport.loseConnection()  # type: ignore[union-attr]
        server.transport.write(b"b")  # type: ignore[union-attr]

    client, _ = await _pair(kind, made)
    assert await client.done == (b"ab", "ConnectionDone")


@pytest.mark.parametrize("kind", KINDS)
@pytest_twisted.ensureDeferred
async def test_an_abort_drops_what_was_not_sent(kind):
    def made(server: _Server) -> None:
        server.transport.write(b"x" * 8 * 1024 * 1024)  # type: ignore[union-attr]
        server.transport.abortConnection()  # type: ignore[union-attr]

    client, _ = await _pair(kind, made)
    data, why = await client.done
    assert (len(data) < 8 * 1024 * 1024, why) == (True, "ConnectionLost")


@pytest.mark.parametrize("kind", KINDS)
@pytest_twisted.ensureDeferred
async def test_a_producer_is_stopped_with_its_connection_and_registered_once(kind):
    first = _Push()
    refused: list[str] = []

    def made(server: _Server) -> None:
        server.transport.registerProducer(first, True)  # type: ignore[union-attr]
        with pytest.raises(RuntimeError):
            server.transport.registerProducer(_Push(), True)  # type: ignore[union-attr]
        refused.append("again")

    client, server = await _pair(kind, made)
    client.transport.loseConnection()  # type: ignore[union-attr]
    await server.lost
    assert (first.calls, refused) == (["stop"], ["again"])


@pytest.mark.parametrize("kind", KINDS)
@pytest_twisted.ensureDeferred
async def test_a_close_is_seen_only_by_an_end_that_reads(kind):
    def made(server: _Server) -> None:
        server.transport.pauseProducing()  # type: ignore[union-attr]

    client, server = await _pair(kind, made)
    client.transport.loseConnection()  # type: ignore[union-attr]
    await deferLater(reactor, 0.1, lambda: None)
    assert not server.lost.called
    server.transport.resumeProducing()  # type: ignore[union-attr]
    assert await server.lost == "ConnectionDone"


@pytest.mark.parametrize("kind", KINDS)
@pytest_twisted.ensureDeferred
async def test_a_close_waits_for_a_pull_producer_to_finish(kind):
    def made(server: _Server) -> None:
        server.transport.registerProducer(_Pull(server.transport), False)  # type: ignore[union-attr]
        server.transport.loseConnection()  # type: ignore[union-attr]

    client, _ = await _pair(kind, made)
    assert await client.done == (b"p1p2p3", "ConnectionDone")


@pytest_twisted.ensureDeferred
async def test_regproxy_cuts_a_client_in_memory_that_stops_reading(fake_registry, make_proxy):
    """proxy.send_timeout reads what a TCP transport holds unsent: the
    memory transport says it in the same words."""
    data = b"x" * 16 * 1024 * 1024
    digest = fake_registry.add_blob(data)
    proxy = await make_proxy(fake_registry.url, top={"proxy": {"send_timeout": 0.3}})
    path = f"/v2/library/x/blobs/{digest}"
    assert (await proxy.get(path)).code == 200
    from memorynet import NETWORK

    read = _ReadAll()
    taken = read.dataReceived

    def once_then_stop(data: bytes) -> None:
        taken(data)
        read.transport.pauseProducing()  # type: ignore[union-attr]

    read.dataReceived = once_then_stop  # type: ignore[method-assign]
    port = int(proxy.url.rsplit(":", 1)[1])
    await NETWORK.connect("127.0.0.1", port, _Once(read))
    transport = await read.transport_ready
    transport.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    await until(lambda: len(proxy.proxy.site.connections) == 1)
    await until(lambda: len(proxy.proxy.site.connections) == 0, timeout=5)


@pytest_twisted.ensureDeferred
async def test_a_body_read_to_the_end_of_a_cut_connection_is_not_whole():
    """A response without Content-Length ends with its connection: cut
    (an abort), a socket's reader gets ECONNRESET, and the harness's
    memory_request a short read, not a body that looks whole."""
    from memorynet import NETWORK
    from proxyharness import memory_request

    class Cut(Protocol):
        def dataReceived(self, data: bytes) -> None:
            self.transport.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\npartial")  # type: ignore[union-attr]
            # once taken (an abort drops what was not)
            reactor.callLater(0.05, self.transport.abortConnection)  # type: ignore[union-attr]

    NETWORK.serve("127.0.0.1", 2, Factory.forProtocol(Cut))
    try:
        with pytest.raises(http.client.IncompleteRead):
            await memory_request("http://127.0.0.1:2", "GET", "/", {})
    finally:
        NETWORK.forget("127.0.0.1", 2)
