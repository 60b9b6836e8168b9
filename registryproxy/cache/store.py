"""The content-addressed blob store: bytes by digest, verified before commit.

:class:`BlobStore` is the small interface the rest of regproxy sees, so a
shared object store can be a second backend later; :class:`FileStore` keeps
blobs on the local filesystem.  A blob becomes visible only by an atomic
rename after its size and digest check out and its bytes are on disk, so a
crash or cut connection can never leave a half-written entry to be served.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import threading
import time
from typing import BinaryIO, Protocol

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from ..names import Digest
from ..runtime import Threads

log = Logger()

#: free space left alone on the cache's file system (at most 5% of it)
_RESERVE = 64 * 1024 * 1024
#: how long a written file's fsync and rename into place may take: past it
#: the disk is taken for one that does not answer (a dying disk, a hard NFS
#: mount), and the file is not kept; what was written and checked is still
#: served, and the clients of its download no longer wait for the disk
PUBLISH_SECONDS = 60.0


class VerificationError(Exception):
    """The bytes written do not match the digest or size they were promised."""


class DiskTimeout(OSError):
    """The disk did not take a written file within :data:`PUBLISH_SECONDS`."""


class BlobWriter(Protocol):
    digest: Digest
    written: int
    #: the digest's hash of what was written so far
    hasher: hashlib._Hash

    def write(self, data: bytes) -> None: ...
    def read(self, offset: int, size: int) -> bytes:
        """Bytes written so far, for streaming a download to clients while it
        is still being written; valid until :meth:`close`, even after commit."""

    def commit(self) -> Deferred[None]:
        """Verify (raising :class:`VerificationError` at once) and publish."""

    def abort(self) -> None: ...
    def close(self) -> None:
        """Release what :meth:`read` needs."""

    def fileno(self) -> int | None:
        """A descriptor to read the bytes written from (for sendfile), if any."""


def verify(digest: Digest, expected_size: int | None, written: int, actual_hex: str) -> None:
    if expected_size is not None and written != expected_size:
        raise VerificationError(f"expected {expected_size} bytes, got {written}")
    if actual_hex != digest.hex:
        raise VerificationError(f"content is {digest.algorithm}:{actual_hex}")


class BlobStore(Protocol):
    def path(self, digest: Digest) -> str:
        """Where the stored blob's file is (to upload or hash it whole)."""

    def stat(self, digest: Digest) -> int | None:
        """The size of a stored blob, or None."""

    def open(self, digest: Digest) -> BinaryIO:
        """A seekable reader; raises FileNotFoundError if absent."""

    def begin(self, digest: Digest, size: int | None) -> BlobWriter: ...
    def delete(self, digest: Digest) -> bool: ...
    def quarantine(self, digest: Digest) -> None:
        """Set a stored file found rotten aside, where nothing serves it."""

    def room(self) -> int:
        """Bytes a new blob may take, keeping some free space in reserve."""


class FileStore:
    """Blobs under ``<root>/blobs/<alg>/<2 hex>/<hex>``, temp files under ``<root>/tmp``."""

    def __init__(self, root: str, threads: Threads) -> None:
        """*threads*: where new files are flushed and renamed into place, and
        the store is scanned (fsck)."""
        self.root = os.path.abspath(root)
        self.threads = threads
        self._tmp = os.path.join(self.root, "tmp")
        os.makedirs(os.path.join(self.root, "blobs"), exist_ok=True)
        # Anything in tmp/ is an interrupted write from an earlier run.
        if os.path.isdir(self._tmp):
            leftovers = os.listdir(self._tmp)
            if leftovers:
                log.info("removing {n} interrupted writes", n=len(leftovers))
            shutil.rmtree(self._tmp)
        os.makedirs(self._tmp)

    def path(self, digest: Digest) -> str:
        return os.path.join(self.root, "blobs", digest.algorithm, digest.hex[:2], digest.hex)

    def stat(self, digest: Digest) -> int | None:
        try:
            return os.stat(self.path(digest)).st_size
        except FileNotFoundError:
            return None

    def open(self, digest: Digest) -> BinaryIO:
        return open(self.path(digest), "rb")

    def begin(self, digest: Digest, size: int | None) -> _FileWriter:
        return _FileWriter(self, digest, size)

    def room(self) -> int:
        disk = os.statvfs(self._tmp)
        reserve = min(_RESERVE, disk.f_blocks * disk.f_frsize // 20)
        return disk.f_bavail * disk.f_frsize - reserve

    def delete(self, digest: Digest) -> bool:
        try:
            os.unlink(self.path(digest))
            return True
        except FileNotFoundError:
            return False

    def quarantine(self, digest: Digest) -> None:
        """Into ``quarantine/``, named by the digest and the time, for a look."""
        quarantine = os.path.join(self.root, "quarantine")
        os.makedirs(quarantine, exist_ok=True)
        try:
            os.replace(
                self.path(digest),
                os.path.join(quarantine, f"{digest.algorithm}-{digest.hex}.{int(time.time())}"),
            )
        except FileNotFoundError:
            pass  # gone meanwhile: nothing left to serve


class _FileWriter:
    def __init__(self, store: FileStore, digest: Digest, size: int | None) -> None:
        self.digest = digest
        self.size = size
        self.written = 0
        self._store = store
        self.hasher = digest.hasher()
        fd, self._path = tempfile.mkstemp(dir=store._tmp, prefix=digest.hex[:16] + ".")
        #: decides between the publishing thread's rename and a deadline
        #: giving up on it; held only to flip these flags, never across I/O
        #: (the reactor thread takes it)
        self._fate = threading.Lock()
        self._renaming = self._abandoned = False
        # Unbuffered, so readers following the file see every byte at once.
        self._file = os.fdopen(fd, "wb", buffering=0)
        # One descriptor for every follower, opened now: it stays valid after
        # the temp file is renamed into place (or unlinked).
        try:
            self._read_fd: int | None = os.open(self._path, os.O_RDONLY)
        except OSError:
            self._file.close()
            os.unlink(self._path)
            raise

    def write(self, data: bytes) -> None:
        # An unbuffered write may take only part of the data (a disk nearly
        # full): hash and count only what is on disk, and write the rest
        # again, which raises ENOSPC if nothing more fits.
        view = memoryview(data)
        while view:
            taken = self._file.write(view)
            self.hasher.update(view[:taken])
            self.written += taken
            view = view[taken:]

    def read(self, offset: int, size: int) -> bytes:
        if self._read_fd is None:
            raise ValueError("read after close")
        return os.pread(self._read_fd, size, offset)

    def fileno(self) -> int | None:
        return self._read_fd

    def close(self) -> None:
        if self._read_fd is not None:
            os.close(self._read_fd)
            self._read_fd = None

    def commit(self) -> Deferred[None]:
        """Publish in the store's threads, answered within
        :data:`PUBLISH_SECONDS`: with :class:`DiskTimeout` if the file's
        fsync had not ended by then (the thread then leaves it out of the
        store whenever the disk answers), with success if its rename had
        begun (it is in place, or will be: only the rename and the
        directory's fsync, for durability after a crash, were left)."""
        try:
            verify(self.digest, self.size, self.written, self.hasher.hexdigest())
        except VerificationError:
            self.abort()
            raise
        answer: Deferred[None] = Deferred()
        seconds = PUBLISH_SECONDS

        def late() -> None:
            with self._fate:
                self._abandoned = not self._renaming
            if self._abandoned:
                answer.errback(
                    DiskTimeout(f"the disk did not take the file within {seconds:g} s; not kept")
                )
            else:
                log.warn(
                    "{digest}: the disk is slow to put the file in place ({seconds} s)",
                    digest=str(self.digest),
                    seconds=seconds,
                )
                answer.callback(None)

        deadline = self._store.threads.reactor.callLater(seconds, late)

        def published(result: None | Failure) -> None:
            if deadline.active():
                deadline.cancel()
            if not answer.called:
                answer.callback(None) if result is None else answer.errback(result)
            elif isinstance(result, Failure):
                log.info("{digest}: {why}", digest=str(self.digest), why=result.getErrorMessage())

        self._store.threads.run(self._publish).addBoth(published)
        return answer

    def _publish(self) -> None:
        try:
            if self._abandoned:  # (its turn came too late)
                raise DiskTimeout("given up before the disk was asked; not kept")
            on_disk = os.fstat(self._file.fileno()).st_size
            if on_disk != self.written:  # never publish a file that is not what was hashed
                raise VerificationError(f"{on_disk} bytes on disk, {self.written} written")
            os.fsync(self._file.fileno())
            self._file.close()
            final = self._store.path(self.digest)
            os.makedirs(os.path.dirname(final), exist_ok=True)
            with self._fate:
                if self._abandoned:
                    raise DiskTimeout("the disk answered after the deadline; not kept")
                self._renaming = True
            os.rename(self._path, final)
            dirfd = os.open(os.path.dirname(final), os.O_RDONLY)
            try:
                os.fsync(dirfd)
            finally:
                os.close(dirfd)
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        if not self._file.closed:
            self._file.close()
        try:
            os.unlink(self._path)
        except FileNotFoundError:
            pass
