"""A cluster node's engines: the shared bucket, the shared index, its peers.

:func:`engines` builds them from the config, unconnected; :meth:`Engines.start`
connects them (in threads: never on the reactor) before the node opens its
ports, and :meth:`Engines.stop` lets go of them.  Each engine has thread pools
of its own, bounded, so a slow bucket or database never takes the threads
the other one (or the reactor's own work) needs.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Any

import attrs
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool
from twisted.web.client import Agent, HTTPConnectionPool

from ..config import Config
from ..runtime import STOP_SECONDS, IReactor, stop_pool, thread_pool, within
from .bucket import Bucket
from .membership import Membership, NameTaken, Node
from .peers import Peers
from .pg import Database
from .pgindex import PgIndex, SharedIndex
from .s3 import S3Store
from .settings import ClusterSettings

log = Logger()

#: S3 calls (uploads, streams, deletes) at once
S3_THREADS = 16
#: seconds after which an unfinished multipart upload is someone's leftover
STALE_UPLOAD = 24 * 3600.0
#: how long /readyz waits for the database or the bucket to answer
PROBE_SECONDS = 5.0


@attrs.define
class Engines:
    database: Database
    index: PgIndex
    access: SharedIndex
    s3: S3Store
    bucket: Bucket
    membership: Membership
    peers: Peers
    pools: list[ThreadPool]
    agent_pool: HTTPConnectionPool
    #: for the local tier's trims
    tier_threads: ThreadPool
    clock: IReactorTime
    #: upstreams and pins changed through the admin API, for every node
    settings: ClusterSettings

    async def start(self) -> None:
        """Connect: the database (and its schema), the bucket (created if
        missing), and join the cluster.  Raises what stops the node."""
        for pool in self.pools:
            pool.start()
        await self.database.open()
        await self.access.heavy(PgIndex.open)
        if await self.s3.ensure_bucket():
            log.info("created the bucket {bucket}", bucket=self.s3.settings.bucket)
        await self._join()
        await self.settings.refresh()

    async def _join(self) -> None:
        """Join; a node restarted after a crash finds its own last heartbeat
        still fresh, and waits for it to go stale (no repair step)."""
        membership = self.membership
        deadline = self.clock.seconds() + membership.timeout + membership.interval
        while True:
            try:
                await membership.join()
                return
            except NameTaken as e:
                if self.clock.seconds() >= deadline:
                    raise
                log.warn("{why}: waiting for its heartbeat to go stale", why=e)
                await deferLater(self.clock, membership.interval, lambda: None)

    @property
    def name(self) -> str | None:
        return self.membership.name

    @property
    def live(self) -> list[Node]:
        return self.membership.live

    async def check(self) -> dict[str, dict[str, Any]]:
        """For /readyz: whether the database and the bucket answer now."""

        def select(conn: Any) -> None:
            conn.execute("SELECT 1").fetchone()

        checks: dict[str, dict[str, Any]] = {}
        for name, probe in (
            ("index", lambda: self.database.run(select)),
            ("bucket", lambda: self.s3.head("readyz")),
        ):
            try:
                # (one that never answers, as a stopped PostgreSQL, is no answer)
                await probe().addTimeout(PROBE_SECONDS, self.clock)
                checks[name] = {"ok": True}
            except defer.TimeoutError:
                checks[name] = {"ok": False, "error": f"no answer within {PROBE_SECONDS:g} s"}
            except Exception as e:
                checks[name] = {"ok": False, "error": str(e)}
        live = self.membership.live
        checks["cluster"] = {"ok": bool(live), "nodes": [node.name for node in live]}
        return checks

    async def forget_everywhere(self, after_removal: bool = False) -> None:
        """Make every other node forget its answers in memory; *after_removal*:
        this node removed something, whose generation they learn with it."""
        generation = await self.settings.written() if after_removal else None
        await self.peers.forget_everywhere(generation)

    def abort_stale_uploads(self) -> Deferred[Any]:
        """Abort what a node that died mid-upload left in the bucket (S3
        keeps, and bills, unfinished multipart uploads until aborted)."""
        return Deferred.fromCoroutine(
            self.s3.abort_stale_uploads(STALE_UPLOAD, self.clock.seconds())
        )

    async def stop(self) -> None:
        await self.agent_pool.closeCachedConnections()
        # (a query_timeout, 30 s by default, is too long a wait at a stop)
        await within(self.access.flush(), STOP_SECONDS, self.clock, "writing the last access times")
        # closing the connections, then the threads: STOP_SECONDS for both
        deadline = self.clock.seconds() + STOP_SECONDS
        await within(self.database.close(), STOP_SECONDS, self.clock, "closing the database pool")
        stop_pool(*self.pools, seconds=max(0.0, deadline - self.clock.seconds()))


def engines(
    config: Config,
    reactor: IReactor,
    busy: Callable[[], Collection[str]],
    status: Callable[[], dict[str, Any]],
) -> Engines:
    """The engines *config* names (it must have a cluster section); *busy*
    and *status* are what this node tells the others at each heartbeat."""
    cluster = config.cluster
    s3_settings = config.cache.storage.s3
    pg_settings = config.cache.index.postgresql
    assert cluster is not None and s3_settings is not None and pg_settings is not None
    # queries wait for connections, not threads: as many threads as connections
    db_threads = thread_pool("regproxy-cluster", 2)
    quick = thread_pool("regproxy-pg", pg_settings.max_size)
    heavy = thread_pool("regproxy-pg-heavy", 1)
    s3_threads = thread_pool("regproxy-s3", S3_THREADS)
    tier_threads = thread_pool("regproxy-tier", 1)
    database = Database(pg_settings, db_threads, reactor)
    index = PgIndex(database)
    s3 = S3Store(s3_settings, s3_threads, reactor)
    membership = Membership(
        database,
        cluster.node,
        cluster.advertise,
        reactor,
        interval=cluster.heartbeat,
        timeout=cluster.node_timeout,
        busy=busy,
        status=status,
    )
    agent_pool = HTTPConnectionPool(reactor, persistent=True)
    agent_pool.maxPersistentPerHost = 8
    agent = Agent(reactor, connectTimeout=cluster.peer_timeout, pool=agent_pool)
    return Engines(
        database=database,
        index=index,
        access=SharedIndex(index, quick, heavy, reactor, pg_settings.query_timeout),
        s3=s3,
        bucket=Bucket(s3, s3_threads, reactor),
        membership=membership,
        peers=Peers(membership, agent, reactor, timeout=cluster.peer_timeout),
        pools=[db_threads, quick, heavy, s3_threads, tier_threads],
        agent_pool=agent_pool,
        tier_threads=tier_threads,
        clock=reactor,
        settings=ClusterSettings(database),
    )
