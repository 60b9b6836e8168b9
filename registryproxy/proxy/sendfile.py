"""Zero-copy cache hits: ``os.sendfile`` from the blob file to the client's socket.

Twisted has no sendfile.  For a stored blob over plain TCP this producer
writes the response headers the usual way, then moves the body from the
page cache to the socket in the kernel, never through Python.  It lets the
transport tell it when the socket can take more: it marks itself paused and
asks the transport to watch for writability; the transport resumes its
producer (the HTTP channel, which resumes this) once its own buffer is empty.
Anything else (TLS, a fetch still downloading) uses :class:`BlobSender`.
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Callable
from typing import Any

from twisted.internet import tcp
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper
from twisted.web.server import Request
from zope.interface import implementer

log = Logger()

#: most bytes handed to one sendfile call
_MAX_CALL = 16 * 1024 * 1024
_SEND_BUFFER = 4 * 1024 * 1024


def socket_transport(request: Request) -> tcp.Server | None:
    """The plain TCP transport under *request*, or None (TLS, HTTP/2, tests)."""
    transport: Any = request.channel.transport if request.channel else None
    while isinstance(transport, ProtocolWrapper):
        transport = transport.transport
    if isinstance(transport, tcp.Server) and hasattr(os, "sendfile"):
        return transport
    return None


@implementer(IPushProducer)
class SendfileSender:
    def __init__(
        self,
        request: Request,
        transport: tcp.Server,
        fd: int,
        start: int,
        end: int,
        counted: Callable[[int], None] = lambda n: None,
    ) -> None:
        """Send ``[start, end)`` of the open file *fd* (which this closes)."""
        self._request = request
        self._transport = transport
        self._fd = fd
        self._pos = start
        self._end = end
        self._counted = counted
        self._done = False

    def start(self) -> None:
        # a deeper socket buffer: fewer trips through the reactor per blob
        self._transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SEND_BUFFER)
        self._request.registerProducer(self, True)
        self._request.notifyFinish().addErrback(lambda _: self._close())
        self._request.write(b"")  # the status line and headers, through the buffer
        self._wait_writable()

    def _wait_writable(self) -> None:
        # Once the transport's buffer (the headers, at first) is flushed and
        # the socket is writable, the transport resumes its paused producer.
        self._transport.producerPaused = True
        self._transport.startWriting()

    # IPushProducer
    def pauseProducing(self) -> None:
        pass  # nothing goes through the transport's buffer

    def resumeProducing(self) -> None:
        if self._done:
            return
        sock = self._transport.socket.fileno()
        while self._pos < self._end:
            try:
                sent = os.sendfile(sock, self._fd, self._pos, min(self._end - self._pos, _MAX_CALL))
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
            self._counted(sent)
            self._request.sentLength += sent

        self._close()
        self._request.unregisterProducer()
        self._request.finish()

    def stopProducing(self) -> None:
        self._close()

    def _abort(self) -> None:
        self._close()
        self._request.unregisterProducer()
        self._transport.abortConnection()

    def _close(self) -> None:
        if not self._done:
            self._done = True
            os.close(self._fd)
