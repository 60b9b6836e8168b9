"""Upstreams and pins changed through any node's admin API, for every node.

A single node keeps them in JSON files beside its cache
(:class:`~registryproxy.admin.settings.SavedUpstreams` and ``SavedPins``); a
cluster keeps them in the shared database, one row per upstream and per pin
(so two nodes changing different ones at once lose neither), and each node
reads them back every few seconds (the table, ``regproxy_shared``, is made
when a node joins: :mod:`.membership`).  The same two small APIs face the admin
backend, over a copy in memory: a change is seen at once on the node that
made it, and written to the database in the background.
"""

from __future__ import annotations

import json
from typing import Any

import psycopg
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from .pg import Database, Unavailable

log = Logger()

_UPSTREAM = "upstream:"
_PIN = "pin:"
#: counts purges and evictions anywhere in the cluster
_GENERATION = "generation"


class ClusterSettings:
    """The rows, in memory, and the writes to the database."""

    def __init__(self, db: Database) -> None:
        self._db = db
        self._rows: dict[str, Any] = {}
        #: writes not yet done: a refresh must not undo them meanwhile
        self._pending: dict[str, Any] = {}
        #: this node's removals whose generation is being written
        self._bumping: list[Deferred[int | None]] = []
        self.upstreams = SharedUpstreams(self)
        self.pins = SharedPins(self)

    async def refresh(self) -> bool:
        """Read the rows again: whether they changed (:class:`.pg.Unavailable`
        if the database does not answer)."""

        def read(conn: psycopg.Connection[Any]) -> dict[str, Any]:
            rows = conn.execute("SELECT key, value FROM regproxy_shared").fetchall()
            return {key: json.loads(value) for key, value in rows}

        try:
            rows = await self._db.run(read)
        except psycopg.Error as e:  # a pool that got no connection (PoolTimeout) too
            raise Unavailable(f"reading the cluster's shared settings: {e}") from e
        rows.update(self._pending)
        rows = {k: v for k, v in rows.items() if not (k.startswith(_PIN) and v is None)}
        changed = rows != self._rows
        self._rows = rows
        return changed

    def _write(self, key: str, value: Any, delete: bool = False) -> None:
        self._pending[key] = None if delete else value

        def write(conn: psycopg.Connection[Any]) -> None:
            if delete:
                conn.execute("DELETE FROM regproxy_shared WHERE key = %s", (key,))
            else:
                conn.execute(
                    "INSERT INTO regproxy_shared VALUES (%s, %s)"
                    " ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
                    (key, json.dumps(value, sort_keys=True)),
                )

        def done(result: Any) -> Any:
            if self._pending.get(key, object()) == (None if delete else value):
                self._pending.pop(key, None)
            return result

        d: Deferred[None] = self._db.run(write)
        d.addBoth(done).addErrback(
            lambda f: log.error(
                "could not save {key} for the cluster: {why}", key=key, why=f.getErrorMessage()
            )
        )

    def bump(self) -> None:
        """Tell every node that something was purged or evicted: each reads
        the generation at its next refresh, and looks its answers kept in
        memory up again (this one forgot its own already)."""

        def bump(conn: psycopg.Connection[Any]) -> int:
            row = conn.execute(
                "INSERT INTO regproxy_shared VALUES (%s, '1') ON CONFLICT (key)"
                " DO UPDATE SET value = (regproxy_shared.value::bigint + 1)::text"
                " RETURNING value",
                (_GENERATION,),
            ).fetchone()
            assert row is not None
            return int(row[0])

        async def write() -> int | None:
            try:
                generation: int = await self._db.run(bump)
            except Exception as e:
                log.error("could not tell the cluster of a removal: {why}", why=e)
                return None
            self.seen(generation)
            return generation

        d = Deferred.fromCoroutine(write())
        self._bumping.append(d)

        def done(result: int | None) -> int | None:
            self._bumping.remove(d)
            return result

        d.addCallback(done)

    def seen(self, generation: int) -> None:
        """This node forgot its answers in memory for the removals up to
        *generation* (its own, or another node's that told it so): its
        next refresh need not drop the answers it made since, which are
        fresh.  A removal after them still changes the generation."""
        known = self._rows.get(_GENERATION)
        if not isinstance(known, int) or generation > known:
            self._rows[_GENERATION] = generation

    async def written(self) -> int | None:
        """The generation this node's removals so far wrote, once written
        (None if none was, or a write failed)."""
        last = None
        for d in list(self._bumping):
            generation = await d
            if generation is not None:
                last = generation if last is None else max(last, generation)
        known = self._rows.get(_GENERATION)
        return last if last is not None else (known if isinstance(known, int) else None)

    def rows(self, prefix: str) -> dict[str, Any]:
        return {k[len(prefix) :]: v for k, v in self._rows.items() if k.startswith(prefix)}


class SharedUpstreams:
    """``SavedUpstreams`` for a cluster."""

    def __init__(self, settings: ClusterSettings) -> None:
        self._settings = settings

    def load(self) -> dict[str, dict[str, Any] | None]:
        return self._settings.rows(_UPSTREAM)

    def put(self, name: str, settings: dict[str, Any] | None) -> None:
        self._settings._rows[_UPSTREAM + name] = settings
        self._settings._write(_UPSTREAM + name, settings)


class SharedPins:
    """``SavedPins`` for a cluster: one row per pin."""

    def __init__(self, settings: ClusterSettings) -> None:
        self._settings = settings

    def load(self) -> list[str]:
        return sorted(self._settings.rows(_PIN))

    def save(self, pins: list[str]) -> None:
        before = set(self.load())
        for image in set(pins) - before:
            self._settings._rows[_PIN + image] = True
            self._settings._write(_PIN + image, True)
        for image in before - set(pins):
            self._settings._rows.pop(_PIN + image, None)
            self._settings._write(_PIN + image, None, delete=True)
