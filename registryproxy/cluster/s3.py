"""A content-addressed blob store's view of an S3 bucket, for the cluster mode.

boto3 is synchronous, so every call runs on a bounded thread pool of our own
(given by the caller, who starts and stops it), never on the reactor thread,
and comes back as a Deferred (or a coroutine, for ``async def`` methods).
One boto3 client serves every thread (clients are thread-safe; sessions are
not); its HTTP connection pool is as large as the thread pool.

Works with AWS S3 and with S3-compatible services (Swift's s3api, Ceph
radosgw, MinIO), which is why the client is configured the way they accept:

* path-style addressing (``host/bucket/key``) for a custom endpoint, since a
  loopback or internal name has no per-bucket DNS;
* checksums only when an operation requires one: botocore >= 1.36 otherwise
  sends ``aws-chunked`` uploads with trailing CRC checksums, which Swift and
  older radosgw refuse;
* a ``Content-MD5`` header on ``DeleteObjects``: botocore >= 1.36 sends a CRC
  instead, and Swift refuses a multi-delete without Content-MD5.

Keys given to and returned by this module are relative to
``S3Settings.prefix``; ranges are half-open, ``[start, end)``, like slices.
"""

from __future__ import annotations

import base64
import hashlib
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import datetime
from typing import Any, TypeVar

import attrs
import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IConsumer, IPushProducer
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from ..runtime import IReactor
from .engineconfig import S3Settings

log = Logger()

T = TypeVar("T")

#: S3's smallest part, for every part of a multipart upload but the last
MIN_PART_SIZE = 5 * 1024 * 1024
#: S3's largest number of parts in one multipart upload
MAX_PARTS = 10_000
#: bytes a streaming read asks for in one thread call
DEFAULT_CHUNK_SIZE = 256 * 1024


@attrs.frozen
class ObjectInfo:
    key: str
    size: int
    etag: str
    last_modified: datetime


@attrs.frozen
class PendingUpload:
    """A multipart upload that was started and neither completed nor aborted."""

    key: str
    upload_id: str
    initiated: datetime


class S3Error(Exception):
    """An S3 call failed; ``code`` is S3's error code (``NoSuchBucket``...),
    or botocore's name for a call that got no answer (``EndpointConnectionError``,
    ``ConnectTimeoutError``, ``ReadTimeoutError``, ``SSLError``, ``NoCredentialsError``)."""

    def __init__(self, operation: str, key: str | None, code: str, message: str) -> None:
        where = f" on {key!r}" if key is not None else ""
        super().__init__(f"S3 {operation}{where} failed: {code}: {message}")
        self.operation = operation
        self.key = key
        self.code = code


class NoSuchKey(S3Error, LookupError):
    """The object (or the multipart upload) does not exist."""


_NOT_FOUND = {"NoSuchKey", "404", "NotFound", "NoSuchUpload"}


def _error(operation: str, key: str | None, e: ClientError) -> S3Error:
    err = e.response.get("Error", {})
    code = str(err.get("Code", "")) or str(
        e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", "")
    )
    cls = NoSuchKey if code in _NOT_FOUND else S3Error
    return cls(operation, key, code, str(err.get("Message", e)))


def _add_content_md5(params: dict[str, Any], **kwargs: Any) -> None:
    """``before-call.s3.DeleteObjects``: the Content-MD5 Swift insists on."""
    body = params["body"]
    if isinstance(body, str):
        body = body.encode()
    params["headers"]["Content-MD5"] = base64.b64encode(hashlib.md5(body).digest()).decode()


def make_client(settings: S3Settings, max_connections: int) -> Any:
    """A boto3 S3 client for *settings* (blocking: loads botocore's models)."""
    config = Config(
        region_name=settings.region,
        connect_timeout=settings.connect_timeout,
        read_timeout=settings.read_timeout,
        retries={"max_attempts": settings.max_attempts, "mode": "standard"},
        max_pool_connections=max_connections,
        s3={"addressing_style": settings.addressing_style},
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    session = boto3.session.Session()
    client = session.client(
        "s3",
        endpoint_url=settings.endpoint,
        aws_access_key_id=settings.access_key,
        aws_secret_access_key=settings.secret_key,
        verify=settings.ca_file if settings.ca_file else None,
        config=config,
    )
    client.meta.events.register("before-call.s3.DeleteObjects", _add_content_md5)
    return client


def _range(start: int, end: int | None) -> str:
    if start < 0 or (end is not None and end <= start):
        raise ValueError(f"bad range [{start}, {end})")
    return f"bytes={start}-" if end is None else f"bytes={start}-{end - 1}"


class S3Store:
    """The bucket of ``settings``, every call on *threadpool*.

    *threadpool* is the caller's to start and stop; its ``max`` bounds both
    the concurrent calls and the client's HTTP connections.
    """

    def __init__(self, settings: S3Settings, threadpool: ThreadPool, reactor: IReactor) -> None:
        self.settings = settings
        self._threadpool = threadpool
        self._reactor = reactor
        self._client: Any = None
        self._client_lock = threading.Lock()

    # -- plumbing ---------------------------------------------------------

    def _key(self, key: str) -> str:
        return self.settings.prefix + key

    def _boto(self) -> Any:
        """The client, built on first use in a worker thread (it reads
        botocore's JSON models: tens of milliseconds the reactor should not
        spend)."""
        with self._client_lock:
            if self._client is None:
                self._client = make_client(self.settings, self._threadpool.max)
            return self._client

    def _call(
        self, operation: str, key: str | None, fn: Callable[..., T], *args: Any, **kwargs: Any
    ) -> Deferred[T]:
        def work() -> T:
            try:
                return fn(self._boto(), *args, **kwargs)
            except ClientError as e:
                raise _error(operation, key, e) from None
            except BotoCoreError as e:
                # no answer: connection refused or timed out, TLS, credentials
                raise S3Error(operation, key, type(e).__name__, str(e)) from e

        return deferToThreadPool(self._reactor, self._threadpool, work)

    # -- the bucket -------------------------------------------------------

    def ensure_bucket(self) -> Deferred[bool]:
        """Create the bucket unless it exists and is ours; True if created."""
        bucket, region = self.settings.bucket, self.settings.region

        def ensure(client: Any) -> bool:
            try:
                client.head_bucket(Bucket=bucket)
                return False
            except ClientError as e:
                status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
                if status != 404:
                    raise
            kwargs: dict[str, Any] = {"Bucket": bucket}
            if region != "us-east-1":
                kwargs["CreateBucketConfiguration"] = {"LocationConstraint": region}
            try:
                client.create_bucket(**kwargs)
            except ClientError as e:
                if e.response.get("Error", {}).get("Code") == "BucketAlreadyOwnedByYou":
                    return False  # another node created it since our HEAD
                raise
            log.info("created bucket {bucket}", bucket=bucket)
            return True

        return self._call("CreateBucket", None, ensure)

    # -- objects ----------------------------------------------------------

    def head(self, key: str) -> Deferred[int | None]:
        """The object's size, or None if there is no such object."""
        bucket, full = self.settings.bucket, self._key(key)

        def head(client: Any) -> int | None:
            try:
                answer = client.head_object(Bucket=bucket, Key=full)
            except ClientError as e:
                if e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404:
                    return None
                raise
            return int(answer["ContentLength"])

        return self._call("HeadObject", key, head)

    def get(self, key: str, start: int = 0, end: int | None = None) -> Deferred[bytes]:
        """Bytes ``[start, end)`` of the object (to its end if *end* is None),
        read whole in one thread call: for small objects and ranges; stream
        big ones with :meth:`open_read`.  An *end* past the object's end is
        cut to it (S3's rule); a *start* past it raises S3Error
        ``InvalidRange``; a missing object, :class:`NoSuchKey`."""
        bucket, full, byte_range = self.settings.bucket, self._key(key), _range(start, end)

        def get(client: Any) -> bytes:
            answer = client.get_object(Bucket=bucket, Key=full, Range=byte_range)
            with answer["Body"] as body:
                return bytes(body.read())

        return self._call("GetObject", key, get)

    async def open_read(self, key: str, start: int = 0, end: int | None = None) -> ObjectReader:
        """A reader of bytes ``[start, end)``: ``await reader.read(n)`` pulls
        at most *n* bytes per thread call; :meth:`ObjectReader.producer`
        feeds a Twisted consumer.  Close it (or read it to the end)."""
        bucket, full, byte_range = self.settings.bucket, self._key(key), _range(start, end)

        def open_(client: Any) -> tuple[Any, int, int]:
            answer = client.get_object(Bucket=bucket, Key=full, Range=byte_range)
            length = int(answer["ContentLength"])
            content_range = answer.get("ContentRange")  # bytes a-b/total
            total = int(content_range.rsplit("/", 1)[1]) if content_range else length
            return answer["Body"], length, total

        body, length, total = await self._call("GetObject", key, open_)
        return ObjectReader(self, key, body, length, total)

    def put(self, key: str, data: bytes) -> Deferred[str]:
        """Store a small object in one request; its ETag."""
        bucket, full = self.settings.bucket, self._key(key)

        def put(client: Any) -> str:
            return str(client.put_object(Bucket=bucket, Key=full, Body=data)["ETag"])

        return self._call("PutObject", key, put)

    def delete(self, key: str) -> Deferred[None]:
        """Delete the object; deleting a missing object is no error."""
        return self._call("DeleteObject", key, self._delete, key)

    def delete_now(self, key: str) -> None:
        """:meth:`delete` in the calling thread, which must not be the reactor's."""
        try:
            self._delete(self._boto(), key)
        except ClientError as e:
            raise _error("DeleteObject", key, e) from None
        except BotoCoreError as e:
            raise S3Error("DeleteObject", key, type(e).__name__, str(e)) from e

    def _delete(self, client: Any, key: str) -> None:
        client.delete_object(Bucket=self.settings.bucket, Key=self._key(key))

    def delete_many(self, keys: Sequence[str]) -> Deferred[list[str]]:
        """Delete up to 1000 objects in one request; the keys that failed
        (missing ones do not: deleting them succeeds)."""
        if len(keys) > 1000:
            raise ValueError("delete_many: at most 1000 keys a call")
        bucket, prefix = self.settings.bucket, self.settings.prefix
        objects = [{"Key": self._key(key)} for key in keys]

        def delete(client: Any) -> list[str]:
            if not objects:
                return []
            answer = client.delete_objects(
                Bucket=bucket, Delete={"Objects": objects, "Quiet": True}
            )
            return [error["Key"][len(prefix) :] for error in answer.get("Errors", [])]

        return self._call("DeleteObjects", None, delete)

    def list_page(
        self, prefix: str = "", start_after: str | None = None, limit: int = 1000
    ) -> Deferred[list[ObjectInfo]]:
        """Up to *limit* objects under *prefix*, in key order, after
        *start_after*: one request, one thread call.  A page shorter than
        *limit* is the last (S3 returns at most 1000 a request)."""
        bucket, own = self.settings.bucket, self.settings.prefix
        kwargs: dict[str, Any] = {
            "Bucket": bucket,
            "Prefix": own + prefix,
            "MaxKeys": min(limit, 1000),
        }
        if start_after is not None:
            kwargs["StartAfter"] = own + start_after

        def list_(client: Any) -> list[ObjectInfo]:
            answer = client.list_objects_v2(**kwargs)
            return [
                ObjectInfo(
                    key=item["Key"][len(own) :],
                    size=int(item["Size"]),
                    etag=str(item.get("ETag", "")),
                    last_modified=item["LastModified"],
                )
                for item in answer.get("Contents", [])
            ]

        return self._call("ListObjectsV2", prefix, list_)

    async def list_pages(
        self, prefix: str = "", page_size: int = 1000
    ) -> AsyncIterator[list[ObjectInfo]]:
        """Every object under *prefix*, a page (one thread call) at a time."""
        page_size = min(page_size, 1000)
        start_after = None
        while True:
            page = await self.list_page(prefix, start_after, page_size)
            if page:
                yield page
            if len(page) < page_size:
                return
            start_after = page[-1].key

    def presign_get(self, key: str, expires_in: int = 3600) -> Deferred[str]:
        """A URL that GETs the object without credentials for *expires_in* seconds."""
        bucket, full = self.settings.bucket, self._key(key)

        def presign(client: Any) -> str:
            return str(
                client.generate_presigned_url(
                    "get_object", Params={"Bucket": bucket, "Key": full}, ExpiresIn=expires_in
                )
            )

        return self._call("PresignGetObject", key, presign)

    # -- multipart uploads ------------------------------------------------

    async def start_upload(self, key: str) -> MultipartUpload:
        """Begin a multipart upload of *key*; nothing is visible at *key*
        until :meth:`MultipartUpload.complete`."""
        bucket, full = self.settings.bucket, self._key(key)

        def create(client: Any) -> str:
            return str(client.create_multipart_upload(Bucket=bucket, Key=full)["UploadId"])

        upload_id = await self._call("CreateMultipartUpload", key, create)
        return MultipartUpload(self, key, upload_id)

    def list_uploads(self, prefix: str = "") -> Deferred[list[PendingUpload]]:
        """The multipart uploads under *prefix* neither completed nor aborted
        (at most 1000: call again after aborting them)."""
        bucket, own = self.settings.bucket, self.settings.prefix

        def list_(client: Any) -> list[PendingUpload]:
            answer = client.list_multipart_uploads(Bucket=bucket, Prefix=own + prefix)
            return [
                PendingUpload(
                    key=item["Key"][len(own) :],
                    upload_id=item["UploadId"],
                    initiated=item["Initiated"],
                )
                for item in answer.get("Uploads", [])
            ]

        return self._call("ListMultipartUploads", prefix, list_)

    async def abort_stale_uploads(self, older_than: float, now: float) -> list[PendingUpload]:
        """Abort the uploads started more than *older_than* seconds before
        *now* (a POSIX time, from the caller's clock): what a node that died
        mid-upload left behind, which S3 keeps (and bills) until aborted.
        The ones aborted."""
        stale = [
            upload
            for upload in await self.list_uploads()
            if now - upload.initiated.timestamp() > older_than
        ]
        for upload in stale:
            await MultipartUpload(self, upload.key, upload.upload_id).abort()
            log.info(
                "aborted a stale upload of {key} started {initiated}",
                key=upload.key,
                initiated=upload.initiated.isoformat(),
            )
        return stale


class MultipartUpload:
    """One multipart upload: parts numbered in the order they are given.

    Every part but the last must be at least :data:`MIN_PART_SIZE` bytes
    (S3 refuses to complete otherwise); parts are sent one at a time, each
    on a thread.
    """

    def __init__(self, store: S3Store, key: str, upload_id: str) -> None:
        self.store = store
        self.key = key
        self.upload_id = upload_id
        self.parts: list[dict[str, Any]] = []
        self.size = 0
        self._last_size = 0

    async def upload_part(self, data: bytes) -> None:
        if len(self.parts) >= MAX_PARTS:
            raise ValueError(f"{self.key}: an upload has at most {MAX_PARTS} parts")
        if self.parts and self._last_size < MIN_PART_SIZE:
            raise ValueError(
                f"{self.key}: part {len(self.parts)} had {self._last_size} bytes; only the "
                f"last part may be smaller than {MIN_PART_SIZE}"
            )
        number = len(self.parts) + 1
        settings = self.store.settings
        full = self.store._key(self.key)

        def upload(client: Any) -> str:
            answer = client.upload_part(
                Bucket=settings.bucket,
                Key=full,
                UploadId=self.upload_id,
                PartNumber=number,
                Body=data,
            )
            return str(answer["ETag"])

        etag = await self.store._call("UploadPart", self.key, upload)
        self.parts.append({"PartNumber": number, "ETag": etag})
        self._last_size = len(data)
        self.size += len(data)

    def complete(self) -> Deferred[str]:
        """Publish the object at its key; its ETag."""
        settings = self.store.settings
        full = self.store._key(self.key)
        parts = list(self.parts)

        def complete(client: Any) -> str:
            answer = client.complete_multipart_upload(
                Bucket=settings.bucket,
                Key=full,
                UploadId=self.upload_id,
                MultipartUpload={"Parts": parts},
            )
            return str(answer.get("ETag", ""))

        return self.store._call("CompleteMultipartUpload", self.key, complete)

    def abort(self) -> Deferred[None]:
        """Drop the parts uploaded so far; an upload already gone is no error."""
        settings = self.store.settings
        full = self.store._key(self.key)

        def abort(client: Any) -> None:
            try:
                client.abort_multipart_upload(
                    Bucket=settings.bucket, Key=full, UploadId=self.upload_id
                )
            except ClientError as e:
                if e.response.get("Error", {}).get("Code") != "NoSuchUpload":
                    raise

        return self.store._call("AbortMultipartUpload", self.key, abort)


class ObjectReader:
    """The body of one ranged GET, read a bounded chunk per thread call."""

    def __init__(self, store: S3Store, key: str, body: Any, length: int, total: int) -> None:
        self._store = store
        self.key = key
        self._body = body
        #: bytes in the range asked for
        self.length = length
        #: the whole object's size
        self.total = total
        self.remaining = length
        self.closed = False

    def read(self, size: int = DEFAULT_CHUNK_SIZE) -> Deferred[bytes]:
        """Up to *size* bytes; b"" at the end (and then the reader is closed)."""
        if self.closed or self.remaining == 0:
            self.close()
            return succeed(b"")
        body = self._body

        def read(client: Any) -> bytes:
            return bytes(body.read(size))

        d = self._store._call("GetObject", self.key, read)

        def got(chunk: bytes) -> bytes:
            self.remaining -= len(chunk)
            if not chunk and self.remaining:
                self.close()
                raise S3Error(
                    "GetObject", self.key, "IncompleteBody", f"{self.remaining} bytes short"
                )
            return chunk

        return d.addCallback(got)

    def close(self) -> None:
        """Let go of the HTTP response (a close, not a drain: it may be large)."""
        if not self.closed:
            self.closed = True
            self._body.close()

    def producer(self, consumer: IConsumer, chunk_size: int = DEFAULT_CHUNK_SIZE) -> Deferred[int]:
        """Write the rest of the range to *consumer*, pausing when it says so;
        fires with the bytes written when done."""
        return _RangeProducer(self, consumer, chunk_size).run()


@implementer(IPushProducer)
class _RangeProducer:
    def __init__(self, reader: ObjectReader, consumer: IConsumer, chunk_size: int) -> None:
        self._reader = reader
        self._consumer = consumer
        self._chunk_size = chunk_size
        self._resumed: Deferred[None] | None = None
        self._stopped = False
        self.written = 0

    def run(self) -> Deferred[int]:
        return Deferred.fromCoroutine(self._run())

    async def _run(self) -> int:
        self._consumer.registerProducer(self, True)
        try:
            while not self._stopped:
                if self._resumed is not None:
                    await self._resumed
                    continue
                chunk = await self._reader.read(self._chunk_size)
                if not chunk or self._stopped:
                    break
                self._consumer.write(chunk)
                self.written += len(chunk)
        finally:
            self._reader.close()
            self._consumer.unregisterProducer()
        return self.written

    def pauseProducing(self) -> None:
        if self._resumed is None:
            self._resumed = Deferred()

    def resumeProducing(self) -> None:
        resumed, self._resumed = self._resumed, None
        if resumed is not None:
            resumed.callback(None)

    def stopProducing(self) -> None:
        self._stopped = True
        self.resumeProducing()
