"""Hostile clients: odd headers, bodies, slow and idle connections, floods."""

from __future__ import annotations

import json
import os
import resource
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest
import pytest_twisted
from proxyharness import cache_fds, http_request, settle, until
from twisted.internet import reactor
from twisted.internet.endpoints import serverFromString
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread
from twisted.logger import globalLogPublisher
from twisted.web.resource import Resource
from twisted.web.test.requesthelper import DummyRequest

from registryproxy.admin.app import AdminAPI
from registryproxy.proxy.connections import (
    LINES_AT_MOST,
    LINES_EVERY,
    GuardedSite,
    Limits,
    fitting_connections,
    open_files_limit,
)


@pytest.fixture
def failures() -> Iterator[list[dict[str, Any]]]:
    """Every event logged with a traceback (or at error level) during the test."""
    seen: list[dict[str, Any]] = []

    def observe(event: dict[str, Any]) -> None:
        if "log_failure" in event:
            seen.append(event)

    globalLogPublisher.addObserver(observe)
    yield seen
    globalLogPublisher.removeObserver(observe)


def error_code(reply) -> str:
    return json.loads(reply.body)["errors"][0]["code"]


@pytest_twisted.ensureDeferred
async def test_range_numbers_of_any_length(fake_registry, make_proxy, failures):
    digest = fake_registry.add_blob(b"0123456789")
    proxy = await make_proxy(fake_registry.url)
    path = f"/v2/library/x/blobs/{digest}"
    await proxy.get(path)
    huge = "9" * 5000
    for header, code, body in [
        (f"bytes={huge}-", 416, None),
        (f"bytes={huge}-{huge}", 416, None),
        (f"bytes=2-{huge}", 206, b"23456789"),
        (f"bytes=-{huge}", 206, b"0123456789"),
        (f"bytes={'0' * 5000}3-4", 206, b"34"),
    ]:
        reply = await proxy.get(path, Range=[header])
        assert reply.code == code, header[:20]
        if body is not None:
            assert reply.body == body
        else:
            assert error_code(reply) == "RANGE_INVALID"
            assert len(reply.body) < 500
    reply = await proxy.get(path, Range=[b"bytes=\xff0-1"])
    assert reply.code == 416
    assert failures == []


@pytest_twisted.ensureDeferred
async def test_headers_that_are_not_utf8(fake_registry, make_proxy, failures):
    fake_registry.add_image("library/app", "1", [b"layer"])
    proxy = await make_proxy(fake_registry.url)
    reply = await proxy.request("GET", "/v2/app/manifests/1", {"Host": [b"\xff.example"]})
    assert reply.code == 200
    assert failures == []


def exchange(url: str, data: bytes, wait: float = 5.0, then: bytes = b"") -> tuple[bytes, float]:
    """Send *data* (then keep sending *then* until the server stops taking it),
    read until the server closes: (what it sent, seconds until it closed)."""
    parts = urlsplit(url)
    started = time.monotonic()
    with socket.create_connection((parts.hostname, parts.port)) as sock:
        sock.sendall(data)
        sock.settimeout(wait)
        if then:
            sock.setblocking(False)
            try:
                for _ in range(200):
                    sock.send(then)
            except OSError:
                pass
            sock.settimeout(wait)
        received = b""
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except TimeoutError:
            return received, float("inf")
        except ConnectionResetError:
            pass
    return received, time.monotonic() - started


def status_and_json(received: bytes) -> tuple[int, dict[str, Any]]:
    head, _, body = received.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


async def admin_port(proxy, token: str | None = "t0k", max_body: int = 1000, connections: int = 64):
    """The admin API of *proxy* on a port of its own, held to the test's limits."""
    api = AdminAPI(proxy.proxy.control, token, max_body)
    site = GuardedSite(
        api.resource(), Limits(connections, 2.0, 60.0, 2.0), api.body_policy, reactor, "admin API"
    )
    port = await serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(site)
    return port, f"http://127.0.0.1:{port.getHost().port}"


@pytest_twisted.ensureDeferred
async def test_v2_bodies_are_refused_before_they_are_read(fake_registry, make_proxy, failures):
    proxy = await make_proxy(fake_registry.url)
    huge = b"x" * 65536
    for head, status in [
        (b"PUT /v2/x/blobs/uploads/1 HTTP/1.1\r\nContent-Length: 2000000000\r\n", 405),
        (b"POST /v2/x/blobs/uploads/ HTTP/1.1\r\nTransfer-Encoding: chunked\r\n", 405),
        (b"GET /v2/ HTTP/1.1\r\nContent-Length: 300000000\r\n", 413),
    ]:
        received, took = await deferToThread(
            exchange, proxy.url, head + b"Host: x\r\n\r\n" + huge, 5.0, huge
        )
        assert took < 5, head
        got, body = status_and_json(received)
        assert got == status, head
        assert body["errors"][0]["code"] == "UNSUPPORTED"
        assert b"docker-distribution-api-version: registry/2.0" in received.lower()
    # no body: as before
    received, _ = await deferToThread(
        exchange, proxy.url, b"PUT /v2/x/manifests/1 HTTP/1.1\r\nConnection: close\r\n\r\n"
    )
    assert status_and_json(received)[0] == 405
    received, _ = await deferToThread(
        exchange,
        proxy.url,
        b"GET /v2/ HTTP/1.1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    )
    assert received.startswith(b"HTTP/1.1 200")
    assert failures == []


@pytest_twisted.ensureDeferred
async def test_admin_bodies_want_the_token_first_and_are_bounded(
    fake_registry, make_proxy, failures
):
    proxy = await make_proxy(fake_registry.url)
    port, url = await admin_port(proxy, token="t0k", max_body=1000)
    try:
        put = b"PUT /api/v1/pins HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        for head, status in [
            (put + b"Content-Length: 300000000\r\n", 401),
            (put + b"Authorization: Bearer wrong\r\nContent-Length: 30\r\n", 401),
            (put + b"Authorization: Bearer t0k\r\nContent-Length: 300000000\r\n", 413),
            (put + b"Authorization: Bearer t0k\r\nTransfer-Encoding: chunked\r\n", 411),
        ]:
            received, took = await deferToThread(exchange, url, head + b"\r\n", 5.0, b"y" * 65536)
            assert took < 5, head
            got, body = status_and_json(received)
            assert got == status, (head, received[:200])
            assert body["error"]["message"]
        body = b'{"image": "alpine:3.19"}'
        received, _ = await deferToThread(
            exchange,
            url,
            put
            + b"Authorization: Bearer t0k\r\nConnection: close\r\n"
            + b"Content-Length: %d\r\n\r\n" % len(body)
            + body,
        )
        assert received.startswith(b"HTTP/1.1 201 ")
    finally:
        await port.stopListening()
    assert failures == []


def trickle(url: str, seconds: float) -> float:
    """A slowloris: a header line every 0.1 s; seconds until the server hangs up."""
    parts = urlsplit(url)
    started = time.monotonic()
    with socket.create_connection((parts.hostname, parts.port)) as sock:
        sock.sendall(b"GET /v2/ HTTP/1.1\r\n")
        try:
            while time.monotonic() - started < seconds:
                sock.sendall(b"X-Slow: yes\r\n")
                time.sleep(0.1)
                sock.settimeout(0.001)
                try:
                    if sock.recv(1) == b"":
                        break
                except TimeoutError:
                    pass
        except OSError:
            pass
    return time.monotonic() - started


@pytest_twisted.ensureDeferred
async def test_slow_headers_are_cut_off(fake_registry, make_proxy):
    proxy = await make_proxy(fake_registry.url, top={"proxy": {"header_timeout": 0.5}})
    took = await deferToThread(trickle, proxy.url, 5.0)
    assert took < 2.5
    # a prompt client on a kept-alive connection is not hurt by the deadline
    assert (await proxy.get("/v2/")).code == 200


def never_reads(url: str, path: str, done: threading.Event) -> bool:
    """GET *path* and read nothing until *done*; whether the server had cut
    the connection by then."""
    parts = urlsplit(url)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((parts.hostname, parts.port))
    with sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        done.wait(10)
        sock.setblocking(False)
        try:
            while sock.recv(1 << 20):
                pass
        except BlockingIOError:
            return False  # still open, still sending
        except OSError:
            pass
    return True


@pytest.mark.parametrize("sendfile", [True, False])
@pytest_twisted.ensureDeferred
async def test_clients_that_stop_reading_let_go_of_the_blob(fake_registry, make_proxy, sendfile):
    data = os.urandom(32 * 1024 * 1024)
    digest = fake_registry.add_blob(data)
    proxy = await make_proxy(
        fake_registry.url, top={"proxy": {"send_timeout": 0.5, "sendfile": sendfile}}
    )
    path = f"/v2/library/x/blobs/{digest}"
    assert (await proxy.get(path)).code == 200
    done = threading.Event()
    reader = deferToThread(never_reads, proxy.url, path, done)
    try:
        await until(lambda: cache_fds(proxy) == 1)
        await until(lambda: cache_fds(proxy) == 0, timeout=2.0)
    finally:
        done.set()
    assert await reader


def hold(url: str, count: int) -> list[socket.socket]:
    parts = urlsplit(url)
    return [socket.create_connection((parts.hostname, parts.port)) for _ in range(count)]


def closed_at_once(url: str) -> bool:
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port)) as sock:
        sock.settimeout(1.0)
        try:
            return sock.recv(1) == b""
        except TimeoutError:
            return False
        except ConnectionResetError:
            return True


@pytest_twisted.ensureDeferred
async def test_connections_past_the_limit_are_closed_and_admin_stays_up(
    fake_registry, make_proxy, tmp_path
):
    seen: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(seen.append)
    proxy = await make_proxy(fake_registry.url, top={"proxy": {"max_connections": 5}})
    port, admin = await admin_port(proxy, token=None)
    held = await deferToThread(hold, proxy.url, 5)
    try:
        await settle(0.2)
        for _ in range(5):
            assert await deferToThread(closed_at_once, proxy.url)
        reply = await deferToThread(http_request, admin, "GET", "/healthz", {})
        assert reply.code == 200
    finally:
        globalLogPublisher.removeObserver(seen.append)
        for sock in held:
            sock.close()
        await port.stopListening()
    refused = [e for e in seen if "refused one from" in e.get("log_format", "")]
    assert len(refused) == 1  # one line per LOG_EVERY seconds
    await until(lambda: not proxy.proxy.site.connections)
    assert (await proxy.get("/v2/")).code == 200


def test_connections_fit_the_open_file_limit():
    assert fitting_connections(1024, 64, 1024) == (1024 - 64 - 64) // 3
    assert fitting_connections(100, 64, 1 << 20) == 100


def test_the_open_file_limit_is_raised_to_the_hard_one():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
        assert open_files_limit() == resource.getrlimit(resource.RLIMIT_NOFILE)[0] == hard
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest_twisted.ensureDeferred
async def test_the_access_log_can_go_to_a_file(fake_registry, make_proxy, tmp_path):
    fake_registry.add_image("library/app", "1", [b"x"])
    log_file = tmp_path / "access.log"
    proxy = await make_proxy(fake_registry.url, top={"proxy": {"access_log": str(log_file)}})
    assert (await proxy.get("/v2/app/manifests/1", User_Agent=["probe/1"])).code == 200
    proxy.proxy.site._flush_log()
    line = log_file.read_text()
    assert '"GET /v2/app/manifests/1 HTTP/1.1" 200' in line and "probe/1" in line


def test_twistds_access_lines_go_into_its_log_together() -> None:
    """The lines of up to LINES_EVERY seconds are one entry of twistd's log
    (an entry costs as much as a cached answer), and never more than
    LINES_AT_MOST characters of them wait."""
    clock = Clock()
    site = GuardedSite(
        Resource(), Limits(8, 2.0, 60.0, 2.0), lambda *_: None, clock, "test", "twistd"
    )
    entries: list[list[str]] = []

    def observe(event: dict[str, Any]) -> None:
        if event.get("log_namespace") == "regproxy.access":
            entries.append(event["lines"].splitlines())

    def logged(path: str) -> None:
        request = DummyRequest([b""])
        request.uri, request.code, request.sentLength = path.encode(), 200, 2
        site.log(request)

    globalLogPublisher.addObserver(observe)
    try:
        for n in range(3):
            logged(f"/v2/a/manifests/{n}")
        clock.advance(LINES_EVERY / 2)
        assert entries == []
        logged("/v2/a/manifests/3")
        clock.advance(LINES_EVERY / 2)
        assert [len(lines) for lines in entries] == [4]
        assert "/v2/a/manifests/3 " in entries[0][3]
        # a client's long lines: written at once when they reach the bound
        long = "/v2/b/manifests/" + "x" * 1000
        count = 0
        while len(entries) == 1 and count <= LINES_AT_MOST // 1000:
            logged(long)
            count += 1
        width = len(entries[-1][0])
        assert count == -(-LINES_AT_MOST // width)  # the line that reached it
        assert [len(lines) for lines in entries] == [4, count]
        clock.advance(LINES_EVERY)
        assert len(entries) == 2  # nothing was left waiting
        logged("/v2/c/manifests/1")
        site.stopFactory()  # what waits is written at a stop
        assert [len(lines) for lines in entries] == [4, count, 1]
    finally:
        globalLogPublisher.removeObserver(observe)


@pytest_twisted.ensureDeferred
async def test_an_access_log_that_cannot_be_written_loses_lines_not_responses(
    fake_registry, make_proxy, tmp_path
):
    import errno

    from twisted.logger import globalLogPublisher

    class FullDisk:
        def write(self, line: str) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

        def flush(self) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

        def close(self) -> None:
            pass

    fake_registry.add_image("library/app", "1", [b"x"])
    proxy = await make_proxy(
        fake_registry.url, top={"proxy": {"access_log": str(tmp_path / "a.log")}}
    )
    proxy.proxy.site._logFile = FullDisk()
    events: list = []
    globalLogPublisher.addObserver(events.append)
    try:
        for _ in range(3):
            assert (await proxy.get("/v2/app/manifests/1")).code == 200
        proxy.proxy.site._flush_log()
    finally:
        globalLogPublisher.removeObserver(events.append)
    said = [e for e in events if "cannot write the access log" in e.get("log_format", "")]
    assert len(said) == 1  # once, however many lines are lost
