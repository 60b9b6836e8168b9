"""A download waiting for disk room, driven by hand in memory: its upstream
stays paused, its bytes are taken once each and in order, and the wait ends
whatever happens meanwhile (the body ending, the disk filling up, a lost
peer, a shutdown, an error telling the room)."""

from __future__ import annotations

import errno
import hashlib

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.web._newclient import TransportProxyProducer
from twisted.web.client import Response, ResponseDone, ResponseFailed
from twisted.web.http_headers import Headers

from registryproxy.cache import blobs
from registryproxy.cache.blobs import BlobCache, BlobFetch, _Receiver
from registryproxy.cache.store import verify
from registryproxy.names import Digest

DATA = bytes(range(256)) * 40  # 10,240 bytes


class MemoryWriter:
    """A store's writer in memory: *free* bytes before ENOSPC (the part of
    a write that fits is written, as a file's would be)."""

    def __init__(self, digest: Digest, size: int, free: int | None = None) -> None:
        self.digest, self.size, self.free = digest, size, free
        self.buf = bytearray()
        self.hasher = digest.hasher()

    @property
    def written(self) -> int:
        return len(self.buf)

    def write(self, data: bytes) -> None:
        take = len(data) if self.free is None else min(len(data), self.free)
        if self.free is not None:
            self.free -= take
        self.buf += data[:take]
        self.hasher.update(data[:take])
        if take < len(data):
            raise OSError(errno.ENOSPC, "No space left on device")

    def read(self, offset: int, size: int) -> bytes:
        return bytes(self.buf[offset : offset + size])

    def commit(self) -> Deferred[None]:
        verify(self.digest, self.size, self.written, self.hasher.hexdigest())
        return succeed(None)

    def abort(self) -> None:
        pass

    def close(self) -> None:
        pass

    def fileno(self) -> None:
        return None


class Upstream:
    """A body's transport: whether it is paused, and what was asked of it."""

    def __init__(self) -> None:
        self.paused = False
        self.asked: list[str] = []

    def pauseProducing(self) -> None:
        self.paused = True
        self.asked.append("pause")

    def resumeProducing(self) -> None:
        self.paused = False
        self.asked.append("resume")

    def stopProducing(self) -> None:
        self.asked.append("stop")


class Grants:
    """Grants of room, answered when the test says."""

    def __init__(self) -> None:
        self.waiting: list[tuple[int, Deferred[int]]] = []

    def __call__(self, fetch: BlobFetch, wanted: int) -> Deferred[int]:
        d: Deferred[int] = Deferred()
        self.waiting.append((wanted, d))
        return d

    def answer_all(self) -> None:
        while self.waiting:
            wanted, d = self.waiting.pop(0)
            d.callback(wanted)


def download(cap, free=None, grant=None, origin="upstream"):
    digest = Digest.parse("sha256:" + hashlib.sha256(DATA).hexdigest())
    writer = MemoryWriter(digest, len(DATA), free)
    grants = Grants()
    fetch = BlobFetch(digest, len(DATA), writer, "up", origin, None, 0.0, cap, grant or grants)
    fetch.hold()  # a client follows it
    ended: list[Failure | None] = []
    clock = Clock()
    receiver = _Receiver(fetch, clock, 60.0, ended.append)
    upstream = Upstream()
    receiver.makeConnection(upstream)
    return fetch, writer, receiver, upstream, grants, ended, clock


def test_a_body_that_ends_while_bytes_wait_for_room_ends_once_they_are_taken():
    fetch, writer, receiver, upstream, grants, ended, _ = download(cap=4096)
    receiver.dataReceived(DATA[:3000])
    receiver.dataReceived(DATA[3000:6000])  # past the cap: waits, paused
    assert fetch.waiting_for_room and upstream.paused
    receiver.dataReceived(DATA[6000:])  # what the parser had already
    receiver.connectionLost(Failure(ResponseDone()))
    assert ended == []
    grants.answer_all()
    assert ended == [None]
    assert bytes(writer.buf) == DATA
    assert not upstream.paused


def test_a_chunk_the_disk_filled_up_under_is_written_once_after_the_room_came():
    fetch, writer, receiver, upstream, grants, ended, _ = download(cap=None, free=5000)
    receiver.dataReceived(DATA[:3000])
    receiver.dataReceived(DATA[3000:8000])  # 2,000 bytes fit, then ENOSPC: waits
    assert fetch.waiting_for_room and writer.written == 5000
    receiver.dataReceived(DATA[8000:])
    writer.free = None  # room was made
    grants.answer_all()
    receiver.connectionLost(Failure(ResponseDone()))
    assert ended == [None]
    assert bytes(writer.buf) == DATA


def test_a_chunk_given_room_that_then_finds_the_disk_full_asks_again():
    fetch, writer, receiver, upstream, grants, ended, _ = download(cap=4096, free=4500)
    receiver.dataReceived(DATA[:3000])
    receiver.dataReceived(DATA[3000:6000])
    wanted, granted = grants.waiting.pop(0)
    granted.callback(wanted)  # past the cap, granted; then the disk is full at 4,500
    assert fetch.waiting_for_room and not fetch.relayed and len(grants.waiting) == 1
    writer.free = None
    grants.answer_all()
    receiver.dataReceived(DATA[6000:])
    grants.answer_all()
    receiver.connectionLost(Failure(ResponseDone()))
    assert ended == [None] and bytes(writer.buf) == DATA


def test_bytes_nobody_can_take_after_the_wait_fail_the_download():
    fetch, writer, receiver, upstream, grants, ended, _ = download(cap=4096)
    fetch.release()  # nobody follows: no room means no way on through memory
    receiver.dataReceived(DATA[:3000])
    receiver.dataReceived(DATA[3000:6000])
    receiver.connectionLost(Failure(ResponseDone()))
    grants.waiting.pop()[1].callback(0)
    assert fetch.error is not None
    assert len(ended) == 1 and isinstance(ended[0], Failure)


def test_a_peer_lost_while_bytes_wait_is_taken_over_with_exact_bytes():
    fetch, writer, receiver, upstream, grants, ended, clock = download(cap=4096, origin="peer")
    receiver.dataReceived(DATA[:3000])
    receiver.dataReceived(DATA[3000:6000])  # waits
    receiver.connectionLost(Failure(ResponseFailed([Failure(RuntimeError("peer died"))])))
    assert len(ended) == 1 and isinstance(ended[0], Failure)
    assert fetch.written == 3000  # what waited went with the peer
    # taken over: the whole blob again from the upstream, its start skipped
    resumed: list[Failure | None] = []
    receiver = _Receiver(fetch, clock, 60.0, resumed.append, None, skip=3000)
    again = Upstream()
    receiver.makeConnection(again)
    assert again.paused  # the wait still holds
    receiver.dataReceived(DATA[:5000])
    grants.answer_all()
    receiver.dataReceived(DATA[5000:])
    grants.answer_all()
    receiver.connectionLost(Failure(ResponseDone()))
    assert resumed == [None] and bytes(writer.buf) == DATA


def test_a_shutdown_while_bytes_wait_keeps_nothing_more():
    fetch, writer, receiver, upstream, grants, ended, _ = download(cap=4096)
    receiver.dataReceived(DATA[:3000])
    receiver.dataReceived(DATA[3000:])
    receiver.connectionLost(Failure(ResponseDone()))
    fetch._fail("shutting down")  # BlobCache.abort_all
    grants.answer_all()
    assert len(ended) == 1 and isinstance(ended[0], Failure)
    assert writer.written == 3000


def test_a_wait_begun_with_the_first_bytes_keeps_the_upstream_paused():
    """Bytes that came with the headers are delivered inside deliverBody,
    after which Twisted resumes the transport itself: the next bytes to
    come pause it again."""
    grants = Grants()
    digest = Digest.parse("sha256:" + hashlib.sha256(DATA).hexdigest())
    fetch = BlobFetch(
        digest, len(DATA), MemoryWriter(digest, len(DATA)), "up", "upstream", None, 0.0, 0, grants
    )
    fetch.hold()
    tcp = Upstream()
    response = Response._construct(
        (b"HTTP", 1, 1), 200, b"OK", Headers(), TransportProxyProducer(tcp), None
    )
    response._bodyDataReceived(DATA[:4096])  # before deliverBody
    ended: list[Failure | None] = []
    response.deliverBody(_Receiver(fetch, Clock(), 60.0, ended.append))
    assert fetch.waiting_for_room
    response._bodyDataReceived(DATA[4096:5000])  # came before the pause took
    assert tcp.paused
    grants.answer_all()
    assert not tcp.paused


class FailingRoom:
    """A store whose room() fails from its second call on (statvfs: EIO)."""

    def __init__(self) -> None:
        self.calls = 0

    def room(self) -> int:
        self.calls += 1
        if self.calls > 1:
            raise OSError(errno.EIO, "Input/output error")
        return 0


def test_a_grant_is_answered_even_when_the_room_cannot_be_told():
    clock = Clock()
    made: Deferred[int] = Deferred()
    cache = BlobCache(FailingRoom(), None, clock, make_room=lambda needed, gave_up: made)
    fetch, writer, receiver, upstream, _, ended, _ = download(cap=4096, grant=cache._granted)
    receiver.dataReceived(DATA[:3000])
    receiver.dataReceived(DATA[3000:6000])
    assert fetch.waiting_for_room
    made.callback(100)  # evicted; telling the room then fails: none
    assert not fetch.waiting_for_room
    assert fetch.relayed and fetch.running  # on through memory


def test_eviction_stops_once_the_download_gave_up_waiting():
    clock = Clock()
    asked: list = []
    cache = BlobCache(
        FailingRoom(),
        None,
        clock,
        make_room=lambda needed, gave_up: asked.append(gave_up) or Deferred(),
    )
    cache.store.room = lambda: 0
    fetch, writer, receiver, upstream, _, ended, _ = download(cap=4096, grant=cache._granted)
    receiver.dataReceived(DATA[:3000])
    receiver.dataReceived(DATA[3000:6000])
    [gave_up] = asked
    assert not gave_up()
    clock.advance(blobs.ROOM_WAIT)
    assert gave_up()  # what evicts for it is told to stop
    assert not fetch.waiting_for_room and fetch.relayed
