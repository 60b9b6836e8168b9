"""What one client may hold: connections, time, request bodies, open files.

:class:`GuardedSite` is a Site for either port that

* refuses a connection past ``max_connections`` at once (closed unread),
  so a flood on one port leaves room for the other and for blob files;
* gives each request ``header_timeout`` seconds from its first byte to its
  last (slowloris), and an idle connection ``idle_timeout`` seconds;
* cuts off a response whose client has taken in nothing for
  ``send_timeout`` seconds, which lets go of the blob file it was reading,
  and a closing connection whose client neither takes the rest nor closes;
* asks a body policy about a request body as soon as the headers say there
  is one, before any of it is read: the refused request is answered at once
  and the connection closed, after reading and dropping what the client
  still sends for a moment (so that it sees the answer, not a reset).
  Accepted bodies are bounded by the policy and kept in memory, never in a
  temporary file;
* neither reads nor answers a connection whose answers wait to be taken
  (twisted.web did both while it answered a request), so that a client
  holds at most one answer and what is read ahead of it;
* sends an answer again to the same request bytes (:class:`Wire`, for the
  proxy port: :attr:`GuardedSite.answers`) before twisted.web parses them.

Connections that are refused or cut off are logged, at most once every
:data:`LOG_EVERY` seconds per reason, with a count of the ones in between.
"""

from __future__ import annotations

import re
import resource
from collections.abc import Callable
from io import BytesIO
from typing import Any

import attrs
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper
from twisted.web import http
from twisted.web.http import HTTPChannel
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAccessLogFormatter
from twisted.web.resource import IResource
from twisted.web.server import Request, Site
from zope.interface import provider

log = Logger()
#: the access log, when it goes to twistd's log
access = Logger(namespace="regproxy.access")

#: seconds between two log lines about the same kind of refusal
LOG_EVERY = 10.0
#: access lines gathered into one entry of twistd's log: for this many
#: seconds, or until this many characters of them wait (an entry costs as
#: much as a cached manifest's answer: its time stamp, its formatting, a
#: write and a flush; a client chooses how long its lines are)
LINES_EVERY = 0.1
LINES_AT_MOST = 256 * 1024
#: files a /v2/ connection may hold: its socket, a blob file, a download's
#: upstream connection (shared by the clients of one download)
FILES_PER_CONNECTION = 3
#: files regproxy keeps for itself: listening sockets, the index, logs, threads
RESERVED_FILES = 64


@attrs.frozen
class Limits:
    max_connections: int
    header_timeout: float
    idle_timeout: float
    send_timeout: float


@attrs.frozen
class Refusal:
    """The answer to a request whose body is not read."""

    status: int
    body: bytes
    headers: dict[bytes, bytes] = attrs.field(factory=dict)


#: ``(method, path, headers, length)`` -> a Refusal, or None to read the
#: body; *length* is None for a chunked body (no length given)
BodyPolicy = Callable[[bytes, bytes, Headers, "int | None"], "Refusal | None"]


def open_files_limit() -> int:
    """Raise the soft limit on open files to the hard one; the limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        except (ValueError, OSError) as e:
            log.warn("cannot raise the open-file limit from {soft}: {why}", soft=soft, why=e)
        else:
            log.info("open-file limit raised from {soft} to {want}", soft=soft, want=want)
            soft = want
    return soft


def fitting_connections(wanted: int, others: int, open_files: int) -> int:
    """How many of *wanted* /v2/ connections fit in *open_files*, leaving
    room for *others* (the admin port's) and regproxy's own files."""
    room = (open_files - others - RESERVED_FILES) // FILES_PER_CONNECTION
    return max(1, min(wanted, room))


class _Throttled:
    """A warning logged at most once every LOG_EVERY seconds."""

    def __init__(self, clock: IReactorTime, format: str) -> None:
        self._clock = clock
        self._format = format
        self._last: float | None = None
        self._held = 0

    def __call__(self, **kwargs: Any) -> None:
        now = self._clock.seconds()
        if self._last is not None and now - self._last < LOG_EVERY:
            self._held += 1
            return
        log.warn(self._format, held=self._held, **kwargs)
        self._last, self._held = now, 0


class GuardedRequest(Request):
    #: set when the body policy refused this request's body
    refusal: Refusal | None = None
    #: the user the request logged in as (proxy.auth), for the access log
    login_user: str | None = None
    #: the request's bytes as they came, when its answer may be sent again
    #: to the same bytes (:class:`Wire`): one whole request in one read,
    #: with no body and no ``Expect``
    head: bytes | None = None
    #: the connection closes after its answer (``Connection: close``, HTTP/1.0)
    closes = False

    def gotLength(self, length: int | None) -> None:
        # the body policy bounded it: in memory, never a temporary file
        self.content = BytesIO()

    def process(self) -> None:
        if self.refusal is None:
            super().process()
            return
        self.setResponseCode(self.refusal.status)
        for name, value in self.refusal.headers.items():
            self.setHeader(name, value)
        self.setHeader(b"Content-Length", b"%d" % len(self.refusal.body))
        self.setHeader(b"Connection", b"close")
        self.write(self.refusal.body)
        self.finish()


#: a password a client put in a URL (the token endpoint refuses it), kept
#: out of the log
_PASSWORD_IN_URL = re.compile(r"([?&;]password=)[^&;\s\"]*", re.IGNORECASE)
#: bytes a log field shows as they are (else escaped as Twisted does)
_SHOWN = re.compile(rb'[^"\\\x00-\x1f\x7f-\xff]*')


def _field(value: bytes) -> str:
    if _SHOWN.fullmatch(value):
        return value.decode("ascii")
    return http._escape(value)  # type: ignore[attr-defined,no-any-return]


@provider(IAccessLogFormatter)
def access_line(timestamp: str, request: Any) -> str:
    """Twisted's combined log format (``combinedLogFormatter``), with the
    user a request logged in as in its third field ("-" for none), and no
    password that was in a URL.  Made here, not by Twisted's, for its cost:
    one line per answer, as many fields escaped as there are."""
    who = _who(request.getClientAddress(), getattr(request, "login_user", None))
    return f"{who} {timestamp} {_what(request)}"


def _who(address: Any, user: str | None) -> str:
    """The access line's fields before its time: the client and its user."""
    host = getattr(address, "host", None)
    if user:
        user = re.sub(r"[^\w.@+-]", lambda m: f"%{ord(m.group()):02X}", user)
    return f'"{_field(host.encode()) if isinstance(host, str) else "-"}" - {user or "-"}'


def _what(request: Any) -> str:
    """The access line's fields after its time: the request and its answer
    (the same for the same request bytes and the same answer)."""
    headers = request.requestHeaders
    referrer = headers.getRawHeaders(b"referer")
    agent = headers.getRawHeaders(b"user-agent")
    line = (
        f'"{_field(request.method)} {_field(request.uri)} '
        f'{_field(request.clientproto)}" '
        f"{request.code} {request.sentLength or '-'} "
        f'"{_field(referrer[-1]) if referrer and referrer[-1] else "-"}" '
        f'"{_field(agent[-1]) if agent and agent[-1] else "-"}"'
    )
    return _PASSWORD_IN_URL.sub(r"\1-", line)


@attrs.frozen
class Wire:
    """An answer as it went on the wire, to send again to the same request
    bytes without twisted.web parsing them (:meth:`GuardedSite.send_again`):
    a mirror's most frequent request, a cached manifest by tag, costs half
    as much that way."""

    #: the status line and the headers, less ``Date`` (made when sent)
    head: bytes
    body: bytes
    #: what the access log says of it after its time (:func:`_what`)
    logged: str
    #: a GET's (a pull), not a HEAD's
    pull: bool
    #: the connection closes after it
    close: bool

    @classmethod
    def of(cls, request: GuardedRequest, body: bytes) -> Wire | None:
        """What was sent to *request*, finished with *body*; None if it
        cannot be sent again as it is."""
        if (
            request.head is None
            or not request.finished
            or request.code != 200
            or request.sentLength != len(body)
        ):
            return None
        lines = [b"%s %d %s\r\n" % (request.clientproto, request.code, request.code_message)]
        for name, values in request.responseHeaders.getAllRawHeaders():
            if name.lower() != b"date":
                lines.extend(b"%s: %s\r\n" % (name, value) for value in values)
        pull = request.method != b"HEAD"
        return cls(b"".join(lines), body, _what(request), pull, request.closes)

    def size(self) -> int:
        return len(self.head) + len(self.body) + len(self.logged)


class GuardedChannel(HTTPChannel):
    site: GuardedSite
    #: when the first byte of the request being received came
    _began: float | None = None
    #: the bytes of the request being parsed, if they came whole in one read
    _head: bytes | None = None
    #: the request's body is refused: what still comes is dropped
    _dropping = False
    #: times the transport took in all we gave it and asked for more
    _drained = 0
    _stalled_since: float | None = None
    _stalled_mark = 0

    def connectionMade(self) -> None:
        self.site.connections.add(self)
        super().connectionMade()

    def connectionLost(self, reason: Any = None) -> None:
        self.site.connections.discard(self)
        super().connectionLost(reason)

    def dataReceived(self, data: bytes) -> None:
        transport: Any = self.transport
        if transport.disconnecting:
            # closing (its last answer, a bad request, a timeout): what more
            # comes is dropped, as twisted.web does, and is no request begun
            # (over TLS, reading goes on until the client's close)
            return
        if not self._handlingRequest:
            self._head = None
            # one whole request, and nothing of another before it
            if data[-4:] == b"\r\n\r\n" and self._between_requests():
                if self.site.send_again(self, data):
                    if self.persistent:
                        self.resetTimeout()
                    return
                if data.find(b"\r\n\r\n") == len(data) - 4:
                    self._head = data
            # a blank line between requests (twisted.web eats one) is no
            # request begun: the idle timeout, not the header deadline
            if self._began is None and (self._buffer or data != b"\r\n"):
                self._began = self.site.clock.seconds()
        super().dataReceived(data)

    def _between_requests(self) -> bool:
        """Whether nothing of a request is held, no request being answered:
        the last one answered, nothing of the next parsed or waiting."""
        return bool(
            # twisted.web's state between requests (2: it has eaten a blank
            # line since the last, which the next request resets and an
            # answer sent again would not)
            # (private: if a Twisted release renames it, none is sent again)
            getattr(self, "_HTTPChannel__first_line", None) == 1
            and not self._buffer
            and not self.paused
            and self.persistent
        )

    def allHeadersReceived(self) -> None:
        request = self.requests[-1]
        head, self._head = self._head, None
        if self.length != 0:
            refusal = self.site.body_policy(
                self._command, self._path, request.requestHeaders, self.length
            )
            if refusal is not None:
                request.refusal = refusal
                request.gotLength(0)
                self.persistent = False
                self.length = 0  # answered now, without the body
                self._transferDecoder = None
                self._dropping = True
                return
        super().allHeadersReceived()
        if (
            head is not None
            and self.length == 0
            and self.site.answers is not None
            and not request.requestHeaders.hasHeader(b"expect")
        ):
            request.head, request.closes = head, not self.persistent

    def allContentReceived(self) -> None:
        if not self._dropping:  # a refused request's header deadline bounds the dropping
            self._began = None
        super().allContentReceived()

    def rawDataReceived(self, data: bytes) -> None:
        if not self._dropping:
            super().rawDataReceived(data)
            # twisted.web stops reading at its bound only while the client
            # takes its answers: one that does not could send without end
            if self._handlingRequest and self._read_ahead():
                self._networkProducer.pauseProducing()

    def requestDone(self, request: Any) -> None:
        if not self._dropping:
            super().requestDone(request)
            return
        # The client may still be sending the body: closing now would reset
        # the connection and lose the answer.  Send it, stop writing, drop
        # what comes until the client closes or the header deadline passes.
        del self.requests[0]
        transport: Any = self.transport
        transport.loseWriteConnection()

    def loseConnection(self) -> None:
        # reading may be paused (an answer not taken yet): TLS must read the
        # client's close to end the connection, or it stays until cut off
        self._networkProducer.resumeProducing()
        super().loseConnection()

    def pauseProducing(self) -> None:
        """The client takes in less than it is sent: answer nothing more
        until it has taken it.  twisted.web read on while it answered a
        request, and answered on every request already read (many come in
        one read): a client sending requests and never reading their
        answers had them pile up in memory without end."""
        super().pauseProducing()
        self.paused = True  # LineReceiver: parse no further request
        self._networkProducer.pauseProducing()  # and read none

    def resumeProducing(self) -> None:
        self._drained += 1
        self.paused = False
        super().resumeProducing()  # reads again if no request is answered
        if self._waitingForTransport:
            return  # the answer's producer filled the transport again at once
        # and while one is: its client may close or send more (within the
        # bound on what is read ahead), and a refused body must be dropped
        if not self._read_ahead():
            self._networkProducer.resumeProducing()
        if self._buffer:  # requests read before the pause
            self.dataReceived(b"")

    def _read_ahead(self) -> bool:
        """Whether the bytes read while a request is answered reached
        twisted.web's bound on them."""
        return sum(map(len, self._dataBuffer)) > self._optimisticEagerReadSize

    def overdue(self, now: float, limits: Limits) -> str | None:
        """Why this connection must go now, if it must."""
        if self._began is not None and now - self._began > limits.header_timeout:
            return f"sent no complete request in {limits.header_timeout:g} s"
        transport: Any = self.transport
        # closing waits for the client too (to take the rest, and over TLS
        # to close): one that never does would hold its place for ever
        closing = transport.disconnecting
        while isinstance(transport, ProtocolWrapper):
            transport = transport.transport
        if not (closing or getattr(transport, "producerPaused", False)):
            self._stalled_since = None
            return None
        # waiting for the client to take in what was sent: some progress?
        mark = self._drained + _buffered(transport)
        if self._stalled_since is None or mark != self._stalled_mark:
            self._stalled_since, self._stalled_mark = now, mark
        elif now - self._stalled_since > limits.send_timeout:
            return f"took in nothing for {limits.send_timeout:g} s"
        return None


def _buffered(transport: Any) -> int:
    """Bytes a TCP transport holds that the socket did not take yet."""
    data = getattr(transport, "dataBuffer", b"")
    return len(data) - getattr(transport, "offset", 0) + getattr(transport, "_tempDataLen", 0)


class GuardedSite(Site):
    """A Site whose clients are held to :class:`Limits` (see the module)."""

    protocol = GuardedChannel  # type: ignore[assignment]

    def __init__(
        self,
        resource: IResource,
        limits: Limits,
        body_policy: BodyPolicy,
        clock: IReactorTime,
        name: str,
        access_log: str = "twistd",
    ) -> None:
        """*access_log*: ``"twistd"`` (a line per request in twistd's log,
        the lines of up to :data:`LINES_EVERY` seconds in one entry),
        ``"off"``, or a file to write the lines to, buffered (flushed every
        second): a tenth of a cached manifest's cost goes to logging it
        through twistd's log."""
        log_path = None if access_log in ("twistd", "off") else access_log
        super().__init__(
            resource,
            requestFactory=GuardedRequest,
            timeout=limits.idle_timeout,
            reactor=clock,
            logPath=log_path,
            logFormatter=access_line,
        )
        self._access_log = access_log
        #: access lines waiting to go into twistd's log, and when they go
        self._lines: list[str] = []
        self._lines_size = 0
        self._lines_due: IDelayedCall | None = None
        self._flusher = LoopingCall(self._flush_log)
        self._flusher.clock = clock
        self.limits = limits
        self.body_policy = body_policy
        self.clock = clock
        self.connections: set[GuardedChannel] = set()
        self._sweeper = LoopingCall(self._sweep)
        self._sweeper.clock = clock
        self._full = _Throttled(
            clock,
            name + ": {limit} connections already, refused one from {client} "
            "({held} more refused since the last line; proxy.max_connections "
            "and admin.max_connections set the limits)",
        )
        self._lost = _Throttled(
            clock,
            name + ": cannot write the access log {path}: {why} "
            "({held} more lines lost since the last line)",
        )
        self._cut = _Throttled(
            clock, name + ": cut off {client}: it {why} ({held} more cut off since the last line)"
        )
        #: answers sent again to the same request bytes (:class:`Wire`)
        self.answers: Callable[[bytes], tuple[Wire, str | None] | None] | None = None
        #: (second, its Date header line and the end of the head)
        self._date: tuple[int, bytes] = (-1, b"")

    def buildProtocol(self, addr: Any) -> Any:
        if len(self.connections) >= self.limits.max_connections:
            self._full(limit=self.limits.max_connections, client=getattr(addr, "host", addr))
            return None  # the port closes it unread
        return super().buildProtocol(addr)

    def startFactory(self) -> None:
        super().startFactory()
        every = min(1.0, self.limits.header_timeout / 4, self.limits.send_timeout / 4)
        self._sweeper.start(every, now=False)
        if self.logPath is not None:
            self._flusher.start(1.0, now=False)

    def stopFactory(self) -> None:
        if self._sweeper.running:
            self._sweeper.stop()
        if self._flusher.running:
            self._flusher.stop()
        self._write_lines()
        super().stopFactory()

    def _openLogFile(self, path: str | bytes) -> Any:
        return open(path, "a", buffering=64 * 1024, newline="\n")  # noqa: SIM115

    def _flush_log(self) -> None:
        if self._logFile is not None:
            try:
                self._logFile.flush()  # type: ignore[attr-defined]
            except OSError as e:
                self._log_failed(e)

    def send_again(self, channel: GuardedChannel, head: bytes) -> bool:
        """Answer the request *head* on *channel* as the same bytes were
        answered a moment ago, if :attr:`answers` has it; it is logged as
        that answer was."""
        found = self.answers(head) if self.answers is not None else None
        if found is None:
            return False
        wire, user = found
        now = int(self.clock.seconds())
        if self._date[0] != now:
            self._date = (now, b"Date: %s\r\n\r\n" % http.datetimeToString(now))
        channel.transport.write(b"".join((wire.head, self._date[1], wire.body)))  # type: ignore[union-attr]
        if wire.close:  # as twisted.web: what more comes is dropped
            channel.persistent = False
            channel.loseConnection()
        if self._access_log != "off":
            who = _who(channel.transport.getPeer(), user)  # type: ignore[union-attr]
            self._log_line(f"{who} {self._logDateTime} {wire.logged}")
        return True

    def log(self, request: Any) -> None:
        if self._access_log != "off":
            self._log_line(self._logFormatter(self._logDateTime, request))

    def _log_line(self, line: str) -> None:
        if self._access_log == "twistd":
            self._lines.append(line)
            self._lines_size += len(line)
            if self._lines_size >= LINES_AT_MOST:
                self._write_lines()
            elif self._lines_due is None:
                self._lines_due = self.clock.callLater(LINES_EVERY, self._write_lines)
            return
        try:
            if self._logFile is not None:
                self._logFile.write(line + "\n")
        except OSError as e:  # a full disk loses log lines, never a response
            self._log_failed(e)

    def _write_lines(self) -> None:
        """The access lines waiting into twistd's log as one entry."""
        if self._lines_due is not None and self._lines_due.active():
            self._lines_due.cancel()
        self._lines_due = None
        lines, self._lines, self._lines_size = self._lines, [], 0
        if lines:
            access.info("{lines}", lines="\n".join(lines))

    def _log_failed(self, why: OSError) -> None:
        self._lost(path=self._access_log, why=why.strerror or why)

    def _sweep(self) -> None:
        now = self.clock.seconds()
        for channel in list(self.connections):
            why = channel.overdue(now, self.limits)
            if why is not None and channel.transport is not None:
                self._cut(client=getattr(channel.transport.getPeer(), "host", "?"), why=why)
                channel.transport.abortConnection()  # type: ignore[attr-defined]
