"""A cluster's shared blobs: verified content in an S3 bucket, by digest.

An object appears under ``blobs/<algorithm>/<hex>`` only once its bytes are
known good: :meth:`Bucket.upload` sends a local file whose size and digest
were already checked (the node's own download), as one PUT or as a
multipart upload completed only when every part is in and aborted if any
fails, so no reader ever finds a partial object under a digest.

Reading goes the other way as a stream: :meth:`Bucket.stream` gives a body
that delivers its bytes to a Twisted protocol as they arrive from the
bucket, with pause and resume, in the shape an upstream response has
(``length``, ``deliverBody``), so a node serves a blob another node stored
with the same machinery it uses for an upstream download.
"""

from __future__ import annotations

import os

from twisted.internet.defer import Deferred, DeferredSemaphore
from twisted.internet.interfaces import IConsumer, IProducer
from twisted.internet.protocol import Protocol
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from twisted.web.client import ResponseDone
from zope.interface import implementer

from ..names import Digest
from ..runtime import IReactor
from .s3 import DEFAULT_CHUNK_SIZE, MIN_PART_SIZE, NoSuchKey, ObjectReader, S3Store

log = Logger()

#: bytes per part of a multipart upload (S3 wants >= 5 MiB but the last);
#: files up to this size go in one PUT
PART_SIZE = 16 * 1024 * 1024
#: uploads at once, each holding up to PART_SIZE bytes in memory
UPLOADS = 4
#: how long a redirect to the bucket stays good
PRESIGNED_SECONDS = 3600


def key(digest: Digest) -> str:
    return f"blobs/{digest.algorithm}/{digest.hex}"


class Bucket:
    def __init__(
        self, s3: S3Store, threadpool: ThreadPool, reactor: IReactor, part_size: int = PART_SIZE
    ) -> None:
        if part_size < MIN_PART_SIZE:
            raise ValueError(f"part_size: at least {MIN_PART_SIZE} bytes")
        self._s3 = s3
        self._threadpool = threadpool
        self._reactor = reactor
        self._part_size = part_size
        # each upload holds up to a part in memory: a burst of cold blobs
        # must not hold them all at once
        self._uploading = DeferredSemaphore(UPLOADS)

    def stat(self, digest: Digest) -> Deferred[int | None]:
        """The stored object's size, or None."""
        return self._s3.head(key(digest))

    def delete(self, digest: Digest) -> Deferred[None]:
        return self._s3.delete(key(digest))

    def delete_now(self, digest: Digest) -> None:
        """:meth:`delete`, in the calling thread (eviction's worker, never the reactor's)."""
        self._s3.delete_now(key(digest))

    def presigned(self, digest: Digest) -> Deferred[str]:
        """A URL that GETs the object without credentials for an hour."""
        return self._s3.presign_get(key(digest), PRESIGNED_SECONDS)

    async def get(self, digest: Digest) -> bytes | None:
        """A small object whole (a manifest); None if absent."""
        try:
            return await self._s3.get(key(digest))
        except NoSuchKey:
            return None

    def _read(self, path: str, offset: int, size: int) -> Deferred[bytes]:
        def read() -> bytes:
            with open(path, "rb") as f:
                return os.pread(f.fileno(), size, offset)

        return deferToThreadPool(self._reactor, self._threadpool, read)

    async def upload(self, digest: Digest, path: str, size: int) -> None:
        """Publish the verified file at *path* (*size* bytes) as *digest*
        (at most :data:`UPLOADS` at once, the others waiting their turn)."""
        await self._uploading.acquire()
        try:
            await self._upload(digest, path, size)
        finally:
            self._uploading.release()

    async def _upload(self, digest: Digest, path: str, size: int) -> None:
        name = key(digest)
        if size <= self._part_size:
            data = await self._read(path, 0, size)
            _check_length(name, data, size)
            await self._s3.put(name, data)
            return
        upload = await self._s3.start_upload(name)
        try:
            for offset in range(0, size, self._part_size):
                data = await self._read(path, offset, min(self._part_size, size - offset))
                _check_length(name, data, min(self._part_size, size - offset))
                await upload.upload_part(data)
            await upload.complete()
        except BaseException:
            await upload.abort()
            raise
        log.info("uploaded {digest} to the bucket ({size} bytes)", digest=str(digest), size=size)

    async def stream(self, digest: Digest, start: int = 0) -> ObjectBody:
        """The object's bytes from *start*, to deliver to a protocol;
        raises :class:`~registryproxy.cluster.s3.NoSuchKey` if absent."""
        reader = await self._s3.open_read(key(digest), start)
        return ObjectBody(reader)


def _check_length(name: str, data: bytes, size: int) -> None:
    if len(data) != size:  # the file changed under us: never publish that
        raise OSError(f"{name}: read {len(data)} bytes of the local file, expected {size}")


class ObjectBody:
    """An object's bytes in the shape of a response body: :attr:`length`
    and :meth:`deliverBody`, whose protocol gets ``connectionLost`` with
    ``ResponseDone`` at the end or the failure that cut it short.  The
    reader's own push producer is the protocol's transport (pause, resume,
    stop)."""

    def __init__(self, reader: ObjectReader, chunk_size: int = DEFAULT_CHUNK_SIZE) -> None:
        self._reader = reader
        self._chunk_size = chunk_size
        self.length = reader.length
        #: the whole object's size (the range may start later)
        self.total = reader.total

    def deliverBody(self, protocol: Protocol) -> None:
        def ended(result: int | Failure) -> None:
            if isinstance(result, Failure):
                protocol.connectionLost(result)
            elif result < self.length:  # stopped by the protocol, or cut short
                protocol.connectionLost(Failure(ConnectionAbortedError("body stopped short")))
            else:
                protocol.connectionLost(Failure(ResponseDone()))

        self._reader.producer(_Delivery(protocol), self._chunk_size).addBoth(ended)


@implementer(IConsumer)
class _Delivery:
    """A protocol as the consumer a producer writes to."""

    def __init__(self, protocol: Protocol) -> None:
        self._protocol = protocol

    def registerProducer(self, producer: IProducer, streaming: bool) -> None:
        self._protocol.makeConnection(producer)  # type: ignore[arg-type]

    def unregisterProducer(self) -> None:
        pass

    def write(self, data: bytes) -> None:
        self._protocol.dataReceived(data)


__all__ = ["Bucket", "NoSuchKey", "ObjectBody", "key"]
