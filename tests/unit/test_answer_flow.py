"""What a connection holds while its client does not take its answers
(registryproxy.proxy.connections): nothing more is read or answered until
it takes them, and it is seen to go as soon as it does."""

from __future__ import annotations

import socket
import time
from typing import Any

import pytest_twisted
from proxyharness import settle, until
from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.internet.threads import deferToThread
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from registryproxy.proxy.connections import GuardedSite, Limits, Wire

LIMITS = Limits(max_connections=100, header_timeout=10.0, idle_timeout=60.0, send_timeout=30.0)
REQUEST = b"GET /v2/a/manifests/1 HTTP/1.1\r\nHost: x\r\n\r\n"


class _Answers(Resource):
    """Answers at once with *body*, as a kept manifest is answered."""

    isLeaf = True

    def __init__(self, body: bytes) -> None:
        super().__init__()
        self.body, self.rendered = body, 0

    def render(self, request: Any) -> bytes:
        self.rendered += 1
        request.setHeader(b"Content-Length", b"%d" % len(self.body))
        return self.body


def _socket_of(transport: Any) -> Any:
    while not hasattr(transport, "socket"):
        transport = transport.transport
    return transport


def _held(transport: Any) -> int:
    return len(transport.dataBuffer) - transport.offset + transport._tempDataLen


async def _listening(site: GuardedSite) -> Any:
    port = reactor.listenTCP(0, site, interface="127.0.0.1")
    return port


async def _small_buffers(site: GuardedSite, port: Any) -> socket.socket:
    """A client connection whose kernel buffers, both ends, take in little.
    (Not tiny: a receive buffer far below the loopback's segment size
    stalls TCP for minutes on its persist timer.)"""
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 128 * 1024)
    client.connect(("127.0.0.1", port.getHost().port))
    await until(lambda: bool(site.connections))
    (channel,) = site.connections
    server = _socket_of(channel.transport)
    server.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 128 * 1024)
    return client


@pytest_twisted.ensureDeferred
async def test_requests_read_in_one_go_are_answered_only_as_they_are_taken():
    """Many requests in one read, never read: twisted.web answered all of
    them into memory (about 50 MiB here, 4 MiB per request with the
    largest manifests)."""
    body = b"m" * (256 * 1024)
    resource = _Answers(body)
    site = GuardedSite(resource, LIMITS, lambda *_: None, reactor, "test", "off")
    port = await _listening(site)
    client = await _small_buffers(site, port)
    try:
        count = 60
        client.sendall(REQUEST * count)
        await until(lambda: resource.rendered > 0)
        await settle(0.5)
        (channel,) = site.connections
        server = _socket_of(channel.transport)
        assert resource.rendered < count / 3
        assert _held(server) <= 2 * server.bufferSize + len(body)

        def read_all() -> int:
            client.settimeout(30)
            wanted = count * (len(body) + 60)
            got = b""
            while got.count(b"HTTP/1.1 200 OK") < count or len(got) < wanted - 60 * count:
                chunk = client.recv(1 << 20)
                if not chunk:
                    break
                got += chunk
            return got.count(b"HTTP/1.1 200 OK")

        assert await deferToThread(read_all) == count  # all answered, once taken
        assert resource.rendered == count
    finally:
        client.close()
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_a_client_that_took_all_and_left_is_seen_to_go_mid_answer():
    """An answer waits for more to send (a blob whose upstream is slow)
    after filling the client's buffers: once the client took it all and
    closed, the connection goes, as it did before reads were paused."""
    lost: list[float] = []

    class Starved(Resource):
        isLeaf = True

        def render(self, request: Any) -> Any:
            request.setHeader(b"Content-Length", b"%d" % (4 << 20))
            request.write(b"x" * (1 << 20))  # the rest when the upstream sends it
            request.notifyFinish().addErrback(lambda _: lost.append(time.monotonic()))
            return NOT_DONE_YET

    site = GuardedSite(Starved(), LIMITS, lambda *_: None, reactor, "test", "off")
    port = await _listening(site)
    client = socket.create_connection(("127.0.0.1", port.getHost().port))
    try:
        client.sendall(b"GET /blob HTTP/1.1\r\nHost: x\r\n\r\n")
        await settle(0.3)  # not read yet: the server's buffer fills, it pauses

        def take_all_and_close() -> float:
            got = 0
            client.settimeout(10)
            while got < (1 << 20) + 40:
                got += len(client.recv(1 << 16))
            time.sleep(0.3)
            client.close()
            return time.monotonic()

        closed = await deferToThread(take_all_and_close)
        await until(lambda: bool(lost), timeout=5)
        assert lost[0] - closed < 2
        await until(lambda: not site.connections, timeout=2)
    finally:
        client.close()
        await port.stopListening()


def test_a_stray_blank_line_then_answers_sent_again_is_no_slow_request():
    """A blank line between requests (which twisted.web eats) started the
    header deadline, and answers sent again never stopped it: a client
    answered each second was cut off as too slow to send a request."""
    clock = Clock()
    resource = _Answers(b"ok")
    site = GuardedSite(resource, LIMITS, lambda *_: None, clock, "test", "off")
    wire = Wire(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n", b"ok", "-", True)
    site.answers = lambda head: (wire, None) if head == REQUEST else None
    channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
    transport = StringTransport()
    channel.makeConnection(transport)
    channel.dataReceived(b"\r\n")
    for _ in range(12):
        clock.advance(1.0)
        channel.dataReceived(REQUEST)
        assert channel.overdue(clock.seconds(), LIMITS) is None
    assert transport.value().count(b"200 OK") == 12
    assert resource.rendered == 1  # the first after the blank line took the whole path
    channel.connectionLost(None)
