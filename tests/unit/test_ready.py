"""Manifest answers used again (registryproxy.proxy.ready): the same answer
as the whole path gives, only faster, and never once it would differ."""

from __future__ import annotations

import base64
import json
import os
import socket
from typing import Any

import bcrypt
import pytest
import pytest_twisted
from proxyharness import ProxyClock, settle, until
from twisted.internet.threads import deferToThread

from registryproxy.admin.backend import PurgeSelector
from registryproxy.cache.manifests import CachedManifest
from registryproxy.login.files import WatchedFile
from registryproxy.proxy.ready import Ready, ReadyAnswers

ACCEPT_ALL = [
    "application/vnd.docker.distribution.manifest.v2+json, "
    "application/vnd.docker.distribution.manifest.list.v2+json"
]
ACCEPT_V2 = ["application/vnd.docker.distribution.manifest.v2+json"]


def _ready(body: bytes, until: float = 10.0, generation: int = 0) -> Ready:
    manifest = CachedManifest(body, "application/json", "sha256:" + "0" * 64, "HIT")
    return Ready(
        manifest,
        "docker.io",
        "library/app",
        "1",
        "docker.io/library/app:1",
        None,
        until,
        generation,
    )


def _key(name: str) -> tuple[bytes, bytes | None, tuple[bytes, ...], bytes | None]:
    return (f"/v2/{name}/manifests/1".encode(), b"host", (b"*/*",), None)


def test_an_answer_ends_with_its_lifetime_and_its_generation():
    answers = ReadyAnswers()
    answers.put(_key("a"), _ready(b"{}", until=10.0, generation=3))
    assert answers.get(_key("a"), 9.9, 3) is not None
    assert answers.get(_key("a"), 9.9, 4) is None  # the upstreams changed
    assert answers.get(_key("a"), 9.9, 3) is None  # and it is gone for good
    answers.put(_key("b"), _ready(b"{}", until=10.0))
    assert answers.get(_key("b"), 10.0, 0) is None


def test_answers_stay_within_their_entry_and_byte_bounds():
    answers = ReadyAnswers(max_entries=2, max_bytes=16_000)
    for name in "abc":
        answers.put(_key(name), _ready(b"{}"))
    assert len(answers) == 2 and answers.get(_key("a"), 0.0, 0) is None
    answers = ReadyAnswers(max_entries=100, max_bytes=1_600)  # at most 100 bytes each
    names = [f"n{i:02}" for i in range(20)]
    for name in names:
        answers.put(_key(name), _ready(b"x" * 60))  # 86 bytes with the key
    assert answers.get(_key(names[0]), 0.0, 0) is None  # past 1,600 bytes: the oldest went
    assert answers.get(_key(names[-1]), 0.0, 0) is not None
    assert len(answers) == 1_600 // 86
    answers.put(_key("huge"), _ready(b"x" * 80))  # over a sixteenth: never kept
    assert answers.get(_key("huge"), 0.0, 0) is None
    # a client chooses its keys: they count too
    long_key = (b"/v2/" + b"n" * 200 + b"/manifests/1", b"host", (b"*/*",), None)
    answers.put(long_key, _ready(b"{}"))
    assert answers.get(long_key, 0.0, 0) is None


def _counting(proxy: Any) -> list[int]:
    """Count the manifest cache's whole-path lookups."""
    calls = [0]
    manifests = proxy.proxy.manifests
    get = manifests.get

    async def counted(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        return await get(*args, **kwargs)

    manifests.get = counted
    return calls


@pytest_twisted.ensureDeferred
async def test_a_kept_manifest_is_answered_again_the_same_without_the_whole_path(
    fake_registry, make_proxy
):
    digest, body = fake_registry.add_image("library/app", "1", [b"layer"])
    proxy = await make_proxy(fake_registry.url)
    calls = _counting(proxy)
    first = await proxy.get("/v2/library/app/manifests/1")  # fetched: a MISS
    assert first.header("X-Cache") == "MISS"
    replies = [await proxy.get("/v2/library/app/manifests/1") for _ in range(3)]
    head = await proxy.head("/v2/library/app/manifests/1")
    assert calls[0] == 2  # the MISS, then the hit that noted the answer
    for reply in replies:
        assert (reply.code, reply.body, reply.header("Docker-Content-Digest")) == (
            200,
            body,
            digest,
        )
        assert reply.header("X-Cache") == "HIT"
        assert reply.header("Content-Type") == first.header("Content-Type")
        assert reply.header("ETag") == f'"{digest}"'
    assert (head.code, head.body, head.header("Content-Length")) == (200, b"", str(len(body)))
    # counted as every answer is
    metrics = proxy.proxy.metrics
    assert metrics.requests.labels("manifest", "hit")._value.get() == 4
    assert metrics.pulls.top(1) == [{"image": "docker.io/library/app:1", "pulls": 4}]


@pytest_twisted.ensureDeferred
async def test_what_decides_an_answer_keeps_answers_apart(
    fake_registry, make_fake_registry, make_proxy
):
    """The Accept header (a list, or its linux/amd64 manifest for a client
    that takes no lists) and the Host header (another upstream)."""
    amd64, _ = fake_registry.add_image("library/app", None, [b"amd64"])
    arm64, _ = fake_registry.add_image("library/app", None, [b"arm64"], architecture="arm64")
    index = fake_registry.add_index("library/app", "1", [arm64, amd64])
    other = await make_fake_registry()
    elsewhere, _ = other.add_image("library/app", "1", [b"elsewhere"])
    proxy = await make_proxy(
        fake_registry.url, upstreams={"quay.io": {"url": other.url, "aliases": ["quay.local"]}}
    )
    path = "/v2/library/app/manifests/1"
    for _ in range(3):
        assert (await proxy.get(path, Accept=ACCEPT_ALL)).header("Docker-Content-Digest") == index
        assert (await proxy.get(path, Accept=ACCEPT_V2)).header("Docker-Content-Digest") == amd64
        reply = await proxy.get(path, Host=["quay.local"], Accept=ACCEPT_ALL)
        assert reply.header("Docker-Content-Digest") == elsewhere


@pytest_twisted.ensureDeferred
async def test_a_purge_or_a_rule_ends_answers_at_once(fake_registry, make_proxy):
    fake_registry.add_image("library/app", "1", [b"layer"])
    proxy = await make_proxy(fake_registry.url)
    path = "/v2/library/app/manifests/1"
    for _ in range(3):
        await proxy.get(path)
    control = proxy.proxy.control
    await control.purge(PurgeSelector(upstream="docker.io", repository="library/app", tag="1"))
    assert (await proxy.get(path)).header("X-Cache") == "MISS"
    for _ in range(2):
        assert (await proxy.get(path)).header("X-Cache") == "HIT"
    control.set_upstream("docker.io", {"deny": ["library/app"]}, merge=True)
    refused = await proxy.get(path)
    assert refused.code == 403 and json.loads(refused.body)["errors"][0]["code"] == "DENIED"


@pytest_twisted.ensureDeferred
async def test_a_tag_past_its_ttl_is_asked_again(fake_registry, make_proxy):
    """A TTL shorter than an answer's lifetime still ends it."""
    fake_registry.add_image("library/app", "1", [b"v1"])
    clock = ProxyClock()
    proxy = await make_proxy(fake_registry.url, cache={"tag_ttl": 0.3}, clock=clock)
    path = "/v2/library/app/manifests/1"
    for _ in range(3):
        assert (await proxy.get(path)).code == 200
    old = (await proxy.get(path)).header("Docker-Content-Digest")
    new, _ = fake_registry.add_image("library/app", "1", [b"v2"])
    clock.advance(0.29)
    assert (await proxy.get(path)).header("Docker-Content-Digest") == old
    clock.advance(0.02)
    assert (await proxy.get(path)).header("Docker-Content-Digest") == new


@pytest_twisted.ensureDeferred
async def test_answers_are_kept_apart_by_credentials(
    fake_registry, make_proxy, tmp_path, monkeypatch
):
    """With proxy.auth an answer is used again only for the same credentials:
    wrong ones, another user's or none get what the whole path says."""
    monkeypatch.setattr(WatchedFile, "LOOK_EVERY", 0.05)
    fake_registry.add_image("library/app", "1", [b"layer"])
    users = tmp_path / "htpasswd"
    users.write_bytes(
        b"".join(
            name + b":" + bcrypt.hashpw(name + b"-secret", bcrypt.gensalt(4)) + b"\n"
            for name in (b"ann", b"bob")
        )
    )
    access = tmp_path / "access.log"
    auth = {
        "htpasswd": str(users),
        "rules": [{"repositories": ["library/app"], "users": ["ann"]}],
    }
    clock = ProxyClock()
    proxy = await make_proxy(
        fake_registry.url, top={"proxy": {"auth": auth, "access_log": str(access)}}, clock=clock
    )
    calls = _counting(proxy)
    path = "/v2/library/app/manifests/1"

    def basic(user: str, password: str) -> list[str]:
        return ["Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()]

    for _ in range(3):
        assert (await proxy.get(path, Authorization=basic("ann", "ann-secret"))).code == 200
    assert calls[0] == 2
    assert (await proxy.get(path, Authorization=basic("ann", "wrong"))).code == 401
    assert (await proxy.get(path, Authorization=basic("bob", "bob-secret"))).code == 403
    assert (await proxy.get(path)).code == 401
    # ann taken out of the file: refused as soon as the change is seen,
    # within the answer's lifetime
    users.write_bytes(users.read_bytes().split(b"\n", 1)[1])
    os.utime(users, ns=(0, 10**18))
    await settle(0.1)
    assert (await proxy.get(path, Authorization=basic("ann", "ann-secret"))).code == 401
    # a push to the same URI with ann's credentials is no pull
    push = await proxy.request("PUT", path, {"Authorization": basic("ann", "ann-secret")})
    assert push.code == 405, push.body
    # the access log is flushed every second
    clock.advance(1)
    await until(lambda: access.exists() and len(access.read_text().splitlines()) >= 8)
    users_logged = [line.split(" ")[2] for line in access.read_text().splitlines()]
    assert users_logged[:3] == ["ann", "ann", "ann"]


# -- answers sent again to the same request bytes (connections.Wire)


class _Connection:
    """One keep-alive connection that sends bytes verbatim and reads
    answers whole (blocking: run in a thread)."""

    def __init__(self, url: str, receive_buffer: int | None = None) -> None:
        host, port = url.removeprefix("http://").split(":")
        self.sock = socket.socket()
        if receive_buffer is not None:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        self.sock.settimeout(30)
        self.sock.connect((host, int(port)))
        self.file = self.sock.makefile("rb")

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def answer(self, head_only: bool = False) -> bytes:
        """The next answer's bytes; b"" if the connection closed first."""
        lines = []
        while True:
            line = self.file.readline()
            if not line:
                return b"".join(lines)
            lines.append(line)
            if line == b"\r\n":
                break
        length = 0
        for line in lines:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        return b"".join(lines) + (b"" if head_only else self.file.read(length))

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def _undated(answer: bytes) -> tuple[bytes, list[bytes], bytes]:
    """An answer's status line, its headers but Date (sorted), its body."""
    head, _, body = answer.partition(b"\r\n\r\n")
    status, *headers = head.split(b"\r\n")
    return status, sorted(h for h in headers if not h.lower().startswith(b"date:")), body


def _request(method: str, path: str, *headers: str) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: mirror.test", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _counting_requests(proxy: Any) -> list[int]:
    """Count the requests twisted.web parses into Request objects."""
    site = proxy.proxy.site
    made = [0]
    factory = site.requestFactory

    def counted(*args: Any) -> Any:
        made[0] += 1
        return factory(*args)

    site.requestFactory = counted
    return made


@pytest_twisted.ensureDeferred
async def test_the_same_request_bytes_are_answered_again_as_they_were(
    fake_registry, make_proxy, tmp_path
):
    """The fourth of the same bytes on a connection is answered without
    twisted.web: the same status, headers (but Date) and body as the whole
    path gave, counted, touched and logged the same; a HEAD too, and the
    connection goes on."""
    digest, body = fake_registry.add_image("library/app", "1", [b"layer"])
    access = tmp_path / "access.log"
    proxy = await make_proxy(fake_registry.url, top={"proxy": {"access_log": str(access)}})
    made = _counting_requests(proxy)
    touched: list[tuple[str, ...]] = []
    touch = proxy.proxy.manifests.touch
    proxy.proxy.manifests.touch = lambda *args: (touched.append(args), touch(*args))
    get = _request("GET", "/v2/library/app/manifests/1", "User-Agent: probe/1")
    head = _request("HEAD", "/v2/library/app/manifests/1")
    connection = _Connection(proxy.url)

    def exchange(data: bytes, head_only: bool = False) -> bytes:
        connection.send(data)
        return connection.answer(head_only)

    try:
        answers = [await deferToThread(exchange, get) for _ in range(4)]
        heads = [await deferToThread(exchange, head, True) for _ in range(3)]
        after = await deferToThread(exchange, get)
    finally:
        connection.close()
    # a MISS, a HIT keeping the answer, one noting GET's wire, one noting HEAD's
    assert made[0] == 4
    assert _undated(answers[0])[0] == b"HTTP/1.1 200 OK"
    assert b"X-Cache: MISS" in answers[0]
    whole_path = _undated(answers[1])
    assert whole_path[2] == body and b"Docker-Content-Digest: " + digest.encode() in whole_path[1]
    assert [_undated(a) for a in answers[2:] + [after]] == [whole_path] * 3
    assert all(b"\r\nDate: " in a for a in answers)
    assert _undated(heads[1]) == _undated(heads[2]) == (whole_path[0], whole_path[1], b"")
    metrics = proxy.proxy.metrics
    assert metrics.requests.labels("manifest", "hit")._value.get() == 3 + 3 + 1
    assert metrics.pulls.top(1) == [{"image": "docker.io/library/app:1", "pulls": 5}]
    assert metrics.sent_again._value.get() == 2 + 2  # GET's and HEAD's
    assert touched == [("docker.io", "library/app", digest)] * 7  # for eviction: all but the MISS
    proxy.proxy.site._flush_log()
    lines = access.read_text().splitlines()
    assert len(lines) == 8
    undated = [line.split("] ", 1)[1] for line in lines]
    gets = f'"GET /v2/library/app/manifests/1 HTTP/1.1" 200 {len(body)} "-" "probe/1"'
    heads_logged = '"HEAD /v2/library/app/manifests/1 HTTP/1.1" 200 - "-" "-"'
    assert undated == [gets] * 4 + [heads_logged] * 3 + [gets]
    assert {line.split("[", 1)[0] for line in lines} == {'"127.0.0.1" - - '}


@pytest_twisted.ensureDeferred
async def test_request_bytes_that_are_not_one_whole_request_take_the_whole_path(
    fake_registry, make_proxy
):
    """Two requests in one read, one in two reads: each answered right, by
    twisted.web."""
    fake_registry.add_image("library/app", "1", [b"layer"])
    proxy = await make_proxy(fake_registry.url)
    get = _request("GET", "/v2/library/app/manifests/1")
    made = _counting_requests(proxy)
    connection = _Connection(proxy.url)
    try:
        for _ in range(4):
            connection.send(get)
            await deferToThread(connection.answer)
        assert made[0] == 3  # the fourth sent again
        connection.send(get + get)  # pipelined
        two = [await deferToThread(connection.answer) for _ in range(2)]
        connection.send(get[:10])
        await settle(0.05)
        connection.send(get[10:])
        split = await deferToThread(connection.answer)
        assert made[0] == 6
        assert [_undated(a)[2] for a in two] == [_undated(split)[2]] * 2
    finally:
        connection.close()


@pytest.mark.parametrize(
    "protocol, header",
    [("HTTP/1.1", "Connection: close"), ("HTTP/1.0", "User-Agent: old/1")],
    ids=["close", "http-1.0"],
)
@pytest_twisted.ensureDeferred
async def test_an_answer_that_ends_its_connection_ends_it_when_sent_again(
    fake_registry, make_proxy, protocol, header
):
    """skopeo and podman ask with ``Connection: close``: answered again, the
    connection closes as it did, and what more the client sends is dropped."""
    _, body = fake_registry.add_image("library/app", "1", [b"layer"])
    proxy = await make_proxy(fake_registry.url)
    made = _counting_requests(proxy)
    lines = [f"GET /v2/library/app/manifests/1 {protocol}", "Host: mirror.test", header]
    closing = ("\r\n".join(lines) + "\r\n\r\n").encode()
    answers = []
    for _ in range(4):
        connection = _Connection(proxy.url)
        try:
            connection.send(closing)
            answers.append(await deferToThread(connection.answer))
            connection.send(closing)  # dropped: the connection ends
            assert await deferToThread(connection.answer) == b""
        finally:
            connection.close()
    assert made[0] == 3  # a MISS, a HIT keeping it, one noting its wire
    assert proxy.proxy.metrics.sent_again._value.get() == 1
    status, headers, sent = _undated(answers[-1])
    assert (status, sent) == (f"{protocol} 200 OK".encode(), body)
    assert _undated(answers[2]) == _undated(answers[3])
    if protocol == "HTTP/1.1":
        assert b"Connection: close" in headers


@pytest.mark.parametrize("again", [True, False], ids=["sent-again", "whole-path"])
@pytest_twisted.ensureDeferred
async def test_a_client_that_sends_and_never_reads_is_stopped_being_read(
    fake_registry, make_proxy, again
):
    """Answers do not pile up in memory: a connection whose answers are not
    taken is not read.  (twisted.web reads on while it answers a request,
    and so had all 600 answers waiting.)"""
    fake_registry.add_image("library/app", "1", [b"layer"])
    proxy = await make_proxy(fake_registry.url)
    if not again:
        proxy.proxy.site.answers = None
    get = _request("GET", "/v2/library/app/manifests/1")
    connection = _Connection(proxy.url, receive_buffer=4096)
    try:
        for _ in range(3):
            connection.send(get)
            await deferToThread(connection.answer)
        (channel,) = proxy.proxy.site.connections
        server = channel.transport
        while not hasattr(server, "socket"):
            server = server.transport
        server.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        hits = proxy.proxy.metrics.requests.labels("manifest", "hit")
        before, sent = hits._value.get(), 600
        for _ in range(sent):
            connection.send(get)
            await settle(0.001)
        await settle(0.2)
        answered = hits._value.get() - before
        assert answered < sent - 100  # it stopped reading
        assert len(server.dataBuffer) + server._tempDataLen < 2 * server.bufferSize
        answers = [await deferToThread(connection.answer) for _ in range(sent)]
        assert all(_undated(a) == _undated(answers[0]) for a in answers)  # all, once taken
        assert b"X-Cache: HIT" in answers[0]
    finally:
        connection.close()


@pytest_twisted.ensureDeferred
async def test_a_purge_ends_answers_sent_again_at_once(fake_registry, make_proxy):
    fake_registry.add_image("library/app", "1", [b"layer"])
    proxy = await make_proxy(fake_registry.url)
    get = _request("GET", "/v2/library/app/manifests/1")
    connection = _Connection(proxy.url)
    try:
        for _ in range(3):
            connection.send(get)
            assert b"X-Cache: " in await deferToThread(connection.answer)
        await proxy.proxy.control.purge(
            PurgeSelector(upstream="docker.io", repository="library/app", tag="1")
        )
        connection.send(get)
        assert b"X-Cache: MISS" in await deferToThread(connection.answer)
        proxy.proxy.control.set_upstream("docker.io", {"deny": ["library/app"]}, merge=True)
        connection.send(get)
        assert b"HTTP/1.1 403 " in await deferToThread(connection.answer)
    finally:
        connection.close()
