"""What a connection holds while its client does not take its answers
(registryproxy.proxy.connections): nothing more is read or answered until
it takes them, and it is seen to go as soon as it does."""

from __future__ import annotations

import os
import socket
import ssl
import time
from typing import Any

import pytest
import pytest_twisted
from proxyharness import settle, until
from tlscerts import CA
from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.endpoints import serverFromString
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.internet.threads import deferToThread
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from registryproxy.proxy.connections import GuardedSite, Limits, Wire
from registryproxy.proxy.sender import BlobSender

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


def _in_memory(again: bytes | None, close: bool = False) -> tuple[Clock, GuardedSite, _Answers]:
    """A site on a fake clock answering b"ok", and answering the request
    bytes *again* as sent again (``Connection: close`` if *close*)."""
    clock = Clock()
    resource = _Answers(b"ok")
    site = GuardedSite(resource, LIMITS, lambda *_: None, clock, "test", "off")
    ending = b"Connection: close\r\n" if close else b""
    wire = Wire(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n" + ending, b"ok", "-", True, close)
    site.answers = lambda head: (wire, None) if head == again else None
    return clock, site, resource


def _connected(site: GuardedSite) -> tuple[Any, StringTransport]:
    channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
    transport = StringTransport()
    channel.makeConnection(transport)
    return channel, transport


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
    clock, site, resource = _in_memory(REQUEST)
    channel, transport = _connected(site)
    channel.dataReceived(b"\r\n")
    for _ in range(12):
        clock.advance(1.0)
        channel.dataReceived(REQUEST)
        assert channel.overdue(clock.seconds(), LIMITS) is None
    assert transport.value().count(b"200 OK") == 12
    channel.connectionLost(None)


def test_a_stray_blank_line_is_no_request_begun():
    """A client idle after a blank line has the idle timeout, not the
    header deadline (it was cut off after 10 s as too slow)."""
    clock, site, _ = _in_memory(None)
    channel, _ = _connected(site)
    channel.dataReceived(b"\r\n")
    clock.advance(LIMITS.header_timeout + 1)
    assert channel.overdue(clock.seconds(), LIMITS) is None
    channel.dataReceived(b"GET / HTTP/1.1\r\n")  # a request begun is held to it
    clock.advance(LIMITS.header_timeout + 1)
    assert channel.overdue(clock.seconds(), LIMITS) is not None
    channel.connectionLost(None)


@pytest_twisted.ensureDeferred
async def test_a_client_flooding_while_a_blob_waits_to_be_taken_is_not_read(tmp_path):
    """A blob streamed through memory (TLS, a download relayed) fills the
    transport again as soon as it drains: reading must not go on meanwhile,
    or a client that stops taking it and sends without end is buffered
    without end."""
    size = 64 << 20
    blob = tmp_path / "blob"
    with blob.open("wb") as f:
        f.truncate(size)

    class Blob(Resource):
        isLeaf = True

        def render(self, request: Any) -> Any:
            request.setHeader(b"Content-Length", b"%d" % size)
            BlobSender(request, 0, size, fd=os.open(blob, os.O_RDONLY)).start()
            return NOT_DONE_YET

    site = GuardedSite(Blob(), LIMITS, lambda *_: None, reactor, "test", "off")
    port = await _listening(site)
    client = await _small_buffers(site, port)
    flood = b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n" * 2000
    try:
        client.sendall(b"GET /blob HTTP/1.1\r\nHost: x\r\n\r\n")

        def take_some_then_flood() -> int:
            client.settimeout(10)
            got = 0
            while got < (2 << 20):  # the transport drains: it reads again
                got += len(client.recv(1 << 16))
            time.sleep(0.3)  # stop taking: the transport fills and pauses
            sent = 0
            client.setblocking(False)
            deadline = time.monotonic() + 1.5
            while time.monotonic() < deadline:
                try:
                    sent += client.send(flood)
                except BlockingIOError:
                    time.sleep(0.01)
            return sent

        sent = await deferToThread(take_some_then_flood)
        (channel,) = site.connections
        held = len(channel._buffer) + sum(map(len, channel._dataBuffer))
        assert held <= 2 * 64 * 1024, (held, sent)
    finally:
        client.close()
        await port.stopListening()


def test_answers_sent_again_around_blank_lines_are_all_answered():
    """twisted.web eats one blank line between requests; an answer sent
    again after it left that noted, and the next blank line was a 400."""
    _, site, _ = _in_memory(REQUEST)
    channel, transport = _connected(site)
    for data in (REQUEST, b"\r\n", REQUEST, b"\r\n", REQUEST):
        channel.dataReceived(data)
    assert transport.value().count(b"200 OK") == 3
    assert b" 400 " not in transport.value()
    channel.connectionLost(None)


@pytest_twisted.ensureDeferred
async def test_a_closing_answer_too_big_to_send_at_once_ends_its_tls_connection(tmp_path):
    """Reading was paused while the answer waited to be taken, and TLS must
    read the client's close: the connection stayed until cut off as stalled
    (30 s), holding its place under max_connections."""
    authority = CA.make()
    (tmp_path / "server.pem").write_bytes(authority.issue(ips=["127.0.0.1"]))
    (tmp_path / "ca.pem").write_bytes(authority.pem)
    body = b"m" * (3 << 20)
    site = GuardedSite(_Answers(body), LIMITS, lambda *_: None, reactor, "test", "off")
    server = tmp_path / "server.pem"
    port = await serverFromString(
        reactor, f"ssl:0:interface=127.0.0.1:privateKey={server}:certKey={server}"
    ).listen(site)
    context = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))

    def fetch() -> int:
        raw = socket.create_connection(("127.0.0.1", port.getHost().port), timeout=10)
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as client:
            client.sendall(REQUEST.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n"))
            time.sleep(0.3)  # not taken yet: the transport fills, reading pauses
            got = b""
            while chunk := client.recv(1 << 16):
                got += chunk
            return len(got)

    try:
        assert await deferToThread(fetch) > len(body)
        await until(lambda: not site.connections, timeout=3)
    finally:
        await port.stopListening()


def test_what_comes_after_a_closing_answer_is_dropped_and_begins_nothing():
    """As twisted.web drops it; it started the header deadline, and a TLS
    connection (which reads until the client's close) was cut off as a
    client too slow to send its request."""
    closing = REQUEST.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n")
    clock, site, resource = _in_memory(closing, close=True)
    for first in (closing.replace(b"/v2/a", b"/v2/b"), closing):  # whole path, sent again
        channel, transport = _connected(site)
        channel.dataReceived(first)
        assert transport.value().count(b"200 OK") == 1 and transport.disconnecting
        channel.dataReceived(b"GET /v2/a/manifests/2 HTTP/1.1\r\nHost: x\r\n")
        clock.advance(LIMITS.header_timeout + 1)
        assert channel.overdue(clock.seconds(), LIMITS) is None
        assert transport.value().count(b"HTTP/1.1") == 1
        channel.connectionLost(None)
    assert resource.rendered == 1


@pytest.mark.parametrize("then", ["sends-more-and-closes", "stays-silent"])
@pytest_twisted.ensureDeferred
async def test_a_tls_client_after_a_closing_answer_is_let_go(tmp_path, then):
    """Over TLS a closing connection reads on until the client's close:
    what the client sent after the answer (past the read-ahead bound, which
    paused reading) held it for ever, and so did a client that never
    closes (the idle timeout is off while a request is answered)."""
    limits = Limits(max_connections=10, header_timeout=1.0, idle_timeout=1.0, send_timeout=1.0)
    authority = CA.make()
    server = tmp_path / "server.pem"
    server.write_bytes(authority.issue(ips=["127.0.0.1"]))
    (tmp_path / "ca.pem").write_bytes(authority.pem)
    site = GuardedSite(_Answers(b"ok"), limits, lambda *_: None, reactor, "test", "off")
    port = await serverFromString(
        reactor, f"ssl:0:interface=127.0.0.1:privateKey={server}:certKey={server}"
    ).listen(site)
    context = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
    raw = socket.create_connection(("127.0.0.1", port.getHost().port), timeout=10)
    client = context.wrap_socket(raw, server_hostname="127.0.0.1", do_handshake_on_connect=False)

    def ask() -> bytes:
        client.do_handshake()
        client.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        answer = client.recv(4096)
        if then == "sends-more-and-closes":
            client.sendall(b"x" * 40_000)
            client.close()
        return answer

    try:
        assert b"200 OK" in await deferToThread(ask)
        await until(lambda: not site.connections, timeout=5)
    finally:
        client.close()
        await port.stopListening()
