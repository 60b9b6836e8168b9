"""Who is in the cluster: nodes announce themselves in the shared database.

Each node writes a heartbeat row every ``interval`` seconds; a node whose
last heartbeat is older than ``timeout`` is gone.  Ages are measured by the
database's clock alone, so the nodes' clocks need not agree.  There is no
static member list: a node joins by starting and leaves by stopping (or by
falling silent), and no other node needs a restart for either.

Every heartbeat reads the live nodes back, so each node's view is at most one
interval old.  :meth:`Membership.owner` picks a node for a key by rendezvous
(highest random weight) hashing over that view: every node with the same
view picks the same owner, and a node joining or leaving moves only the keys
it gains or held.

The cluster's shared secret (what nodes show each other on their internal
port) is made once, by whichever node is first, and kept in the database.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import Callable, Collection
from typing import Any

import attrs
import psycopg
from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from ..runtime import STOP_SECONDS, within
from .pg import Database, lock_id

log = Logger()

SCHEMA = """
CREATE TABLE IF NOT EXISTS regproxy_nodes (
    name TEXT PRIMARY KEY,
    advertise TEXT NOT NULL,
    instance TEXT NOT NULL,
    started_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    last_seen TIMESTAMPTZ NOT NULL DEFAULT now()
);
ALTER TABLE regproxy_nodes ADD COLUMN IF NOT EXISTS busy TEXT[] NOT NULL DEFAULT '{}';
ALTER TABLE regproxy_nodes ADD COLUMN IF NOT EXISTS status TEXT NOT NULL DEFAULT '{}';
CREATE TABLE IF NOT EXISTS regproxy_shared (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS regproxy_settings (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""


class NameTaken(Exception):
    """Another live node has this node's name."""


@attrs.frozen
class Node:
    name: str
    #: the URL other nodes reach its internal port on
    advertise: str
    #: seconds since it started, and since its last heartbeat (database clock)
    up_for: float
    silent_for: float
    #: the blobs it was reading or downloading at its last heartbeat
    busy: frozenset[str] = frozenset()
    #: what it said of itself at its last heartbeat (see Membership.status)
    status: str = "{}"


def rendezvous(key: str, nodes: list[Node]) -> Node | None:
    """The node with the highest weight for *key*; None if there are none."""

    def weight(node: Node) -> bytes:
        return hashlib.blake2b(f"{node.name}\0{key}".encode(), digest_size=8).digest()

    return max(nodes, key=weight, default=None)


class Membership(Service):
    """This node's heartbeat, and its view of the live nodes."""

    def __init__(
        self,
        db: Database,
        name: str,
        advertise: str,
        clock: IReactorTime,
        interval: float = 2.0,
        timeout: float = 10.0,
        busy: Callable[[], Collection[str]] = frozenset,
        status: Callable[[], dict[str, Any]] = dict,
    ) -> None:
        """*busy*: the blobs this node reads or downloads now, which no
        node evicts; *status*: what this node tells the others about itself
        (for the admin API's cluster view)."""
        if timeout <= interval:
            raise ValueError("the node timeout must be longer than the heartbeat interval")
        self._db = db
        self.name = name
        self.advertise = advertise
        self._clock = clock
        self.interval = self._interval = interval
        self.timeout = self._timeout = timeout
        self._busy = busy
        self._status = status
        #: tells this process's rows from an earlier one's of the same name
        self._instance = secrets.token_hex(8)
        self._loop: LoopingCall | None = None
        #: fires once the heartbeats have stopped, none under way
        self._beaten: Deferred[Any] = succeed(None)
        #: the live nodes at the last heartbeat, this one included, by name
        self.live: list[Node] = []
        #: the cluster's shared secret, set by :meth:`join`
        self.secret = ""

    async def join(self) -> None:
        """Create the tables if need be, take this node's name (raising
        :class:`NameTaken` if a live node has it) and learn the secret."""
        self.secret = await self._db.run(self._join)
        log.info("node {name} joined the cluster as {url}", name=self.name, url=self.advertise)
        await self.heartbeat()

    def _join(self, conn: psycopg.Connection[Any]) -> str:
        # one node at a time creates the schema (CREATE IF NOT EXISTS races)
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (lock_id("regproxy-schema"),))
        conn.execute(SCHEMA)
        row = conn.execute(
            "SELECT advertise FROM regproxy_nodes WHERE name = %s"
            " AND instance <> %s AND last_seen > now() - make_interval(secs => %s)",
            (self.name, self._instance, self._timeout),
        ).fetchone()
        if row is not None:
            raise NameTaken(
                f"cluster.node {self.name!r} is taken by a live node at {row[0]}: "
                "give every node a name of its own"
            )
        self._beat(conn)
        conn.execute(
            "INSERT INTO regproxy_settings VALUES ('secret', %s) ON CONFLICT DO NOTHING",
            (secrets.token_urlsafe(32),),
        )
        found = conn.execute("SELECT value FROM regproxy_settings WHERE key = 'secret'").fetchone()
        assert found is not None
        return str(found[0])

    def _beat(
        self, conn: psycopg.Connection[Any], busy: list[str] | None = None, status: str = "{}"
    ) -> None:
        conn.execute(
            "INSERT INTO regproxy_nodes (name, advertise, instance, busy, status)"
            " VALUES (%s, %s, %s, %s, %s)"
            " ON CONFLICT (name) DO UPDATE SET advertise = EXCLUDED.advertise,"
            " instance = EXCLUDED.instance, last_seen = now(), busy = EXCLUDED.busy,"
            " status = EXCLUDED.status,"
            " started_at = CASE WHEN regproxy_nodes.instance = EXCLUDED.instance"
            "   THEN regproxy_nodes.started_at ELSE now() END",
            (self.name, self.advertise, self._instance, busy or [], status),
        )

    async def heartbeat(self) -> None:
        """Say this node is alive, and read back who else is."""

        busy = sorted(self._busy())
        status = json.dumps(self._status())

        def beat(conn: psycopg.Connection[Any]) -> list[Node]:
            self._beat(conn, busy, status)
            rows = conn.execute(
                "SELECT name, advertise,"
                " extract(epoch FROM now() - started_at), extract(epoch FROM now() - last_seen),"
                " busy, status"
                " FROM regproxy_nodes WHERE last_seen > now() - make_interval(secs => %s)"
                " ORDER BY name",
                (self._timeout,),
            ).fetchall()
            return [
                Node(name, url, float(up), float(silent), frozenset(busy), status)
                for name, url, up, silent, busy, status in rows
            ]

        live = await self._db.run(beat)
        before, after = {n.name for n in self.live}, {n.name for n in live}
        for name in sorted(after - before - {self.name}):
            log.info("node {name} is in the cluster", name=name)
        for name in sorted(before - after):
            log.warn("node {name} left the cluster (or fell silent)", name=name)
        self.live = live

    def busy_elsewhere(self) -> set[str]:
        """The blobs the other live nodes were reading or downloading at
        their last heartbeat."""
        return {d for node in self.live if node.name != self.name for d in node.busy}

    def owner(self, key: str) -> Node | None:
        """The live node that owns *key*, by rendezvous hashing."""
        return rendezvous(key, self.live)

    async def leave(self) -> None:
        """Drop this node's row, so the others see it gone at once."""

        def delete(conn: psycopg.Connection[Any]) -> None:
            conn.execute(
                "DELETE FROM regproxy_nodes WHERE name = %s AND instance = %s",
                (self.name, self._instance),
            )

        await self._db.run(delete)
        log.info("node {name} left the cluster", name=self.name)

    # -- as a service: heartbeats while running ------------------------------

    def startService(self) -> None:
        super().startService()
        self._loop = LoopingCall(self._logged_heartbeat)
        self._loop.clock = self._clock
        self._beaten = self._loop.start(self._interval, now=False)

    def stopService(self) -> Deferred[None]:
        """Leave once a heartbeat under way has ended (its row written after
        the leave's delete would bring this node back for node_timeout), if
        the database answers within STOP_SECONDS: else the others see this
        node gone at node_timeout."""
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()

        async def leave() -> None:
            await self._beaten
            await self.leave()

        return within(
            Deferred.fromCoroutine(leave()), STOP_SECONDS, self._clock, "leaving the cluster"
        )

    def _logged_heartbeat(self) -> Deferred[None]:
        def failed(failure: Any) -> None:
            log.warn(
                "node {name}: heartbeat failed: {why}",
                name=self.name,
                why=failure.getErrorMessage(),
            )

        return Deferred.fromCoroutine(self.heartbeat()).addErrback(failed)
