"""Reading a whole upstream body into memory, bounded in size and in silence.

Manifests, tag lists, referrers, token answers and error documents are read
whole; a hostile or broken upstream must not make that cost unbounded memory
or a connection held forever.  :func:`read_body` refuses a declared
``Content-Length`` past its limit before reading a byte, counts while
reading, gives up after ``idle`` seconds without a byte, and in each case
closes the upstream connection (Twisted's ``readBody`` cannot: the transport
a response body sees has no ``abortConnection``).  Cancelling the Deferred
closes it too.
"""

from __future__ import annotations

from twisted.internet.defer import CancelledError, Deferred, fail
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import PotentialDataLoss, ResponseDone
from twisted.web.iweb import IResponse


class BodyTooLarge(Exception):
    """The body is (or says it is) larger than its limit."""

    def __init__(self, limit: int, declared: int | None = None) -> None:
        self.limit = limit
        self.declared = declared
        size = f"{declared} bytes" if declared is not None else f"more than {limit} bytes"
        super().__init__(f"a body of {size}, past the limit of {limit} bytes")


class BodyStalled(Exception):
    """Nothing arrived for the idle timeout."""

    def __init__(self, idle: float) -> None:
        self.idle = idle
        super().__init__(f"sent nothing for {idle:g}s in the middle of its answer")


def read_body(response: IResponse, limit: int, idle: float, clock: IReactorTime) -> Deferred[bytes]:
    """The whole body of *response*, or a failure: :class:`BodyTooLarge`,
    :class:`BodyStalled`, or whatever ended the connection."""
    length = response.length
    if isinstance(length, int) and length > limit:
        response.deliverBody(_Reader(None, 0, idle, clock, refuse=True))
        return fail(BodyTooLarge(limit, length))
    reader: _Reader
    d: Deferred[bytes] = Deferred(lambda _: reader.abort(CancelledError()))
    reader = _Reader(d, limit, idle, clock)
    response.deliverBody(reader)
    return d


class _Reader(Protocol):
    def __init__(
        self,
        done: Deferred[bytes] | None,
        limit: int,
        idle: float,
        clock: IReactorTime,
        refuse: bool = False,
    ) -> None:
        """*refuse*: close the connection at once, unread."""
        self._done = done
        self._limit = limit
        self._idle = idle
        self._clock = clock
        self._refuse = refuse
        self._chunks: list[bytes] = []
        self._size = 0
        self._timer: IDelayedCall | None = None
        self._failed = False

    def connectionMade(self) -> None:
        if self._refuse:
            self.abort(BodyTooLarge(self._limit))
        else:
            self._timer = self._clock.callLater(self._idle, self._stalled)

    def _stalled(self) -> None:
        self._timer = None
        self.abort(BodyStalled(self._idle))

    def abort(self, why: Exception) -> None:
        """Fail with *why* and close the connection (once)."""
        if self._failed:
            return
        self._failed = True
        self._stop_timer()
        self._chunks = []
        if self.transport is not None:
            self.transport.stopProducing()  # type: ignore[attr-defined]
        if self._done is not None and not self._done.called:
            self._done.errback(Failure(why))

    def dataReceived(self, data: bytes) -> None:
        if self._failed:
            return
        self._size += len(data)
        if self._size > self._limit:
            self.abort(BodyTooLarge(self._limit))
            return
        self._chunks.append(data)
        if self._timer is not None:
            self._timer.reset(self._idle)

    def connectionLost(self, reason: Failure = Failure(ResponseDone())) -> None:
        self._stop_timer()
        if self._failed:
            return
        self._failed = True
        assert self._done is not None  # only a refusing reader has none, and it failed
        if reason.check(ResponseDone, PotentialDataLoss):
            self._done.callback(b"".join(self._chunks))
        else:
            self._done.errback(reason)
        self._chunks = []

    def _stop_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
