"""Verified blobs in a real S3 bucket (Swift's s3api): whole or not at all,
streamed back to a protocol as they arrive."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol
from twisted.internet.task import deferLater
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone

from registryproxy.cluster.bucket import Bucket, key
from registryproxy.cluster.s3 import MIN_PART_SIZE, NoSuchKey
from registryproxy.names import Digest

pytestmark = pytest.mark.cluster


class Collect(Protocol):
    def __init__(self, stop_after: int | None = None) -> None:
        self.data = bytearray()
        self.reason: Failure | None = None
        self.done: Deferred[None] = Deferred()
        self._stop_after = stop_after

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        if self._stop_after is not None and len(self.data) >= self._stop_after:
            self._stop_after = None
            self.transport.stopProducing()

    def connectionLost(self, reason: Failure = Failure(ResponseDone())) -> None:
        self.reason = reason
        self.done.callback(None)


def blob(tmp_path: Path, size: int) -> tuple[Digest, Path, bytes]:
    data = os.urandom(size)
    path = tmp_path / "blob"
    path.write_bytes(data)
    return Digest.parse("sha256:" + hashlib.sha256(data).hexdigest()), path, data


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("size", [1000, 2 * MIN_PART_SIZE + 12345], ids=["put", "multipart"])
async def test_upload_then_stream_back(s3_store, threadpool, tmp_path, size):
    bucket = Bucket(s3_store, threadpool, reactor, part_size=MIN_PART_SIZE)
    digest, path, data = blob(tmp_path, size)
    assert await bucket.stat(digest) is None
    await bucket.upload(digest, str(path), size)
    assert await bucket.stat(digest) == size

    body = await bucket.stream(digest)
    assert body.length == size
    collect = Collect()
    body.deliverBody(collect)
    await collect.done
    assert collect.reason is not None and collect.reason.check(ResponseDone)
    assert bytes(collect.data) == data

    body = await bucket.stream(digest, start=size - 100)
    assert (body.length, body.total) == (100, size)
    collect = Collect()
    body.deliverBody(collect)
    await collect.done
    assert bytes(collect.data) == data[-100:]


@pytest_twisted.ensureDeferred
async def test_a_failed_upload_leaves_nothing(s3_store, threadpool, tmp_path):
    """The file is shorter than promised (changed under us): no object, no
    multipart upload left behind."""
    bucket = Bucket(s3_store, threadpool, reactor, part_size=MIN_PART_SIZE)
    digest, path, _ = blob(tmp_path, 2 * MIN_PART_SIZE + 10)
    with pytest.raises(OSError, match="expected"):
        await bucket.upload(digest, str(path), 3 * MIN_PART_SIZE)
    assert await bucket.stat(digest) is None
    assert await s3_store.list_uploads() == []


@pytest_twisted.ensureDeferred
async def test_a_stream_pauses_and_stops(s3_store, threadpool, tmp_path):
    bucket = Bucket(s3_store, threadpool, reactor, part_size=MIN_PART_SIZE)
    digest, path, data = blob(tmp_path, 3 * 1024 * 1024)
    await bucket.upload(digest, str(path), len(data))

    body = await bucket.stream(digest)
    collect = Collect()
    body.deliverBody(collect)
    collect.transport.pauseProducing()
    await deferLater(reactor, 0.3, lambda: None)
    paused_at = len(collect.data)
    await deferLater(reactor, 0.3, lambda: None)
    assert len(collect.data) == paused_at < len(data)  # at most one chunk in flight
    collect.transport.resumeProducing()
    await collect.done
    assert bytes(collect.data) == data

    # a reader that stops halfway gets no ResponseDone: its download failed
    body = await bucket.stream(digest)
    collect = Collect(stop_after=1024 * 1024)
    body.deliverBody(collect)
    await collect.done
    assert collect.reason is not None and not collect.reason.check(ResponseDone)
    assert len(collect.data) < len(data)


@pytest_twisted.ensureDeferred
async def test_a_missing_object(s3_store, threadpool):
    bucket = Bucket(s3_store, threadpool, reactor)
    digest = Digest.parse("sha256:" + "0" * 64)
    assert key(digest) == "blobs/sha256/" + "0" * 64
    with pytest.raises(NoSuchKey):
        await bucket.stream(digest)
