"""Zero-copy blob bodies: ``os.sendfile`` from the blob file to the client's socket.

Twisted has no sendfile.  Over plain TCP this producer writes the response
headers the usual way, then moves the body from the page cache to the socket
in the kernel, never through Python: a stored blob, or one still downloading
(up to what has been written and checked, as :meth:`BlobFetch.readable`
says).  It lets the transport say when the socket can take more: it marks
itself paused and asks the transport to watch for writability; the
transport resumes its producer (the HTTP channel, which resumes this) once
its own buffer is empty.  Anything else (TLS, a download relayed through
memory, an unknown length) uses :class:`BlobSender`.
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Callable
from typing import Any

from twisted.internet import tcp
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.web.server import Request
from zope.interface import implementer

from ..cache.blobs import BlobFetch
from .sender import BlobSender, BodySender

log = Logger()

#: most bytes handed to one sendfile call
_MAX_CALL = 16 * 1024 * 1024
_SEND_BUFFER = 4 * 1024 * 1024


def socket_transport(request: Request) -> tcp.Server | None:
    """The plain TCP transport under *request*, or None (TLS, HTTP/2, tests).

    TLS is a wrapper too, but what goes under it must be encrypted first:
    the search stops there."""
    transport: Any = request.channel.transport if request.channel else None
    while isinstance(transport, ProtocolWrapper) and not isinstance(
        transport, TLSMemoryBIOProtocol
    ):
        transport = transport.transport
    if isinstance(transport, tcp.Server) and hasattr(os, "sendfile"):
        return transport
    return None


@implementer(IPushProducer)
class SendfileSender(BodySender):
    def __init__(
        self,
        request: Request,
        transport: tcp.Server,
        fd: int,
        start: int,
        end: int,
        counted: Callable[[int], None] = lambda n: None,
        fetch: BlobFetch | None = None,
        close_fd: Callable[[int], None] = os.close,
        check: Deferred[bool] | None = None,
    ) -> None:
        """Send ``[start, end)`` of *fd*: a stored blob's file (which this
        closes with *close_fd*; *check*: its hash under way) or the file of
        a *fetch* still downloading (which stays the fetch's)."""
        self._check = check
        self._request = request
        self._close_fd = close_fd
        self._transport = transport
        self._fd = fd
        self._pos = start
        self._end = end
        self._counted = counted
        self._fetch = fetch
        self._done = False
        #: at the end of what the fetch has so far: woken by the fetch, not the socket
        self._starved = False

    def start(self) -> None:
        # a deeper socket buffer: fewer trips through the reactor per blob
        self._transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SEND_BUFFER)
        self._request.registerProducer(self, True)
        self._request.notifyFinish().addErrback(lambda _: self._close())
        if self._fetch is not None:
            self._fetch.listen(self._follow, self._pos)
        self._hold(self._check)
        if self._done:  # found rotten already: aborted
            return
        self._request.write(b"")  # the status line and headers, through the buffer
        self._wait_writable()

    def _checked(self) -> None:
        if self._starved:
            self._starved = False
            self.resumeProducing()

    def _hand_over(self, fetch: BlobFetch) -> None:
        """The download goes on through memory now (the disk filled up), out
        of sendfile's reach: a producer reading from the fetch takes over
        the rest of the body."""
        successor = BlobSender(
            self._request, self._pos, self._end, fetch=fetch, counted=self._counted
        )
        fetch.listen(successor._follow, self._pos)  # holds this place in the relay meanwhile
        self._done = True
        fetch.unlisten(self._follow)
        self._request.unregisterProducer()
        successor.start()

    def _wait_writable(self) -> None:
        # Once the transport's buffer (the headers, at first) is flushed and
        # the socket is writable, the transport resumes its paused producer.
        self._transport.producerPaused = True
        self._transport.startWriting()

    def _follow(self) -> None:
        """The fetch wrote more, checked out, or failed."""
        if self._done:
            return
        if self._fetch is not None and self._fetch.abandoned(self._follow):
            self._abort()
        elif self._starved:
            self._starved = False
            self.resumeProducing()

    # IPushProducer
    def pauseProducing(self) -> None:
        pass  # nothing goes through the transport's buffer

    def resumeProducing(self) -> None:
        if self._done:
            return
        if self._fetch is not None and self._fetch.relayed:
            self._hand_over(self._fetch)
            return
        sock = self._transport.socket.fileno()
        fd = self._fd
        assert fd is not None
        while True:
            if self._fetch is not None:
                limit = self._fetch.readable(self._end)
            else:
                limit = self._end - 1 if self._pending else self._end
            if self._pos >= limit:
                verified = not self._pending and (self._fetch is None or self._fetch.verified)
                if self._pos >= self._end and verified:
                    self._finish()
                else:
                    self._starved = True
                return
            try:
                sent = os.sendfile(sock, fd, self._pos, min(limit - self._pos, _MAX_CALL))
            except BlockingIOError:
                self._wait_writable()
                return
            except OSError as e:
                if e.errno == errno.EINTR:
                    continue
                log.info("client went away during sendfile: {why}", why=e.strerror)
                self._abort()
                return
            if sent == 0:
                log.error("blob file shorter than expected at {pos}", pos=self._pos)
                self._abort()
                return
            self._pos += sent
            if self._fetch is not None:
                self._fetch.moved(self._follow, self._pos)
            self._counted(sent)
            self._request.sentLength += sent
