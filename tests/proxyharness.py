"""Run regproxy in the test's reactor against a FakeRegistry, on real 127.0.0.1 ports."""

from __future__ import annotations

import http.client
import json
import os
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import attrs
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread

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
        return deferToThread(http_request, self.url, method, path, headers or {})

    def get(self, path: str, **headers: list[str]) -> Deferred[Reply]:
        return self.request("GET", path, _h(headers))

    def head(self, path: str, **headers: list[str]) -> Deferred[Reply]:
        return self.request("HEAD", path, _h(headers))

    def blob_path(self, digest: str) -> Path:
        algorithm, hexpart = digest.split(":")
        return self.cache_dir / "blobs" / algorithm / hexpart[:2] / hexpart

    async def stop(self) -> None:
        if self.stopped:
            return
        self.stopped = True
        await self.port.stopListening()
        await self.proxy.close()


def _h(headers: dict[str, list[str]]) -> dict[str, list[str]]:
    return {name.replace("_", "-"): values for name, values in headers.items()}


async def start_proxy(
    upstream_url: str,
    cache_dir: Path,
    cache: dict[str, Any] | None = None,
    upstreams: dict[str, Any] | None = None,
    top: dict[str, Any] | None = None,
    **upstream: Any,
) -> RunningProxy:
    """regproxy with ``docker.io`` pointed at *upstream_url*; *cache* and
    *upstream* add keys to those sections of the YAML, *upstreams* more
    upstreams, *top* top-level keys."""
    config = parse_config(
        json.dumps(
            {
                "cache": {"directory": str(cache_dir), **(cache or {})},
                "upstreams": {"docker.io": {"url": upstream_url, **upstream}, **(upstreams or {})},
                **(top or {}),
            }
        )
    )
    proxy = build_proxy(config, reactor)
    port = await serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(
        PlainHTTPFactory(proxy.site)
    )
    url = f"http://127.0.0.1:{port.getHost().port}"
    return RunningProxy(url, cache_dir, proxy, port)


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
