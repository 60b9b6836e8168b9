"""Run regproxy in the test's reactor against a FakeRegistry.

It listens on a real 127.0.0.1 port, and in memory at the same address
(:mod:`memorynet`): its upstream connections and the harness's requests
(:meth:`RunningProxy.request`) go through memory, real clients and the
threads of :func:`get_in_thread` through the port."""

from __future__ import annotations

import http.client
import io
import json
import os
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import attrs
from memorynet import NETWORK
from twisted.internet import error, reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort, IReactorTime
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.task import Clock, deferLater
from twisted.internet.threads import deferToThread
from twisted.python.failure import Failure

from registryproxy.config import parse_config
from registryproxy.proxy.plaintext import PlainHTTPFactory
from registryproxy.tap import Proxy, build_proxy


@attrs.frozen
class Reply:
    code: int
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        values = [v for k, v in self.headers if k.lower() == name.lower()]
        return values[-1] if values else None


def http_request(url: str, method: str, path: str, headers: dict[str, list[str]]) -> Reply:
    """Blocking, verbatim HTTP: repeated headers go out as separate lines, and
    a body cut short raises ``http.client.IncompleteRead``."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    try:
        conn.putrequest(method, path, skip_accept_encoding=True)
        for name, values in headers.items():
            for value in values:
                conn.putheader(name, value)
        conn.endheaders()
        response = conn.getresponse()
        return Reply(response.status, response.getheaders(), response.read())
    finally:
        conn.close()


@attrs.define
class RunningProxy:
    url: str
    cache_dir: Path
    proxy: Proxy
    port: IListeningPort
    stopped: bool = False

    def request(
        self, method: str, path: str, headers: dict[str, list[str]] | None = None
    ) -> Deferred[Reply]:
        """*method* *path* in memory (:func:`memory_request`)."""
        return Deferred.fromCoroutine(memory_request(self.url, method, path, headers or {}))

    def get(self, path: str, **headers: list[str]) -> Deferred[Reply]:
        return self.request("GET", path, _h(headers))

    def head(self, path: str, **headers: list[str]) -> Deferred[Reply]:
        return self.request("HEAD", path, _h(headers))

    def socket_get(self, path: str, **headers: list[str]) -> Deferred[Reply]:
        """GET over the port, from a thread: for what needs a socket (sendfile)."""
        return deferToThread(http_request, self.url, "GET", path, _h(headers))

    def blob_path(self, digest: str) -> Path:
        algorithm, hexpart = digest.split(":")
        return self.cache_dir / "blobs" / algorithm / hexpart[:2] / hexpart

    async def stop(self) -> None:
        if self.stopped:
            return
        self.stopped = True
        NETWORK.forget("127.0.0.1", self.port.getHost().port)
        await self.port.stopListening()
        await self.proxy.close()


async def memory_request(url: str, method: str, path: str, headers: dict[str, list[str]]) -> Reply:
    """:func:`http_request` over the in-memory network: the same bytes on a
    new connection (``Connection: close`` added, so the answer ends with the
    connection), read by ``http.client`` (a body cut short raises
    ``http.client.IncompleteRead``)."""
    parts = urlsplit(url)
    assert parts.hostname is not None and parts.port is not None
    lines = [f"{method} {path} HTTP/1.1".encode("latin-1"), f"Host: {parts.netloc}".encode()]
    for name, values in headers.items():
        for value in values:
            raw = value if isinstance(value, bytes) else value.encode("latin-1")
            lines.append(name.encode("latin-1") + b": " + raw)
    if not any(name.lower() == "connection" for name in headers):
        lines.append(b"Connection: close")
    read = _ReadAll()
    await NETWORK.connect(parts.hostname, parts.port, _Once(read))
    read.transport_ready.addCallback(
        lambda transport: transport.write(b"\r\n".join(lines) + b"\r\n\r\n")
    )
    raw = await read.done.addTimeout(30, reactor)
    response = http.client.HTTPResponse(_Bytes(raw), method=method)  # type: ignore[arg-type]
    response.begin()
    try:
        body = response.read()
        if response.length is None and not response.chunked and not read.clean:
            # read to the end of a connection that was cut: a socket's
            # reader gets ECONNRESET, not what looks like a whole body
            raise http.client.IncompleteRead(body)
        return Reply(response.status, response.getheaders(), body)
    finally:
        response.close()


async def leave_once(url: str, path: str, asked: Any) -> None:
    """A client that asks for *path* on what listens at *url* (in memory),
    and hangs up, unanswered, once *asked()* is true."""
    parts = urlsplit(url)
    assert parts.hostname is not None and parts.port is not None
    read = _ReadAll()
    await NETWORK.connect(parts.hostname, parts.port, _Once(read))
    transport = await read.transport_ready
    transport.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    await until(asked)
    transport.loseConnection()
    await read.done


class _Bytes:
    """What ``http.client.HTTPResponse`` reads a socket through."""

    def __init__(self, data: bytes) -> None:
        self._data = data

    def makefile(self, mode: str) -> io.BytesIO:
        return io.BytesIO(self._data)


class _ReadAll(Protocol):
    """Everything the server sends until it closes the connection."""

    def __init__(self) -> None:
        self.transport_ready: Deferred[Any] = Deferred()
        self.done: Deferred[bytes] = Deferred()
        #: the server closed the connection (not cut it)
        self.clean = False
        self._got: list[bytes] = []

    def connectionMade(self) -> None:
        self.transport_ready.callback(self.transport)

    def dataReceived(self, data: bytes) -> None:
        self._got.append(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.clean = reason.check(error.ConnectionDone) is not None
        self.done.callback(b"".join(self._got))


class _Once(Factory):
    def __init__(self, protocol: Protocol) -> None:
        self._protocol = protocol

    def buildProtocol(self, addr: Any) -> Protocol:
        return self._protocol


def _h(headers: dict[str, list[str]]) -> dict[str, list[str]]:
    return {name.replace("_", "-"): values for name, values in headers.items()}


async def start_proxy(
    upstream_url: str,
    cache_dir: Path,
    cache: dict[str, Any] | None = None,
    upstreams: dict[str, Any] | None = None,
    top: dict[str, Any] | None = None,
    clock: IReactorTime | None = None,
    **upstream: Any,
) -> RunningProxy:
    """regproxy with ``docker.io`` pointed at *upstream_url*; *cache* and
    *upstream* add keys to those sections of the YAML, *upstreams* more
    upstreams, *top* top-level keys; *clock* times it (a ``Clock`` the test
    advances; the reactor if None)."""
    config = parse_config(
        json.dumps(
            {
                "cache": {"directory": str(cache_dir), **(cache or {})},
                "upstreams": {"docker.io": {"url": upstream_url, **upstream}, **(upstreams or {})},
                **(top or {}),
            }
        )
    )
    proxy = build_proxy(config, reactor, clock=clock, connect=NETWORK.endpoints)
    factory = PlainHTTPFactory(proxy.site)
    port = await serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(factory)
    NETWORK.serve("127.0.0.1", port.getHost().port, factory)
    url = f"http://127.0.0.1:{port.getHost().port}"
    return RunningProxy(url, cache_dir, proxy, port)


class ProxyClock(Clock):
    """Time for regproxy's timers (``make_proxy(clock=...)``) that the test
    moves on: a deadline passes when the test advances, not seconds later.

    It starts at the wall clock's time (index times look real).  A call in
    no time is a later turn of the reactor, not time: it runs on the
    reactor, as the network's events and the threads' answers do."""

    def __init__(self) -> None:
        super().__init__()
        self.advance(time.time())

    def callLater(self, delay: float, f: Any, *args: Any, **kwargs: Any) -> Any:
        if delay <= 0:
            return reactor.callLater(0, f, *args, **kwargs)
        return super().callLater(delay, f, *args, **kwargs)


async def settle(seconds: float = 0.1) -> None:
    """Let the reactor run for a moment (callLater(0) work, eviction, closes)."""
    await deferLater(reactor, seconds, lambda: None)


async def until(predicate: Any, timeout: float = 10.0) -> None:
    """Wait, letting the reactor run, until *predicate()* is true."""
    for _ in range(int(timeout / 0.02)):
        if predicate():
            return
        await settle(0.02)
    raise AssertionError("condition not reached in time")


async def advance_until(clock: Clock, step: float, predicate: Any, steps: int = 100) -> None:
    """Move *clock* on by *step* seconds at a time, letting the reactor run
    between, until *predicate()* is true: past a deadline whose timer may
    not be set yet."""
    for _ in range(steps):
        if predicate():
            return
        clock.advance(step)
        await settle(0.01)
    raise AssertionError(f"condition not reached in {steps} steps of {step}s")


async def swept(proxy: Any) -> None:
    """Wait until the sweeps that stored blobs asked for (Evictor.soon) have
    run: a fixed wait is too short on a loaded machine."""
    evictor = proxy.proxy.evictor
    await settle(0.02)
    await until(lambda: not evictor._scheduled and not evictor._sweeping.locked)


def partial_get(
    url: str,
    path: str,
    first: int | None = None,
    lag: float | threading.Event = 0.0,
    rest: bool = False,
) -> tuple[int, bytes, bool]:
    """GET in a thread: (status, body read, whether the body ended short).

    With *first*, read only that many bytes, wait *lag* seconds (or until
    the test sets the event *lag*, 30 s at most), then hang up, or with
    *rest* read on."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    status, body = 0, b""
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        status = response.status
        if first is not None:
            body = response.read(first)
            if isinstance(lag, threading.Event):
                lag.wait(30)
            else:
                time.sleep(lag)
            if not rest:
                return status, body, False
        try:
            return status, body + response.read(), False
        except http.client.IncompleteRead as e:
            return status, body + e.partial, True
    except (TimeoutError, ConnectionError):
        return status, body, True
    finally:
        conn.close()


def get_in_thread(
    proxy: RunningProxy,
    path: str,
    first: int | None = None,
    lag: float | threading.Event = 0.0,
    rest: bool = False,
) -> Deferred[tuple[int, bytes, bool]]:
    """:func:`partial_get` of *path* from *proxy*, in a thread."""
    return deferToThread(partial_get, proxy.url, path, first, lag, rest)


def assert_nothing_kept(proxy: RunningProxy, digest: str) -> None:
    """Neither the blob nor any temporary file is left in the cache."""
    assert not proxy.blob_path(digest).exists(), f"{digest} was kept"
    left = os.listdir(proxy.cache_dir / "tmp")
    assert left == [], f"temporary files left: {left}"


def cache_fds(proxy: RunningProxy) -> int:
    """Descriptors of this process open on files of the proxy's cache."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        count += target.startswith(str(proxy.cache_dir / "blobs")) or target.startswith(
            str(proxy.cache_dir / "tmp")
        )
    return count
