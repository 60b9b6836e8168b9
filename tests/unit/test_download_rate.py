"""A blob download must average ``min_rate`` bytes/s over each ``read_timeout``
window: a trickling upstream is abandoned, not followed for ever; a relay
paused for a lagging reader is not the upstream's fault."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import LogEvent, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from registryproxy.cache.access import LocalIndex
from registryproxy.cache.background import IndexThread
from registryproxy.cache.blobs import BlobCache, BlobFetch, MemoryRelay
from registryproxy.cache.index import Index
from registryproxy.cache.store import FileStore
from registryproxy.config import UpstreamConfig
from registryproxy.names import Digest
from registryproxy.runtime import Threads

SIZE = 4 * 1024 * 1024
DATA = os.urandom(SIZE)
DIGEST = Digest.parse("sha256:" + hashlib.sha256(DATA).hexdigest())


class Upstream:
    """A blob response whose body the test sends by hand."""

    def __init__(self) -> None:
        self.length = SIZE
        self.request = SimpleNamespace(method=b"GET")
        self.transport = StringTransport()
        self.protocol: Any = None
        self.sent = 0

    def deliverBody(self, protocol: Any) -> None:
        self.protocol = protocol
        protocol.makeConnection(self.transport)

    def send(self, count: int) -> None:
        self.protocol.dataReceived(DATA[self.sent : self.sent + count])
        self.sent += count

    def hang_up(self) -> None:
        self.protocol.connectionLost(Failure(ConnectionDone()))


class Client:
    name = "docker.io"

    def __init__(self, response: Upstream, **config: Any) -> None:
        self.config = UpstreamConfig(url="http://127.0.0.1:1", **config)
        self._response = response

    async def get_blob(self, repo: str, digest: str) -> Upstream:
        return self._response


@pytest.fixture
def log_events() -> Any:
    events: list[LogEvent] = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


def start(tmp_path: Path, clock: Clock, max_bytes: int | None = None, **config: Any):
    """(the cache, its download of DIGEST, the upstream sending it)"""
    store = FileStore(str(tmp_path / "cache"), Threads(reactor, "test-files"))
    index = Index(str(tmp_path / "cache" / "index.db"))
    # quick work only here: the index's own thread is never started
    access = LocalIndex(index, IndexThread(index, clock, ThreadPool(name="unused")))
    cache = BlobCache(store, access, clock, max_bytes=max_bytes)
    upstream = Upstream()
    fetched = cache.fetch(Client(upstream, **config), "library/x", DIGEST)  # type: ignore[arg-type]
    result: list[BlobFetch] = []
    ensureDeferred(fetched).addCallback(result.append)
    clock.advance(0)
    (fetch,) = result
    return cache, fetch, upstream


def follow(fetch: BlobFetch) -> Any:
    def reader() -> None:
        pass

    fetch.listen(reader)
    fetch.release()
    return reader


def test_a_trickling_upstream_is_abandoned(tmp_path, log_events):
    clock = Clock()
    cache, fetch, upstream = start(tmp_path, clock)  # the defaults: 60 s, 10 KiB/s
    reader = follow(fetch)
    upstream.send(1000)
    for _ in range(3):  # never silent for a whole read_timeout: only the rate can end it
        clock.advance(59)
        if fetch.error is None:
            upstream.send(1)
    assert fetch.error is not None and "min_rate" in fetch.error, fetch.error
    assert fetch.abandoned(reader)  # its clients' connections are aborted
    assert upstream.transport.producerState == "stopped"
    upstream.hang_up()
    fetch.unlisten(reader)
    assert cache.in_flight == 0
    assert os.listdir(tmp_path / "cache" / "tmp") == []  # nothing partial kept
    assert cache.store.stat(DIGEST) is None
    text = "\n".join(formatEvent(e) for e in log_events)
    assert "docker.io" in text and str(DIGEST) in text and "17 bytes/s" in text, text


def test_an_upstream_above_the_minimum_goes_on(tmp_path):
    clock = Clock()
    _, fetch, upstream = start(tmp_path, clock, read_timeout=10, min_rate=10240)
    follow(fetch)
    for _ in range(30):
        upstream.send(11 * 1024)
        clock.advance(1)
    assert fetch.error is None


def test_no_minimum_rate_follows_a_trickle(tmp_path):
    clock = Clock()
    _, fetch, upstream = start(tmp_path, clock, read_timeout=60, min_rate=None)
    follow(fetch)
    for _ in range(10):
        clock.advance(59)
        upstream.send(1)
    assert fetch.error is None


def test_a_relay_held_up_by_a_lagging_reader_is_not_the_upstream_s_fault(tmp_path, monkeypatch):
    monkeypatch.setattr(MemoryRelay, "HIGH", 64 * 1024)
    monkeypatch.setattr(MemoryRelay, "LOW", 16 * 1024)
    clock = Clock()
    # larger than the budget: it passes through memory, paced by its slowest reader
    _, fetch, upstream = start(tmp_path, clock, max_bytes=1024, read_timeout=10, min_rate=10**6)
    assert fetch.relayed
    follow(fetch)  # reads nothing
    fast = lambda: None  # noqa: E731
    fetch.listen(fast)
    clock.advance(1)
    upstream.send(128 * 1024)
    fetch.moved(fast, upstream.sent)
    assert upstream.transport.producerState == "paused"
    clock.advance(9)  # the window ends: far below min_rate, but the relay held the upstream
    assert fetch.error is None
