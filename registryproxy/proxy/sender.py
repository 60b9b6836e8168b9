"""Stream a byte range of a blob file to a client, possibly while it downloads.

:class:`BlobSender` is a push producer reading with ``pread`` from a
descriptor: a stored blob, or the temp file of a :class:`BlobFetch` that is
still growing.  Until the fetch's digest checks out it holds back the last
byte of the range, so no client ever receives a complete body with wrong
bytes; if the fetch fails the connection is aborted, so the client's
download fails instead of ending short.  A stored blob being hashed again
(its first read since a start: see :mod:`registryproxy.cache.scrub`) is sent
the same way, its last byte waiting for the hash's verdict.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from twisted.web.server import Request
from zope.interface import implementer

from ..cache.blobs import BlobFetch

log = Logger()

CHUNK = 256 * 1024


class BodySender:
    """How a response body ends, for both senders: finished, aborted (the
    client's download fails rather than ending short), or stopped because
    the client left; the file or the fetch it reads is let go once."""

    _request: Request
    _fd: int | None
    _fetch: BlobFetch | None
    _done: bool = False
    #: lets go of a stored blob's descriptor (the cache counts its readers)
    _close_fd: Callable[[int], None] = staticmethod(os.close)
    #: a stored blob's hash is under way: its last byte waits for the verdict
    _pending = False

    def _follow(self) -> None:
        """Called by the fetch when it has more, checked out, or failed."""

    def _hold(self, check: Deferred[bool] | None) -> None:
        """Wait for *check* (whether the stored blob's bytes hash to its
        digest; it never fails) before the last byte; abort if they do not."""
        if check is None:
            return
        self._pending = True
        check.addCallback(self._verdict)

    def _verdict(self, sound: bool) -> None:
        self._pending = False
        if self._done:
            return
        if sound:
            self._checked()
        else:  # quarantined by the check; the client's next try fetches it again
            self._abort()

    def _checked(self) -> None:
        """The stored blob checked out: send the rest."""

    def stopProducing(self) -> None:
        self._close()

    def _finish(self) -> None:
        self._close()
        if self._request.channel is not None:  # None: the client already left
            self._request.unregisterProducer()
            self._request.finish()

    def _abort(self) -> None:
        self._close()
        if self._request.channel is not None:
            self._request.unregisterProducer()
            transport = self._request.channel.transport
            if transport is not None:
                transport.abortConnection()  # type: ignore[attr-defined]

    def _close(self) -> None:
        if self._done:
            return
        self._done = True
        if self._fetch is not None:
            self._fetch.unlisten(self._follow)
        elif self._fd is not None:
            self._close_fd(self._fd)


@implementer(IPushProducer)
class BlobSender(BodySender):
    def __init__(
        self,
        request: Request,
        start: int,
        end: int | None,
        fd: int | None = None,
        fetch: BlobFetch | None = None,
        counted: Callable[[int], None] = lambda n: None,
        close_fd: Callable[[int], None] = os.close,
        check: Deferred[bool] | None = None,
    ) -> None:
        """Send ``[start, end)`` of a stored blob's open *fd* (which this
        closes with *close_fd*) or of a running *fetch*; ``end=None`` means
        until the fetch ends.  *check*: the stored blob's hash under way."""
        assert (fd is None) != (fetch is None)
        self._check = check
        self._request = request
        self._close_fd = close_fd
        self._pos = start
        self._end = end
        self._fetch = fetch
        self._counted = counted
        self._fd = fd
        self._paused = False
        self._following = False
        self._done = False

    def start(self) -> None:
        self._request.registerProducer(self, True)
        self._request.notifyFinish().addErrback(lambda _: self._close())
        if self._fetch is not None:
            self._fetch.listen(self._follow, self._pos)
        self._hold(self._check)
        self._follow()

    def _checked(self) -> None:
        self._follow()

    # IPushProducer
    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        self._follow()

    def _limit(self) -> int:
        if self._fetch is None:
            assert self._end is not None
            return self._end - 1 if self._pending else self._end
        return self._fetch.readable(self._end)

    def _complete(self) -> bool:
        if self._pending or (self._fetch is not None and not self._fetch.verified):
            return False
        return self._pos >= self._limit()

    def _follow(self) -> None:
        if self._done or self._following:
            return
        if self._fetch is not None and self._fetch.abandoned(self._follow):
            self._abort()
            return
        self._following = True
        try:
            while not self._paused and not self._done:
                limit = self._limit()
                if self._pos >= limit:
                    if self._complete():
                        self._finish()
                    return
                try:
                    data = self._read(min(CHUNK, limit - self._pos))
                except (OSError, ValueError) as e:
                    log.error("cannot read blob at {pos}: {why}", pos=self._pos, why=e)
                    data = b""
                if not data:
                    log.error("blob file shorter than expected at {pos}", pos=self._pos)
                    self._abort()
                    return
                self._pos += len(data)
                self._counted(len(data))
                self._request.write(data)
        finally:
            self._following = False

    def _read(self, size: int) -> bytes:
        if self._fetch is not None:
            return self._fetch.read(self._follow, self._pos, size)
        assert self._fd is not None
        return os.pread(self._fd, size, self._pos)
