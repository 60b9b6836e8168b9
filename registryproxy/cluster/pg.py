"""The cluster's shared index in PostgreSQL, reached through psycopg 3.

psycopg is used synchronously, so every query runs on a bounded thread pool
of our own (the caller's, who starts and stops it), never on the reactor
thread; connections come from a bounded ``psycopg_pool.ConnectionPool``.

Two ways in:

* :meth:`Database.run` ``(fn)``: *fn* gets a pooled connection inside a
  transaction, committed when it returns, rolled back when it raises;
* :meth:`Database.transaction` and :meth:`Database.connection`: the same,
  as context managers for code already running in a worker thread;
* :meth:`Database.try_lease` ``(key)``: a cluster-wide lease on a key, for
  "one upstream fetch per blob for the whole cluster".
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import ConnectionPool, PoolTimeout
from twisted.internet.defer import Deferred, DeferredSemaphore, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from ..runtime import IReactor
from .engineconfig import PgSettings, redacted_dsn

log = Logger()

T = TypeVar("T")


class Unavailable(Exception):
    """The database cannot be reached."""


def lock_id(key: str) -> int:
    """The signed 64-bit advisory lock number of *key*: the first 8 bytes of
    its BLAKE2b hash, the same on every node and every Python version."""
    digest = hashlib.blake2b(key.encode(), digest_size=8, person=b"regproxy-lease").digest()
    return int.from_bytes(digest, "big", signed=True)


#: a pooled connection's transaction left idle this long is ended by the server
IDLE_IN_TRANSACTION_MS = 30_000
#: and any statement of one that runs this long (the heavy batches are short)
STATEMENT_TIMEOUT_MS = 120_000


def _keepalives(settings: PgSettings, options: str = "") -> dict[str, Any]:
    """libpq keywords for a connection whose silent peer is noticed: the
    server probes ours (so a vanished node's locks and leases go), and we
    probe the server (so a query does not wait on a server that went away);
    *options*: more server settings for the session.  They go after the
    DSN's own ``options`` (or ``PGOPTIONS``), which a keyword would replace."""
    given = conninfo_to_dict(settings.dsn).get("options") or os.environ.get("PGOPTIONS", "")
    return {
        "options": (
            f"{given} -c tcp_keepalives_idle={settings.keepalive_idle}"
            f" -c tcp_keepalives_interval={settings.keepalive_interval}"
            " -c tcp_keepalives_count=3" + options
        ).strip(),
        "keepalives": 1,
        "keepalives_idle": settings.keepalive_idle,
        "keepalives_interval": settings.keepalive_interval,
        "keepalives_count": 3,
    }


class Database:
    """A connection pool to the index database, used from *threadpool*.

    *threadpool* should have at least ``max_size`` threads, so that queries
    wait for connections rather than for threads.  Call :meth:`open` before
    use and :meth:`close` at the end.
    """

    def __init__(self, settings: PgSettings, threadpool: ThreadPool, reactor: IReactor) -> None:
        self.settings = settings
        self._threadpool = threadpool
        self._reactor = reactor
        self._pool = ConnectionPool(
            settings.dsn,
            min_size=settings.min_size,
            max_size=settings.max_size,
            open=False,
            timeout=settings.acquire_timeout,
            kwargs={
                "connect_timeout": settings.libpq_connect_timeout,
                **_keepalives(
                    settings,
                    # a node that vanished inside a transaction (power cut,
                    # partition) holds its locks, the heavy lock's shared
                    # side among them, until the server ends its session
                    f" -c idle_in_transaction_session_timeout={IDLE_IN_TRANSACTION_MS}"
                    # and no query waits (for a lock, say) for ever
                    f" -c statement_timeout={STATEMENT_TIMEOUT_MS}",
                ),
            },
            # a connection the server dropped (restart, failover) is replaced
            # rather than handed out
            check=ConnectionPool.check_connection,
            name="regproxy-index",
        )
        self._lease_slots = DeferredSemaphore(settings.max_leases)

    def _in_thread(self, fn: Callable[..., T], *args: Any) -> Deferred[T]:
        return deferToThreadPool(self._reactor, self._threadpool, fn, *args)

    def open(self) -> Deferred[None]:
        """Open the pool, failing with :class:`Unavailable` if its first
        ``min_size`` connections cannot be made within ``connect_timeout``."""
        settings = self.settings

        def open_() -> None:
            try:
                self._pool.open(wait=True, timeout=max(settings.connect_timeout, 0.1))
            except PoolTimeout as e:
                self._pool.close()
                raise Unavailable(
                    f"cannot connect to PostgreSQL at {redacted_dsn(settings.dsn)} within "
                    f"{settings.connect_timeout}s ({e}): is it running, and does the DSN "
                    "name the right host, port, database and credentials?"
                ) from e

        return self._in_thread(open_)

    def close(self) -> Deferred[None]:
        return self._in_thread(self._pool.close)

    def run(self, fn: Callable[[psycopg.Connection[Any]], T]) -> Deferred[T]:
        """``fn(conn)`` on a thread, in a transaction on a pooled connection:
        committed if *fn* returns, rolled back if it raises.  *fn* must fetch
        what it needs before returning (rows, not cursors)."""

        def work() -> T:
            with self.transaction() as conn:
                return fn(conn)

        return self._in_thread(work)

    @contextmanager
    def connection(self) -> Iterator[psycopg.Connection[Any]]:
        """A pooled connection, for work already in a worker thread (never
        the reactor's) that runs several transactions on it
        (``with conn.transaction(): ...``); back to the pool at the end."""
        with self._pool.connection() as conn:
            yield conn

    @contextmanager
    def transaction(self) -> Iterator[psycopg.Connection[Any]]:
        """A pooled connection in a transaction, for work already in a worker
        thread (never the reactor's): committed at the end of the block,
        rolled back if it raises."""
        with self._pool.connection() as conn, conn.transaction():
            yield conn

    async def try_lease(self, key: str) -> Lease | None:
        """The lease on *key* if nobody in the cluster holds it, else None.

        A lease is a session-level advisory lock (``pg_try_advisory_lock``
        on :func:`lock_id` of *key*) held on a connection of its own until
        :meth:`Lease.release`.  Advisory locks, because the server itself
        releases a session's locks when its connection ends, however it
        ends: a node that crashes, is killed or is cut off mid-fetch cannot
        leave a key locked for ever, and no one has to guess when its lease
        has run out (as with a row holding an expiry time, which also needs
        clock agreement between nodes).  The lock is never taken in a
        transaction, so no commit or rollback can drop it by accident, and it
        does not hold a pooled connection that queries need.

        Waits for a free slot when this node already holds ``max_leases``.
        """
        await self._lease_slots.acquire()
        try:
            lease = await self._in_thread(self._take, key)
        except BaseException:
            self._lease_slots.release()
            raise
        if lease is None:
            self._lease_slots.release()
        return lease

    def _take(self, key: str) -> Lease | None:
        settings = self.settings
        conn = psycopg.connect(
            settings.dsn,
            autocommit=True,
            connect_timeout=settings.libpq_connect_timeout,
            application_name="regproxy-lease",
            **_keepalives(settings),
        )
        try:
            number = lock_id(key)
            row = conn.execute("SELECT pg_try_advisory_lock(%s)", (number,)).fetchone()
        except BaseException:
            conn.close()
            raise
        if not row or not row[0]:
            conn.close()
            return None
        log.debug("leased {key}", key=key)
        return Lease(self, key, number, conn)


class Lease:
    """A held lease on ``key``; :meth:`release` it when done.

    While :meth:`alive` answers True, no other holder can have it.  If the
    connection is lost, the server has released the lock, and another node
    may be fetching the same thing: check :meth:`alive` before publishing
    anything whose uniqueness the lease was meant to ensure.
    """

    def __init__(self, db: Database, key: str, number: int, conn: psycopg.Connection[Any]) -> None:
        self._db = db
        self.key = key
        self.lock_id = number
        self._conn = conn
        #: the server process holding the lock (``pg_terminate_backend`` target)
        self.backend_pid: int = conn.info.backend_pid
        self.released = False

    def alive(self) -> Deferred[bool]:
        """Whether the lease is still held (its connection still answers)."""
        conn = self._conn

        def check() -> bool:
            if conn.closed:
                return False
            try:
                conn.execute("SELECT 1")
            except psycopg.OperationalError:
                return False
            return True

        return self._db._in_thread(check)

    def release(self) -> Deferred[None]:
        """Unlock and close; releasing a lease already lost is no error."""
        if self.released:
            return succeed(None)
        self.released = True
        conn = self._conn

        def release() -> None:
            try:
                if not conn.closed:
                    conn.execute("SELECT pg_advisory_unlock(%s)", (self.lock_id,))
            except psycopg.OperationalError:
                pass  # the connection is gone, and the lock with it
            finally:
                conn.close()

        def free_slot(result: T) -> T:
            self._db._lease_slots.release()
            return result

        return self._db._in_thread(release).addBoth(free_slot)
