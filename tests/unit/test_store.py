"""The blob store publishes exactly the bytes it hashed, or nothing."""

from __future__ import annotations

import errno
import hashlib
import os
import threading
import time

import pytest
import pytest_twisted
from proxyharness import until
from twisted.internet import reactor

from registryproxy.cache import store as store_module
from registryproxy.cache.store import DiskTimeout, FileStore, VerificationError
from registryproxy.names import Digest
from registryproxy.runtime import Threads


def digest_of(data: bytes) -> Digest:
    return Digest.parse("sha256:" + hashlib.sha256(data).hexdigest())


class Dribble:
    """A file that takes at most *most* bytes per write, as a nearly full
    disk does; after *room* bytes in all it fails with ENOSPC."""

    def __init__(self, file, most: int, room: int | None = None) -> None:
        self._file = file
        self._most = most
        self._room = room
        self.taken = 0

    def write(self, data) -> int:
        if self._room is not None and self.taken >= self._room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        most = self._most if self._room is None else min(self._most, self._room - self.taken)
        taken = self._file.write(data[:most])
        self.taken += taken
        return taken

    def __getattr__(self, name):
        return getattr(self._file, name)


@pytest_twisted.ensureDeferred
async def test_short_writes_are_completed(tmp_path):
    store = FileStore(str(tmp_path), Threads(reactor, "test-files"))
    data = os.urandom(10_000)
    writer = store.begin(digest_of(data), len(data))
    writer._file = Dribble(writer._file, most=999)
    writer.write(data[:6000])
    writer.write(data[6000:])
    assert writer.written == len(data)
    assert writer.read(0, len(data)) == data
    await writer.commit()
    assert (tmp_path / "blobs" / "sha256").exists()
    with store.open(digest_of(data)) as f:
        assert f.read() == data


def test_a_full_disk_counts_only_what_was_written(tmp_path):
    store = FileStore(str(tmp_path), Threads(reactor, "test-files"))
    data = os.urandom(10_000)
    writer = store.begin(digest_of(data), len(data))
    writer._file = Dribble(writer._file, most=4096, room=5000)
    with pytest.raises(OSError) as raised:
        writer.write(data)
    assert raised.value.errno == errno.ENOSPC
    assert writer.written == 5000
    assert writer.read(0, 10_000) == data[:5000]
    with pytest.raises(VerificationError):
        writer.commit()
    assert os.listdir(tmp_path / "tmp") == []


@pytest_twisted.ensureDeferred
async def test_a_file_that_is_not_what_was_hashed_is_never_published(tmp_path):
    store = FileStore(str(tmp_path), Threads(reactor, "test-files"))
    data = os.urandom(10_000)
    writer = store.begin(digest_of(data), len(data))
    writer.write(data)
    os.ftruncate(writer._file.fileno(), 9_000)  # the file lost bytes behind our back
    with pytest.raises(VerificationError):
        await writer.commit()
    assert store.stat(digest_of(data)) is None
    assert os.listdir(tmp_path / "tmp") == []


@pytest.mark.parametrize("hangs", ["file", "rename", "directory"])
@pytest_twisted.ensureDeferred
async def test_a_publish_past_its_deadline_is_answered_at_it(tmp_path, monkeypatch, hangs):
    """The deadline answers whatever hangs, without waiting for the
    publishing thread (the reactor thread waits for nothing of the disk's):
    a file whose fsync had not ended is never put in place (DiskTimeout);
    one whose rename had begun is, or will be (success)."""
    monkeypatch.setattr(store_module, "PUBLISH_SECONDS", 0.1)
    store = FileStore(str(tmp_path), Threads(reactor, "test-files"))
    data = os.urandom(1000)
    writer = store.begin(digest_of(data), len(data))
    writer.write(data)
    disk = threading.Event()
    fsync, rename = os.fsync, os.rename
    tmp, blobs = str(tmp_path / "tmp"), str(tmp_path / "blobs")

    def hung_fsync(fd: int) -> None:
        where = os.readlink(f"/proc/self/fd/{fd}")
        if where.startswith(tmp if hangs == "file" else blobs) and hangs != "rename":
            disk.wait(30)
        fsync(fd)

    def hung_rename(source: str, target: str) -> None:
        if hangs == "rename":
            disk.wait(30)
        rename(source, target)

    monkeypatch.setattr(os, "fsync", hung_fsync)
    monkeypatch.setattr(os, "rename", hung_rename)
    started = time.monotonic()
    committed = writer.commit()
    reactor.callLater(0.5, disk.set)
    try:
        if hangs == "file":
            with pytest.raises(DiskTimeout):
                await committed
        else:
            await committed
        assert not disk.is_set()  # answered at the deadline, the disk still hanging
        assert time.monotonic() - started < 5  # (the disk waits 30 s at most)
    finally:
        disk.set()
    if hangs == "file":
        await until(lambda: os.listdir(tmp_path / "tmp") == [])
        assert store.stat(digest_of(data)) is None
    else:
        await until(lambda: store.stat(digest_of(data)) == len(data))
    writer.close()
