"""An in-memory network: the proxy's tests reach regproxy and their fake
registries through it rather than through sockets and threads.

A listener is registered under the address its real port has
(``127.0.0.1:PORT``), so one URL names it on both networks: regproxy's
upstream agent (``build_proxy(connect=NETWORK.endpoints)``) and the harness's
requests connect in memory, while a real client (skopeo, ``http.client`` in a
thread, a test's raw socket) still connects to the port.

A connection is two :class:`_End` transports, which look to the code that
inspects them as a TCP transport does (``producerPaused``, the bytes not
yet sent, as regproxy's send timeout reads them).  What one end writes
reaches the other's protocol on a later turn of the reactor, in order, a
read of at most :data:`CHUNK` bytes a turn; an end whose protocol paused it
gets nothing until it resumes; more than :data:`HIGH` bytes not yet taken
pause the writer's producer (as a full socket buffer does); a close reaches
the other end after what was written before it, and only while it reads
(not paused), an abort drops what was not taken yet; a registered producer
is stopped with the connection.  Only
plain HTTP: TLS listeners stay on sockets.
"""

from __future__ import annotations

import itertools
from collections import deque
from typing import Any

from twisted.internet import error
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import (
    IConsumer,
    IProtocol,
    IProtocolFactory,
    IPushProducer,
    IStreamClientEndpoint,
    ITCPTransport,
)
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import URI
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

#: bytes written and not yet taken past which the writer's producer is paused
HIGH = 64 * 1024
#: most bytes given to a protocol at a time (a socket's read)
CHUNK = 64 * 1024


@implementer(ITCPTransport, IConsumer, IPushProducer)
class _End:
    """One side of an in-memory connection: its protocol writes here."""

    def __init__(self, network: MemoryNetwork, host: IPv4Address, peer: IPv4Address) -> None:
        self._network = network
        self._host = host
        self._peer = peer
        self.protocol: IProtocol
        self.other: _End
        self.connected = True
        self.disconnecting = False
        self.disconnected = False
        #: written by this end's protocol, not yet given to the other's
        self.written: deque[memoryview] = deque()
        self.buffered = 0
        #: this end's protocol asked to be given nothing for now
        self.paused = False
        #: (this end's reason, the other end's) once closed
        self.reasons: tuple[Exception, Exception] | None = None
        self._aborted = False
        self.producer: Any = None
        self.streaming = False
        #: as FileDescriptor's: the producer was paused for a full buffer
        self.producerPaused = False

    # ITransport
    @property
    def _tempDataLen(self) -> int:  # noqa: N802 (read as FileDescriptor's)
        """Bytes written and not taken yet, where a TCP transport counts them."""
        return self.buffered

    def write(self, data: bytes) -> None:
        # after loseConnection too, as TCP sends what comes before the close
        if self.disconnected or (self.reasons is not None and self._aborted) or not data:
            return
        self.written.append(memoryview(bytes(data)))
        self.buffered += len(data)
        if self.producer is not None and self.streaming and self.buffered > HIGH:
            if not self.producerPaused:
                self.producerPaused = True
                self.producer.pauseProducing()
        self._network.soon(self)

    def writeSequence(self, data: Any) -> None:
        self.write(b"".join(data))

    def loseConnection(self) -> None:
        self._close(error.ConnectionDone("closed"), error.ConnectionDone("closed by the peer"))

    def abortConnection(self) -> None:
        """Closed at once: what the other end did not take yet is lost."""
        if self.reasons is None:
            self.written.clear()
            self.buffered = 0
            self._aborted = True
        self._close(error.ConnectionAborted(), error.ConnectionLost("aborted by the peer"))

    def loseWriteConnection(self) -> None:
        self.loseConnection()

    def _close(self, mine: Exception, theirs: Exception) -> None:
        if self.disconnecting:
            return
        self.disconnecting = True
        self.reasons = (mine, theirs)
        self._network.soon(self)

    def getPeer(self) -> IPv4Address:
        return self._peer

    def getHost(self) -> IPv4Address:
        return self._host

    # ITCPTransport's options: nothing to set in memory
    def getTcpNoDelay(self) -> bool:
        return True

    def setTcpNoDelay(self, enabled: bool) -> None:
        pass

    def getTcpKeepAlive(self) -> bool:
        return False

    def setTcpKeepAlive(self, enabled: bool) -> None:
        pass

    # IPushProducer: this end's protocol taking what the other end wrote
    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        if self.paused:
            self.paused = False
            self._network.soon(self.other)

    def stopProducing(self) -> None:
        self.loseConnection()

    # IConsumer
    def registerProducer(self, producer: Any, streaming: bool) -> None:
        if self.producer is not None:
            raise RuntimeError(f"{self!r} already has a producer: {self.producer!r}")
        self.producer = producer
        self.streaming = streaming
        self.producerPaused = False
        if not streaming:
            self._network.soon(self)

    def unregisterProducer(self) -> None:
        self.producer = None
        if self.reasons is not None:  # a close that waited for it
            self._network.soon(self)

    def deliver(self) -> None:
        """Give the other end's protocol a read of what this end wrote (the
        rest on a later turn).  Closed, this end ends at once if aborted,
        else once the other has taken all; the other end sees it once it
        has taken all and reads.  Open, ask this end's producer for more
        once all is taken."""
        other = self.other
        if self.written and not other.disconnected:
            if other.paused:
                return  # its resumeProducing brings us back
            other.protocol.dataReceived(self._read())
            if self.written:
                self._network.soon(self)
                return
        if other.disconnected:  # nobody takes it
            self.written.clear()
            self.buffered = 0
        if self.reasons is not None:
            mine, theirs = self.reasons
            waiting = self.producer is not None and (not self.streaming or self.producerPaused)
            if not self._aborted and not self.written and waiting and not self.disconnected:
                # as a TCP transport: a close waits for a pull producer's end
                self.producerPaused = False
                self.producer.resumeProducing()
                return
            if not self.disconnected and (self._aborted or not self.written):
                self._lose(mine)
            if not other.disconnected and not other.paused and not self.written:
                other._lose(theirs)
            return
        if self.producer is not None and not self.written:
            if not self.streaming:
                self.producer.resumeProducing()
            elif self.producerPaused:
                self.producerPaused = False
                self.producer.resumeProducing()

    def _lose(self, reason: Exception) -> None:
        """This end's connection is gone: its producer stopped, as a TCP
        transport does first, then its protocol told."""
        self.connected = False
        self.disconnecting = True
        self.disconnected = True
        if self.producer is not None:
            producer, self.producer = self.producer, None
            producer.stopProducing()
        self.protocol.connectionLost(Failure(reason))

    def _read(self) -> bytes:
        """Up to CHUNK bytes of what was written, taken off it."""
        pieces: list[memoryview] = []
        wanted = CHUNK
        while self.written and wanted > 0:
            piece = self.written.popleft()
            if len(piece) > wanted:
                self.written.appendleft(piece[wanted:])
                piece = piece[:wanted]
            pieces.append(piece)
            wanted -= len(piece)
        data = b"".join(pieces)
        self.buffered -= len(data)
        return data

    def __repr__(self) -> str:
        return f"<memory {self._host.port}->{self._peer.port}>"


@implementer(IStreamClientEndpoint)
class _Endpoint:
    def __init__(self, network: MemoryNetwork, host: str, port: int) -> None:
        self._network = network
        self._host = host
        self._port = port

    def connect(self, factory: IProtocolFactory) -> Deferred[IProtocol]:
        return self._network.connect(self._host, self._port, factory)


@implementer(IAgentEndpointFactory)
class _Endpoints:
    """Memory for the addresses registered; *fallback* for the rest."""

    def __init__(self, network: MemoryNetwork, fallback: IAgentEndpointFactory | None) -> None:
        self._network = network
        self._fallback = fallback

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        host = uri.host.decode("ascii")
        if uri.scheme == b"http" and self._network.listening(host, uri.port):
            return _Endpoint(self._network, host, uri.port)
        if self._fallback is None:
            raise error.ConnectionRefusedError(f"nothing listens on {host}:{uri.port} in memory")
        return self._fallback.endpointForURI(uri)


class MemoryNetwork:
    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor
        self._listeners: dict[tuple[str, int], IProtocolFactory] = {}
        self._due: dict[_End, None] = {}
        self._pumping = False
        self._client_ports = itertools.count(20000)

    def serve(self, host: str, port: int, factory: IProtocolFactory) -> None:
        """Connections to *host*:*port* in memory go to *factory*."""
        self._listeners[(host, port)] = factory

    def forget(self, host: str, port: int) -> None:
        self._listeners.pop((host, port), None)

    def listening(self, host: str, port: int) -> bool:
        return (host, port) in self._listeners

    def endpoints(self, fallback: IAgentEndpointFactory | None = None) -> IAgentEndpointFactory:
        """An agent's endpoints: in memory where something listens here,
        else *fallback*'s (regproxy's ``connect``: see ``build_proxy``)."""
        return _Endpoints(self, fallback)

    def connect(self, host: str, port: int, factory: IProtocolFactory) -> Deferred[IProtocol]:
        server_factory = self._listeners.get((host, port))
        if server_factory is None:
            return fail(error.ConnectionRefusedError(f"{host}:{port} in memory"))
        local = IPv4Address("TCP", "127.0.0.1", next(self._client_ports))
        remote = IPv4Address("TCP", host, port)
        client = factory.buildProtocol(remote)
        if client is None:
            return fail(error.ConnectionRefusedError("the client factory refused"))
        server = server_factory.buildProtocol(local)
        near, far = _End(self, local, remote), _End(self, remote, local)
        near.other, far.other = far, near
        near.protocol = client
        if server is None:  # a listener refusing a connection closes it at once
            far.protocol = Protocol()  # does nothing
            far.loseConnection()
        else:
            far.protocol = server
            server.makeConnection(far)
        client.makeConnection(near)
        return succeed(client)

    def soon(self, end: _End) -> None:
        self._due[end] = None
        if not self._pumping:
            self._pumping = True
            self._reactor.callLater(0, self._pump)

    def _pump(self) -> None:
        self._pumping = False
        due, self._due = self._due, {}
        for end in due:
            end.deliver()


def _network() -> MemoryNetwork:
    from twisted.internet import reactor

    return MemoryNetwork(reactor)


#: the test process's one network: every harness and fake registry registers here
NETWORK = _network()
