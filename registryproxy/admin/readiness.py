"""Whether this node can serve (/readyz): its cache directory takes writes,
its default upstream answers, and a cluster's engines answer."""

from __future__ import annotations

import os
import tempfile
from typing import Any, Protocol

from twisted.internet.interfaces import IReactorTime

from ..errors import RegistryError
from ..upstream.registry import Upstreams

#: how long an upstream answer counts as "recent" (no ping needed)
_RECENT = 300.0


class ClusterCheck(Protocol):
    async def check(self) -> dict[str, dict[str, Any]]:
        """Whether the cluster's engines answer: ``{engine: {"ok": bool, ...}}``."""


class Readiness:
    def __init__(
        self,
        cache_dir: str,
        upstreams: Upstreams,
        clock: IReactorTime,
        cluster: ClusterCheck | None = None,
    ) -> None:
        self._cache_dir = cache_dir
        self._upstreams = upstreams
        self._clock = clock
        self._cluster = cluster

    async def ready(self) -> dict[str, Any]:
        checks = {"storage": self._storage_check(), "upstream": await self._upstream_check()}
        if self._cluster is not None:
            checks.update(await self._cluster.check())
        return {"ready": all(check["ok"] for check in checks.values()), "checks": checks}

    def _storage_check(self) -> dict[str, Any]:
        try:
            with tempfile.NamedTemporaryFile(dir=os.path.join(self._cache_dir, "tmp")) as f:
                f.write(b"ready?")
                f.flush()
            return {"ok": True}
        except OSError as e:
            return {"ok": False, "error": f"cache directory not writable: {e.strerror}"}

    async def _upstream_check(self) -> dict[str, Any]:
        client = self._upstreams.default_client()
        now = self._clock.seconds()
        if client.last_answer is None or now - client.last_answer > _RECENT:
            try:
                await client.ping()
            except RegistryError as e:
                return {"ok": False, "upstream": client.name, "error": e.message}
        assert client.last_answer is not None
        return {"ok": True, "upstream": client.name, "answered_at": client.last_answer}
