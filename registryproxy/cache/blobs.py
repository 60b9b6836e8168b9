"""Blob downloads: one upstream fetch per digest, followed by every client.

A miss starts a :class:`BlobFetch` that writes the upstream body into the
store's temporary file while any number of clients read it back from disk as
it grows.  Memory stays flat whatever the blob size, a slow client never slows
the others, and the fetch is published only once its digest checks out.
"""

from __future__ import annotations

import collections
import errno
import os
import threading
from collections.abc import Callable
from typing import Any
from typing import Protocol as Interface

from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import IResponse

from ..errors import RegistryError, describe_failure
from ..names import Digest
from ..singleflight import SingleFlight
from ..upstream.client import Manifest, RegistryClient, content_length
from ..upstream.rules import oversize
from .access import IndexAccess
from .scrub import Verifier
from .shared import LocalTier, SharedStore
from .store import BlobStore, BlobWriter, VerificationError, verify

log = Logger()

#: a download's claim on the disk for what it announced is whole for this
#: many seconds, then no more than it could write in CLAIM_SECONDS at the
#: speed it has shown (see BlobFetch.claim)
CLAIM_GRACE = 5.0
CLAIM_SECONDS = 300.0
#: a download's grants of disk that may evict (each evicts at most
#: eviction.ROOM_STEPS batches of images; the first is for a chunk)
ROOM_GRANTS = 16
#: the disk a download of announced size may take before it asks for more
#: (see BlobFetch._ask): what an upstream that announces much and sends
#: nothing keeps from the others
FIRST_CLAIM = 1024 * 1024
#: how long a download waits for a grant that evicts (its upstream paused)
#: before going on with the room there is (through memory, if none)
ROOM_WAIT = 2.0


class PeerSource(Interface):
    """Where a cluster node gets what another node owns: a blob download,
    a manifest (see :mod:`registryproxy.cluster.peers`)."""

    def owner_of(self, digest: Digest) -> str | None:
        """The URL of the peer that downloads *digest*; None: this node."""

    def owner(self, key: str) -> str | None:
        """The URL of the peer that fetches what *key* names; None: this node."""

    async def get_manifest(
        self, peer: str, client: RegistryClient, repo: str, reference: str
    ) -> Manifest | None:
        """What the registry stores under *reference*, as *peer* has it;
        None if the peer does not answer."""

    async def get_blob(
        self, peer: str, client: RegistryClient, repo: str, digest: Digest
    ) -> IResponse | None:
        """The blob as *peer* sends it (a 200 whose body is the blob's
        bytes, held back and cut off by the same rules as this node's);
        None if the peer does not answer (this node then fetches it)."""


class BlobFetch:
    """A download in progress. Readers poll :attr:`written`, :attr:`verified`
    and :attr:`error` whenever a listener is called, and :meth:`read` from it."""

    def __init__(
        self,
        digest: Digest,
        size: int | None,
        writer: BlobWriter,
        source: str,
        origin: str = "upstream",
        max_size: int | None = None,
        started: float = 0.0,
        disk_cap: int | None = None,
        grant: Callable[[BlobFetch, int], Deferred[int]] = lambda fetch, wanted: succeed(0),
    ) -> None:
        """*max_size*: the upstream's max_blob_size, for a body whose size
        was not announced: past it, the download fails.  *disk_cap*: the
        bytes it may take on disk (None: all it announced), past which a
        body of announced size asks *grant* for more (evicting for them as
        they come, never up front: an upstream announcing much and sending
        nothing evicts nothing, and claims little), its upstream paused
        while it waits for an answer, and
        one of no announced size, or one that gets no more, goes on through
        memory, stored nowhere.  *started*: when, on the cache's clock (see
        :meth:`claim`)."""
        self.digest = digest
        self.size = size
        self.max_size = max_size
        self.started = started
        self.disk_cap = disk_cap
        self._grant = grant
        #: grants that evicted for it (see BlobCache._granted)
        self.evictions = 0
        self.source = source
        #: where the bytes come from: "upstream", "peer" (the cluster node
        #: downloading them) or "shared" (the cluster's store)
        self.origin = origin
        #: the (upstream, repository) pairs known to may read these bytes,
        #: so joining needs no index lookup (nor waits for its write)
        self.readers: set[tuple[str, str]] = set()
        self.verified = False
        self.error: str | None = None
        #: why bytes that checked out were not kept after all (the store or
        #: the index refused them): its readers had them, who waits for it
        #: to be kept (a prefetch, a repository's link) is told so
        self.unkept: str | None = None
        self._writer = writer
        self._listeners: dict[Callable[[], None], int] = {}
        #: callers holding the fetch open until they listen (see :meth:`hold`)
        self._holds = 0
        #: readers cut off (see :meth:`abandoned`)
        self._cut: set[Callable[[], None]] = set()
        self._ended = False
        #: ended, and nobody reads it any more
        self.closed = False
        self._done: list[Deferred[None]] = []
        #: the upstream body, paused while a memory relay is full or bytes
        #: wait for room (see _flow), and how to stop it for a problem
        #: found outside its dataReceived (see attach)
        self.upstream: IPushProducer | None = None
        self._stop: Callable[[str], None] = self._fail
        self._paused = False
        self._holding = False
        #: bytes received and not yet taken: they wait for a grant of disk
        #: (_room_wait); the first was given one already to go past the cap
        #: (_asked), or for a disk that filled up (_asked_full)
        self._pending: collections.deque[bytes] = collections.deque()
        self._room_wait: Deferred[None] | None = None
        self._asked = self._asked_full = False
        self._taken: list[Deferred[None]] = []

    @property
    def written(self) -> int:
        return self._writer.written

    @property
    def clients(self) -> int:
        """How many readers follow the download now."""
        return len(self._listeners)

    @property
    def running(self) -> bool:
        return not self.verified and self.error is None

    def claim(self, now: float) -> int:
        """Disk bytes this download may still take: what it announced, but
        after ``CLAIM_GRACE`` seconds no more than it could write in
        ``CLAIM_SECONDS`` at the speed it has shown, so that an upstream
        announcing much and sending little cannot keep the disk from others."""
        if self.size is None or self.relayed:
            return 0
        left = max(self.size - self.written, 0)
        if self.disk_cap is not None:  # given disk as its bytes come
            left = min(left, max(self.disk_cap - self.written, 0))
        took = now - self.started
        if took < CLAIM_GRACE:
            return left
        return min(left, int(self.written / took * CLAIM_SECONDS))

    @property
    def relayed(self) -> bool:
        """Whether the bytes only pass through memory (no room to store them)."""
        return isinstance(self._writer, MemoryRelay)

    def fileno(self) -> int | None:
        """The file the download goes to, for sendfile; None when relayed."""
        return self._writer.fileno()

    def readable(self, end: int | None) -> int:
        """How far a reader whose range ends at *end* (None: the whole blob)
        may read now.  Until the digest checks out it is held back from the
        last byte of its range, so no client ever receives a complete body
        with wrong bytes."""
        if self.verified:
            return self.written if end is None else end
        if end is None:
            return self.written
        return min(self.written, end - 1)

    def hold(self) -> None:
        """Keep the bytes readable (even after the download ended) until
        :meth:`release`: for a caller between getting the fetch and listening."""
        self._holds += 1

    def release(self) -> None:
        self._holds -= 1
        self._abandon_if_unwanted()
        self._maybe_close()

    def listen(self, listener: Callable[[], None], position: int = 0) -> None:
        """Follow this fetch from *position* until :meth:`unlisten`."""
        self._listeners[listener] = position

    def moved(self, listener: Callable[[], None], position: int) -> None:
        """*listener* has had the bytes up to *position* (a relay may let go of them)."""
        if listener in self._listeners:
            self._listeners[listener] = position
            self._drain()

    def unlisten(self, listener: Callable[[], None]) -> None:
        self._listeners.pop(listener, None)
        self._abandon_if_unwanted()
        self._drain()
        self._maybe_close()

    def abandoned(self, listener: Callable[[], None]) -> bool:
        """Whether *listener* must give up (its client's download failing):
        the fetch failed, or the reader was cut off for holding up the others."""
        return self.error is not None or listener in self._cut

    @property
    def holding_upstream(self) -> bool:
        """Whether the upstream is paused for a reader that lags (a relay)."""
        return self._paused

    @property
    def waiting_for_room(self) -> bool:
        """Whether the upstream is paused for disk room (at most ROOM_WAIT)."""
        return self._room_wait is not None

    def _abandon_if_unwanted(self) -> None:
        """A relayed download nobody reads any more is of no use to anyone."""
        if self.relayed and not self._listeners and not self._holds and self.running:
            self._fail("every client left a download that is not being stored")
            if self.upstream is not None:
                self.upstream.stopProducing()

    def read(self, listener: Callable[[], None], offset: int, size: int) -> bytes:
        data = self._writer.read(offset, size)
        self.moved(listener, offset + len(data))
        return data

    def _drain(self) -> None:
        """Let a relay drop what every reader has had, and its upstream go
        on once the buffer has room again."""
        if not isinstance(self._writer, MemoryRelay):
            return
        if self._listeners:
            self._writer.trim(min(self._listeners.values()))
        if self._paused and self._writer.buffered < MemoryRelay.LOW:
            self._paused = False
            self._flow()

    def _cut_slowest(self) -> None:
        """A relay's slowest reader kept its buffer full for a whole read
        timeout: cut that client off, so that the others go on."""
        if not self._listeners:
            return
        slowest = min(self._listeners, key=self._listeners.__getitem__)
        log.warn(
            "cutting off a client {behind} bytes behind the download of {digest}",
            behind=self.written - self._listeners[slowest],
            digest=str(self.digest),
        )
        self._cut.add(slowest)
        self._drop(slowest)

    def _drop(self, listener: Callable[[], None]) -> None:
        self._listeners.pop(listener, None)
        try:
            listener()  # it sees abandoned() and aborts its client's download
        except Exception:
            log.failure("a reader of {digest} failed", digest=str(self.digest))
        self._abandon_if_unwanted()
        self._drain()

    def when_stored(self) -> Deferred[None]:
        """Fires when the blob is verified and kept; fails with
        RuntimeError(why) if the download fails or cannot be kept."""
        d: Deferred[None] = Deferred()
        self._done.append(d)
        self._notify()
        return d

    def _notify(self) -> None:
        for listener in list(self._listeners):
            try:
                listener()
            except Exception:
                # one broken reader must not stall the others
                log.failure("a reader of {digest} failed", digest=str(self.digest))
                self._cut.add(listener)
                self._drop(listener)
        if self.relayed:  # nothing will be kept: who waits for that (a prefetch) lets go
            self._settle(self.error or "no room in the cache")
        elif not self.running:
            self._settle(self.error or self.unkept)

    def _settle(self, error: str | None) -> None:
        done, self._done = self._done, []
        for d in done:
            if error is None:
                d.callback(None)
            else:
                d.errback(RuntimeError(error))

    def _maybe_close(self) -> None:
        if self._ended and not self._listeners and not self._holds and not self.closed:
            self.closed = True
            self._writer.close()

    # -- driven by the upstream body --------------------------------------

    def attach(self, upstream: IPushProducer, stop: Callable[[str], None]) -> None:
        """Receive from *upstream* (a new one, when a download is taken
        over), which *stop* ends for a problem with its bytes."""
        self.upstream, self._stop, self._holding = upstream, stop, False
        self._flow()

    def detach(self) -> None:
        """The upstream is gone with an error: bytes it sent that were not
        taken yet go too (a download taken over asks for them again)."""
        self._pending.clear()
        self.upstream = None

    def taken(self) -> Deferred[None]:
        """Fires once every byte received is taken (none waits for room)."""
        if self._room_wait is None and not self._pending:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._taken.append(d)
        return d

    def _flow(self, again: bool = False) -> None:
        """Pause the upstream while a relay is full or bytes wait for disk
        room; let it go on otherwise.  *again*: bytes came while it is held,
        so something resumed it (Twisted does, once a body's first bytes
        are delivered): pause it once more."""
        hold = self._paused or self._room_wait is not None
        if self.upstream is None or (hold == self._holding and not (hold and again)):
            return
        self._holding = hold
        if hold:
            self.upstream.pauseProducing()
        else:
            self.upstream.resumeProducing()

    def _data(self, data: bytes) -> None:
        """Bytes from the upstream, in order: behind any that wait for room."""
        self._pending.append(data)
        if self._room_wait is None:
            self._take()
        if self._paused or self._room_wait is not None:
            self._flow(again=True)

    def _take(self) -> None:
        """Write what was received, until it is all taken or a grant of disk
        room must be waited for (raising OSError or VerificationError for
        bytes that cannot be taken)."""
        while self._pending:
            wait = self._write(self._pending[0])
            if wait is not None:
                if wait.called:  # answered at once: try again
                    continue
                self._room_wait = wait
                wait.addCallback(self._room_came)
                self._flow()
                return
            self._pending.popleft()
            self._asked = self._asked_full = False
            if self.size is not None and self.written > self.size:
                raise VerificationError(f"upstream sent more than the announced {self.size} bytes")
            if self.max_size is not None and self.written > self.max_size:
                raise VerificationError(
                    f"upstream sent more than its max_blob_size of {self.max_size} bytes"
                )
        if (
            isinstance(self._writer, MemoryRelay)
            and self._writer.buffered > MemoryRelay.HIGH
            and not self._paused
        ):
            self._paused = True
            self._flow()
        self._notify()
        self._all_taken()

    def _all_taken(self) -> None:
        taken, self._taken = self._taken, []
        for d in taken:
            d.callback(None)

    def _room_came(self, _: object) -> None:
        self._room_wait = None
        if not self.running:  # failed meanwhile: nothing more is taken
            self._pending.clear()
        try:
            self._take()
        except (OSError, VerificationError) as e:
            self._pending.clear()
            self._stop(str(e))
            self._all_taken()
        self._flow()

    def _write(self, data: bytes) -> Deferred[None] | None:
        """Write *data* (to disk, or through memory), or return a grant of
        room to wait for before trying again, once per chunk: one that then
        does not fit goes through memory.  A chunk the disk took part of
        before it filled up is left with the rest."""
        start = self.written
        end = start + len(data)
        cap = self.disk_cap
        if cap is not None and end > cap and not self.relayed:
            if not self._asked:
                return self._ask(end, raise_cap=True)
            why = (
                f"a body of no announced size outgrew the {cap} bytes free"
                if self.size is None
                else "no room for more of it in the cache"
            )
            self._through_memory(data, start, why)
            return None
        try:
            self._writer.write(data)
        except OSError as e:
            if e.errno != errno.ENOSPC:
                raise
            # the disk filled up under it: evict to make room if the cache
            # can, or else go on through memory for the clients following
            if not self._asked_full:
                self._pending[0] = data[self.written - start :]
                return self._ask(end, raise_cap=False)
            self._through_memory(data, start, "the disk filled up")
        return None

    def _ask(self, end: int, raise_cap: bool) -> Deferred[None]:
        """Ask for free disk for its bytes up to *end*: as much again as it
        sent (at least up to *end*, at most all it announced), so that
        evictions follow the bytes that really come, in few steps; and
        *raise_cap* to what it got.  Nothing is asked for a body of no
        announced size: it has no known need, and nothing is evicted for it."""
        if raise_cap:
            self._asked = True
        else:
            self._asked_full = True
        written = self.written
        wanted = 0 if self.size is None else min(self.size, max(end, 2 * written)) - written
        if wanted <= 0:
            return succeed(None)

        def granted(more: int) -> None:
            if raise_cap and self.disk_cap is not None:
                self.disk_cap = max(self.disk_cap, written + more)

        def failed(failure: Failure) -> None:
            log.failure("asking for room for {digest}", failure, digest=str(self.digest))

        return self._grant(self, wanted).addCallbacks(granted, failed)

    def _through_memory(self, data: bytes, start: int, why: str) -> None:
        """Go on through memory from *data* (to go at *start*) for the
        clients following, keeping nothing, or fail if none follows."""
        if not self._listeners and not self._holds:
            raise OSError(errno.ENOSPC, f"{why} and no client is following")
        log.error(
            "{why} while storing {digest}: passing the rest through uncached",
            digest=str(self.digest),
            why=why,
        )
        self._writer = MemoryRelay(self.digest, self.size, on_disk=self._writer)
        self._writer.write(data[self.written - start :])

    def _commit(self) -> Deferred[None]:
        """Verify the bytes (raising VerificationError) and store them if they are kept."""
        return self._writer.commit()

    def _fail(self, why: str) -> None:
        if self.error is None and not self.verified:
            self.error = why
            self._writer.abort()
            log.warn(
                "download of {digest} from {source} failed: {why}",
                digest=str(self.digest),
                source=self.source,
                why=why,
            )
            self._notify()

    def _end(self) -> None:
        self._ended = True
        self._maybe_close()


class MemoryRelay:
    """A :class:`BlobWriter` that keeps nothing: bytes pass through memory to
    the clients following the fetch, the upstream paused while they lag, for
    when the disk has no room.  Still verified before the last byte goes out.

    It may take over from a writer the disk filled up under (*on_disk*): the
    bytes that writer has stay readable from it, and are discarded at the end."""

    HIGH = 8 * 1024 * 1024
    LOW = 2 * 1024 * 1024

    def __init__(self, digest: Digest, size: int | None, on_disk: BlobWriter | None = None) -> None:
        self.digest = digest
        self.size = size
        self._on_disk = on_disk
        self.written = on_disk.written if on_disk is not None else 0
        self.hasher = on_disk.hasher if on_disk is not None else digest.hasher()
        self._chunks: collections.deque[tuple[int, bytes]] = collections.deque()
        self._base = self.written

    @property
    def buffered(self) -> int:
        return self.written - self._base

    def write(self, data: bytes) -> None:
        self._chunks.append((self.written, data))
        self.hasher.update(data)
        self.written += len(data)

    def read(self, offset: int, size: int) -> bytes:
        if self._on_disk is not None and offset < self._on_disk.written:
            return self._on_disk.read(offset, min(size, self._on_disk.written - offset))
        for start, chunk in self._chunks:
            if start <= offset < start + len(chunk):
                return chunk[offset - start : offset - start + size]
        return b""

    def trim(self, offset: int) -> None:
        while self._chunks and self._chunks[0][0] + len(self._chunks[0][1]) <= offset:
            start, chunk = self._chunks.popleft()
            self._base = start + len(chunk)

    def commit(self) -> Deferred[None]:
        if self._on_disk is not None:
            self._on_disk.abort()
        verify(self.digest, self.size, self.written, self.hasher.hexdigest())
        return succeed(None)

    def abort(self) -> None:
        self._chunks.clear()
        if self._on_disk is not None:
            self._on_disk.abort()

    def close(self) -> None:
        self._chunks.clear()
        if self._on_disk is not None:
            self._on_disk.close()

    def fileno(self) -> int | None:
        return None


class _Hangup(Protocol):
    """Drops a response body we do not want, closing its connection."""

    def connectionMade(self) -> None:
        self.transport.stopProducing()  # type: ignore[union-attr]


class _Receiver(Protocol):
    """Writes the upstream body into a fetch, aborting it on silence, or on
    a trickle: fewer than *min_rate* bytes/s over a window of *read_timeout*
    seconds (a window in which a relay paused the upstream for a lagging
    reader does not count: that is not the upstream's fault)."""

    def __init__(
        self,
        fetch: BlobFetch,
        clock: IReactorTime,
        read_timeout: float,
        done: Callable[[Failure | None], None],
        min_rate: int | None = None,
        skip: int = 0,
    ) -> None:
        """*skip*: bytes at the start of the body that the fetch has already."""
        self._skip = skip
        self._fetch = fetch
        self._clock = clock
        self._timeout = read_timeout
        self._min_rate = min_rate
        self._done = done
        self._timer: IDelayedCall | None = None
        self._window: IDelayedCall | None = None
        #: bytes received in this window, and whether a relay held the upstream in it
        self._received = 0
        self._held = False
        self._problem: str | None = None

    def connectionMade(self) -> None:
        self._fetch.attach(self.transport, self._stop)  # type: ignore[arg-type]
        self._timer = self._clock.callLater(self._timeout, self._stalled)
        if self._min_rate is not None:
            self._window = self._clock.callLater(self._timeout, self._check_rate)

    def _check_rate(self) -> None:
        assert self._min_rate is not None
        if self._problem:
            return
        rate = self._received / self._timeout
        held = self._held or self._fetch.holding_upstream or self._fetch.waiting_for_room
        self._received, self._held = 0, False
        if rate < self._min_rate and not held:
            self._window = None
            self._stop(
                f"upstream sent {rate:.0f} bytes/s over the last {self._timeout:g}s, "
                f"below its min_rate of {self._min_rate} bytes/s"
            )
            return
        self._window = self._clock.callLater(self._timeout, self._check_rate)

    def _stalled(self) -> None:
        self._timer = None
        if self._fetch.waiting_for_room:  # not the upstream's silence either
            self._timer = self._clock.callLater(self._timeout, self._stalled)
            return
        if self._fetch.holding_upstream:
            # not the upstream's silence: a reader holds the relay up
            self._fetch._cut_slowest()
            self._timer = self._clock.callLater(self._timeout, self._stalled)
            return
        self._stop(f"upstream sent nothing for {self._timeout:g}s")

    def _stop(self, why: str) -> None:
        self._problem = why
        if self._fetch.origin != "peer":  # a peer's fault: the cache may go on without it
            self._fetch._fail(why)
        self.transport.stopProducing()  # type: ignore[union-attr,attr-defined]

    def dataReceived(self, data: bytes) -> None:
        if self._problem:
            return
        if self._timer is not None:
            self._timer.reset(self._timeout)
        self._received += len(data)
        if self._skip:
            skipped = min(self._skip, len(data))
            self._skip -= skipped
            data = data[skipped:]
            if not data:
                return
        try:
            self._fetch._data(data)
        except (OSError, VerificationError) as e:
            self._stop(str(e))
        self._held = self._held or self._fetch.holding_upstream

    def connectionLost(self, reason: Failure = Failure(ResponseDone())) -> None:
        for timer in (self._timer, self._window):
            if timer is not None and timer.active():
                timer.cancel()
        self._timer = self._window = None
        if not self._problem and reason.check(ResponseDone, PotentialDataLoss):
            # the whole body came: done once its last bytes are taken
            self._fetch.taken().addCallback(lambda _: self._end(None))
        else:
            self._fetch.detach()
            self._end(reason)

    def _end(self, reason: Failure | None) -> None:
        why = self._problem or self._fetch.error
        if why:
            self._done(Failure(RuntimeError(why)))
        else:
            self._done(reason)


class BlobCache:
    """Blobs by digest: from the store, or fetched once and shared."""

    def __init__(
        self,
        store: BlobStore,
        index: IndexAccess,
        clock: IReactorTime,
        stored: Callable[[], None] = lambda: None,
        max_bytes: int | None = None,
        make_room: Callable[[int, Callable[[], bool]], Deferred[int]] = (
            lambda needed, gave_up: succeed(0)
        ),
        could_fit: Callable[[int], bool] = lambda needed: False,
        peers: PeerSource | None = None,
        verifier: Verifier | None = None,
        shared: SharedStore | None = None,
        tier: LocalTier | None = None,
        redirect: bool = False,
    ) -> None:
        """*peers*: in a cluster, the other nodes, one of which may own a
        download (see :mod:`registryproxy.cluster.peers`); *shared*: the
        cluster's store, of which *store* is this node's local tier (see
        :mod:`.shared`), and *tier* keeps that within its budget."""
        self.store = store
        self._peers = peers
        self._shared = shared
        #: whether clients are sent to the shared store for blobs not here
        self.redirects = redirect and shared is not None
        #: blobs stored here and being published to the shared store: local
        #: copies this node may serve before the index has their rows
        self._publishing: set[str] = set()
        #: the local tier's bookkeeping, in a cluster
        self.tier = tier
        self._verifier = verifier
        self._index = index
        self._clock = clock
        self._stored = stored
        self._max_bytes = max_bytes
        self._make_room = make_room
        #: whether a blob of that many bytes would fit, the cache evicted
        self._could_fit = could_fit
        self._active: dict[Digest, BlobFetch] = {}
        #: downloads that ended but whose clients may still be reading them
        #: (pruned as they close)
        self._followed: set[BlobFetch] = set()
        #: every download not yet finished (relays too), and those of them
        #: still receiving their body (the others are being published)
        self._downloads: set[BlobFetch] = set()
        self._receiving: set[BlobFetch] = set()
        #: why no download starts any more (a shutdown), if none does
        self._refusing: str | None = None
        #: descriptors of stored blobs being read, and their digests
        self._reading: dict[int, str] = {}
        # keyed by repository too: a request for a repository the upstream
        # refuses must not hand its error to another repository's request;
        # and by the peer it comes from (None: the upstream), so a download
        # never waits on a peer that waits on it
        self._starting: SingleFlight[tuple[str, str, Digest, str | None], BlobFetch] = (
            SingleFlight()
        )

    def open_stored(self, digest: Digest) -> int | None:
        """A descriptor of the stored blob, or None; let go with :meth:`close_stored`."""
        try:
            with self.store.open(digest) as f:
                fd = os.dup(f.fileno())
        except FileNotFoundError:
            return None
        self._reading[fd] = str(digest)
        return fd

    def due(self, digest: Digest) -> bool:
        """Whether the stored blob's bytes are to be hashed again before they
        are trusted (its first read since a start, or ``cache.verify_after``)."""
        return self._verifier is not None and self._verifier.due(str(digest))

    async def sound(self, digest: Digest, fd: int) -> bool:
        """Whether the stored blob open as *fd* holds its digest's bytes:
        hashed again when its last check is due (see :mod:`.scrub`, once
        however many readers ask); a rotten one is quarantined."""
        return self._verifier is None or await self._verifier.check(digest, fd)

    def close_stored(self, fd: int) -> None:
        self._reading.pop(fd, None)
        os.close(fd)

    def in_use(self) -> set[str]:
        """The blobs being read, downloaded or published now: evicting them
        frees no space until their readers finish."""
        followed = (str(f.digest) for f in self._followed if not f.closed)
        return {
            *self._reading.values(),
            *(str(d) for d in self._active),
            *self._publishing,
            *followed,
        }

    @property
    def shared(self) -> bool:
        """Whether this is a cluster node's cache (a shared store behind it)."""
        return self._shared is not None

    def presigned(self, digest: Digest) -> Deferred[str]:
        """Where a client gets a stored blob straight from the shared store."""
        assert self._shared is not None
        return self._shared.presigned(digest)

    async def stored_size(self, digest: Digest) -> int | None:
        """The size of *digest* if the cache holds it, else None.  A single
        node's cache is its disk; a cluster's is its index (whose rows name
        what the shared store holds): a local copy the index no longer has
        (purged or evicted by another node) is not the cache's any more."""
        if self._shared is None:
            return self.store.stat(digest)
        name = str(digest)
        if name in self._publishing:
            return self.store.stat(digest)
        sizes = await self._index.quick(lambda index: index.blob_sizes([name]))
        return sizes.get(name)

    def active(self, digest: Digest) -> BlobFetch | None:
        """The download of *digest* being stored, to join: from its first byte."""
        fetch = self._active.get(digest)
        return fetch if fetch is not None and not fetch.relayed else None

    def fetching(self) -> list[dict[str, Any]]:
        """The downloads under way: digest, bytes so far, expected size, source."""
        return [
            {
                "digest": str(f.digest),
                "written": f.written,
                "size": f.size,
                "origin": f.origin,
                "clients": f.clients,
                "repositories": sorted(f"{u}/{r}" for u, r in f.readers)[:5],
            }
            for f in self._downloads
        ]

    @property
    def in_flight(self) -> int:
        return len(self._active)

    @property
    def downloading(self) -> int:
        """Downloads not finished yet, relayed ones too, and blobs being
        published to a cluster's store: what a shutdown waits for."""
        return len(self._downloads) + len(self._publishing)

    def abort_all(self, why: str) -> None:
        """Shutting down: start no more downloads, and fail those still
        receiving their body (their clients' connections aborted, their
        temporary files removed, nothing published).  Those whose bytes are
        all in and checked out finish publishing."""
        self._refusing = why
        for fetch in list(self._receiving):
            fetch._fail(why)
            if fetch.upstream is not None:
                fetch.upstream.stopProducing()

    def _refuse_if_closing(self) -> None:
        if self._refusing is not None:
            raise RegistryError(503, "UNAVAILABLE", f"{self._refusing}: try again shortly")

    def served(self, digest: Digest) -> None:
        """A cached blob was read: remember when, for eviction."""
        when = self._clock.seconds()
        self._index.touch_blob(str(digest), when)
        if self.tier is not None:
            self.tier.served(str(digest), when)

    async def confirm(self, client: RegistryClient, repo: str, digest: Digest) -> bool:
        """Whether the stored copy of *digest* may go to *repo*'s clients:
        its upstream sent these bytes before (to any of its repositories),
        and one of *repo*'s manifests lists the blob (or it was confirmed
        before), or the upstream says so now (HEAD, raising the upstream's
        error if not).

        False when only other upstreams ever sent them: this one must show
        it has the same bytes, by sending them (a download, verified), else
        an upstream that answers 200 to anything, or serves a manifest that
        lists another's digest (a hostile one, or any registry a client
        names), would read what a private one brought in."""
        known = await self._index.quick(
            lambda index: index.blob_known(client.name, repo, str(digest))
        )
        if known == "repository":
            return True
        if known is None:
            return False
        await client.head_blob(repo, str(digest))
        self._link(client, repo, digest)
        return True

    def _link_when_stored(
        self, fetch: BlobFetch, client: RegistryClient, repo: str, digest: Digest
    ) -> None:
        """:meth:`_link` once *fetch*'s bytes checked out and are kept: an
        upstream's 200 followed by other bytes links nothing (else, once
        the digest is stored from elsewhere, it would read that)."""
        fetch.when_stored().addCallbacks(lambda _: self._link(client, repo, digest), lambda _: None)

    def _link(self, client: RegistryClient, repo: str, digest: Digest) -> None:
        """Remember that *repo* may read *digest*: spares a HEAD next time,
        so a full disk that refuses the index write costs only that."""
        self._index.quick(
            lambda index: index.link_blobs(client.name, repo, [str(digest)])
        ).addErrback(
            lambda f: log.error("cannot write the cache index: {why}", why=f.getErrorMessage())
        )

    def _granted(self, fetch: BlobFetch, wanted: int) -> Deferred[int]:
        """Up to *wanted* bytes of disk past those *fetch* has written, whose
        bytes outgrew what it had, evicting for them on a full disk (in at most
        ``ROOM_GRANTS`` grants of one download, as a blob that will not fit
        after all, behind pinned images, must not empty the rest); how many
        it may take.  Evicting, it answers within ``ROOM_WAIT`` seconds with
        the room there is then."""

        def room() -> int:
            try:
                return max(min(wanted, self.store.room() - self._claimed(besides=fetch)), 0)
            except OSError as e:
                log.error("cannot tell the room on the cache's disk: {why}", why=e)
                return 0

        if room() >= wanted:
            return succeed(wanted)
        if fetch.evictions >= ROOM_GRANTS:
            return succeed(room())
        fetch.evictions += 1
        answer: Deferred[int] = Deferred()
        # evicting stops once nobody waits for it (a thread reads it)
        gave_up = threading.Event()

        def made(result: object) -> None:
            if isinstance(result, Failure):  # the index may not be writable on a full disk either
                log.failure(
                    "could not evict to make room for {digest}", result, digest=str(fetch.digest)
                )
            if not answer.called:
                if deadline.active():
                    deadline.cancel()
                answer.callback(room())

        def late() -> None:
            log.warn(
                "making room for {digest} took over {wait}s: going on without it",
                digest=str(fetch.digest),
                wait=ROOM_WAIT,
            )
            gave_up.set()
            answer.callback(room())

        deadline = self._clock.callLater(ROOM_WAIT, late)
        needed = wanted + self._claimed(besides=fetch)
        maybeDeferred(self._make_room, needed, gave_up.is_set).addBoth(made)
        return answer

    def _claimed(self, besides: BlobFetch | None = None) -> int:
        """Disk bytes the downloads still running (but *besides*) will
        plausibly take: their claims."""
        now = self._clock.seconds()
        return sum(f.claim(now) for f in self._active.values() if f is not besides)

    def _fits(self, needed: int) -> bool:
        """Whether *needed* bytes would fit with the cache evicted; False if
        the index cannot say (the blob then goes through memory)."""
        try:
            return self._could_fit(needed)
        except Exception:
            log.failure("could not tell whether a new blob fits")
            return False

    async def fetch(
        self,
        client: RegistryClient,
        repo: str,
        digest: Digest,
        forward: bool = True,
        shared: bool = False,
    ) -> BlobFetch:
        """A download of *digest* that *repo* may read, started by this call
        (the upstream's 200 says the repository may read it) or running
        already for the same repository.  The caller gets it held (see
        :meth:`BlobFetch.hold`) and must release it.  In a cluster it comes
        from the cluster's store if *shared* (the caller confirmed that
        *repo* may read it), else from the node that owns the digest, unless
        *forward* is false (a peer's request: never passed on again)."""
        running = self.active(digest)
        # joined only if this upstream sends it (else another upstream's
        # bytes, right or not, would go to this one's clients)
        if (
            running is not None
            and running.source == client.name
            and (
                (client.name, repo) in running.readers
                or await self._index.quick(
                    lambda index: index.has_blob(client.name, repo, str(digest))
                )
            )
        ):
            if self.active(digest) is running:  # still running after the index answered
                running.hold()
                return running
        source: str | None = "shared" if shared and self._shared is not None else None
        if source is None and forward and self._peers is not None:
            source = self._peers.owner_of(digest)
        fetch = await self._starting.run(
            (client.name, repo, digest, source), lambda: self._start(client, repo, digest, source)
        )
        fetch.hold()  # synchronously on resuming: before anything can end it
        return fetch

    async def _response(
        self, client: RegistryClient, repo: str, digest: Digest, source: str | None
    ) -> tuple[Any, str]:
        """The body of *digest* from *source* ("shared", a peer's URL, or
        None: the upstream), and where it really came from."""
        if source == "shared" and self._shared is not None:
            try:
                return await self._shared.stream(digest), "shared"
            except LookupError:
                # its row outlived its object: forget it, fetch it again
                log.warn("{digest} is in the index but not the shared store", digest=str(digest))
                await self._index.quick(lambda index: index.forget_blob(str(digest)))
                source = self._peers.owner_of(digest) if self._peers is not None else None
        if source is not None and self._peers is not None:
            response = await self._peers.get_blob(source, client, repo, digest)
            if response is not None:
                return response, "peer"
        return await client.get_blob(repo, str(digest)), "upstream"

    async def _start(
        self, client: RegistryClient, repo: str, digest: Digest, source: str | None
    ) -> BlobFetch:
        self._refuse_if_closing()
        response, origin = await self._response(client, repo, digest, source)
        if self._refusing is not None:
            response.deliverBody(_Hangup())
            self._refuse_if_closing()
        running = self.active(digest)
        if running is not None and running.source == client.name:
            # another repository of this upstream's download got there first
            self._link_when_stored(running, client, repo, digest)
            response.deliverBody(_Hangup())
            return running
        size = response.length if origin == "shared" else content_length(response)
        config = client.config
        limit = config.max_blob_bytes
        try:
            # refused on the size announced, before a byte is stored
            too_large = oversize(client.name, limit, config.max_blob_size, str(digest), size)
            if too_large is not None:
                raise too_large
            if running is not None:
                # another upstream's download of the digest runs: this one's
                # bytes go to its own clients, verified, and are not stored
                # (nor is it told what the other sent)
                log.info(
                    "{upstream} sends {digest} while another upstream does: "
                    "passing its bytes through to its clients uncached",
                    upstream=client.name,
                    digest=str(digest),
                )
                writer: BlobWriter = MemoryRelay(digest, size)
                disk_cap = None
            else:
                writer, disk_cap = self._writer(digest, size)
        except BaseException:
            response.deliverBody(_Hangup())  # else its connection stays paused for good
            raise
        fetch = BlobFetch(
            digest,
            size,
            writer,
            client.name,
            origin,
            limit,
            self._clock.seconds(),
            disk_cap,
            self._granted,
        )
        fetch.readers.add((client.name, repo))
        if not fetch.relayed:
            self._active[digest] = fetch
            self._link_when_stored(fetch, client, repo, digest)
        self._downloads.add(fetch)
        self._receiving.add(fetch)
        log.info(
            "fetching {digest} ({size} bytes) from {upstream}/{repo} ({origin})",
            digest=str(digest),
            size=size,
            upstream=client.name,
            repo=repo,
            origin=origin,
        )

        def done(failure: Failure | None) -> None:
            self._receiving.discard(fetch)
            if failure is not None and self._may_resume(fetch):
                # the node sending it died (or gave up): go on from the upstream
                Deferred.fromCoroutine(
                    self._resume(fetch, client, repo, done, describe_failure(failure))
                )
                return
            if failure is not None:
                fetch._fail(describe_failure(failure))
                self._finish(fetch)
                return
            try:
                published = fetch._commit()
            except VerificationError as e:
                fetch._fail(f"upstream content does not match its digest: {e}")
                self._finish(fetch)
                return

            def stored(_: object) -> Deferred[None] | None:
                if fetch.relayed:
                    return None
                if self._shared is not None:
                    # a local copy; the node that got it from the upstream
                    # publishes it, its clients not waiting for that
                    if fetch.origin == "upstream":
                        self._publish(fetch)
                    elif self._verifier is not None:
                        self._verifier.mark(str(digest))
                    return None
                when, size = self._clock.seconds(), fetch.written

                def indexed(_: object) -> None:
                    if self._verifier is not None:
                        self._verifier.mark(str(digest))
                    log.info("stored {digest}", digest=str(digest))
                    self._stored()

                def unindexed(failure: Failure) -> None:
                    fetch.unkept = "cannot write the cache index"
                    self._unindexed(digest, failure.value)

                d = self._index.quick(lambda index: index.put_blob(str(digest), size, when))
                return d.addCallbacks(indexed, unindexed)

            def unstored(failure: Failure) -> None:
                why = failure.getErrorMessage()
                fetch.unkept = f"could not store it: {why}"
                log.error("could not store {digest}: {why}", digest=str(digest), why=why)

            published.addCallbacks(stored, unstored)

            def release(result: object) -> None:
                # The bytes checked out, stored or not: let readers finish.
                # Waiting for the store first means a client that has its
                # whole blob will find it cached on its next request.
                if isinstance(result, Failure):  # no failure goes unsaid
                    log.failure("after storing {digest}", result, digest=str(digest))
                fetch.verified = True
                try:
                    fetch._notify()
                finally:
                    self._finish(fetch)

            published.addBoth(release)

        # held until the callers waiting for this start have taken their own
        # holds: the body may end (a relay: be released) inside deliverBody
        fetch.hold()
        self._clock.callLater(0, fetch.release)
        response.deliverBody(
            _Receiver(fetch, self._clock, config.read_timeout, done, config.min_rate)
        )
        return fetch

    def _may_resume(self, fetch: BlobFetch) -> bool:
        """Whether a download cut short may go on from the upstream: one that
        came from another node (its failure is that node's), nothing wrong
        with what arrived so far, and no shutdown under way."""
        return (
            fetch.origin == "peer"
            and fetch.error is None
            and not fetch.relayed
            and self._refusing is None
            and (fetch.size is None or fetch.written < fetch.size)
        )

    async def _resume(
        self,
        fetch: BlobFetch,
        client: RegistryClient,
        repo: str,
        done: Callable[[Failure | None], None],
        why: str,
    ) -> None:
        """Take over a download whose sending node was lost: the rest of the
        bytes from the upstream (a Range request; the whole blob again, its
        start skipped, from an upstream without ranges), into the same
        download, so that its clients get every byte, checked as before.
        This node then publishes it."""
        log.warn(
            "the node sending {digest} was lost at byte {at} ({why}): "
            "taking the download over from {upstream}",
            digest=str(fetch.digest),
            at=fetch.written,
            why=why,
            upstream=client.name,
        )
        fetch.origin = "upstream"
        self._receiving.add(fetch)
        try:
            response = await client.get_blob(repo, str(fetch.digest), start=fetch.written)
            skip = _resumed_at(response, fetch.written, fetch.size)
        except Exception as e:
            self._receiving.discard(fetch)
            fetch._fail(f"taking over from a lost node failed: {e}")
            self._finish(fetch)
            return
        config = client.config
        response.deliverBody(
            _Receiver(fetch, self._clock, config.read_timeout, done, config.min_rate, skip)
        )

    def _publish(self, fetch: BlobFetch) -> None:
        """Into the shared store, then the index: until both are done this
        node serves its local copy itself (see :meth:`stored_size`)."""
        digest, size, name = fetch.digest, fetch.written, str(fetch.digest)
        self._publishing.add(name)
        assert self._shared is not None
        shared = self._shared

        async def publish() -> None:
            try:
                await shared.upload(digest, self.store.path(digest), size)
                when = self._clock.seconds()
                await self._index.quick(lambda index: index.put_blob(name, size, when))
            except Exception as e:
                log.error(
                    "could not publish {digest} to the cluster: {why}; it is fetched "
                    "again on the next request",
                    digest=name,
                    why=e,
                )
                return
            finally:
                self._publishing.discard(name)
            if self._verifier is not None:
                self._verifier.mark(name)
            log.info("stored {digest} in the cluster", digest=name)
            self._stored()

        Deferred.fromCoroutine(publish())

    def _unindexed(self, digest: Digest, why: BaseException | None) -> None:
        """A blob just published that the index refused: outside the index it
        would count toward no budget and never be evicted, so it goes.  Its
        readers keep their open descriptors; the next request fetches again."""
        log.error(
            "stored {digest} but cannot write the cache index ({why}): "
            "deleting it; it is fetched again on the next request",
            digest=str(digest),
            why=why,
        )
        try:
            self.store.delete(digest)
        except OSError as e:
            log.error(
                "cannot delete {digest} after the failed index write: {why}",
                digest=str(digest),
                why=e,
            )

    def _writer(self, digest: Digest, size: int | None) -> tuple[BlobWriter, int | None]:
        """Where a download goes: the store, or only memory when it cannot
        go there, so the client still gets its bytes; and the bytes it may
        take on disk before it asks for more.

        A body takes at most ``FIRST_CLAIM`` bytes of what is free now, and
        is given more (evicting on a full disk) as its bytes come: claiming
        all it announced up front let an upstream that announces much and
        sends nothing keep the disk from every other download (which then
        evicted, or passed through memory), and evicting for it emptied the
        cache a request at a time."""
        reserved = self._claimed()
        budget = self._max_bytes
        cap = None
        if size is not None:
            if budget is not None and size > budget:
                return _relay(digest, size, f"larger than the cache budget of {budget} bytes"), None
            room = self.store.room() - reserved
            if size > room and not self._fits(size + reserved):
                return _relay(digest, size, f"{max(room, 0)} bytes free for new blobs"), None
            cap = max(min(size, room, FIRST_CLAIM), 0)
        else:
            cap = max(self.store.room() - reserved, 0)
            if budget is not None:
                cap = min(cap, budget)
        try:
            return self.store.begin(digest, size), cap
        except OSError as e:
            return _relay(digest, size, e.strerror or str(e)), None

    def _finish(self, fetch: BlobFetch) -> None:
        self._followed = {f for f in self._followed if not f.closed}
        if self._active.get(fetch.digest) is fetch:
            del self._active[fetch.digest]
        self._downloads.discard(fetch)
        self._receiving.discard(fetch)
        fetch._end()
        if not fetch.closed:
            self._followed.add(fetch)


def _resumed_at(response: IResponse, written: int, size: int | None) -> int:
    """How many bytes of *response* to skip to go on from byte *written*:
    0 for a 206 that starts there, *written* for a 200 of the whole blob;
    raises ValueError for anything else."""
    if response.code == 200:
        length = content_length(response)
        if size is not None and length is not None and length != size:
            response.deliverBody(_Hangup())
            raise ValueError(f"the upstream now sends {length} bytes, not {size}")
        return written
    ranges = response.headers.getRawHeaders(b"Content-Range") or [b""]
    unit, _, span = ranges[0].decode("latin-1").partition(" ")
    first, _, rest = span.partition("-")
    total = rest.partition("/")[2]
    if unit != "bytes" or first != str(written) or (size is not None and total != str(size)):
        response.deliverBody(_Hangup())
        raise ValueError(f"the upstream answered the range with {ranges[0]!r}")
    return 0


def _relay(digest: Digest, size: int | None, why: str) -> MemoryRelay:
    log.error(
        "cannot store {digest} ({size} bytes): {why}; passing it through uncached",
        digest=str(digest),
        size=size,
        why=why,
    )
    return MemoryRelay(digest, size)
