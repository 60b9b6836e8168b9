"""Run one coroutine per key at a time; everyone asking meanwhile shares its result.

The work runs on its own, not inside the first caller: a caller that goes
away (a client disconnecting) cancels only its own wait, never the shared
work the others are waiting for.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Hashable
from typing import Any, Generic, TypeVar

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.python.failure import Failure

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class SingleFlight(Generic[K, V]):
    def __init__(self) -> None:
        self._waiting: dict[K, list[Deferred[V]]] = {}

    async def run(self, key: K, start: Callable[[], Coroutine[Any, Any, V]]) -> V:
        mine: Deferred[V] = Deferred()
        if key in self._waiting:
            self._waiting[key].append(mine)
        else:
            self._waiting[key] = [mine]
            ensureDeferred(start()).addBoth(self._done, key)
        return await mine

    def _done(self, result: V | Failure, key: K) -> None:
        for waiter in self._waiting.pop(key):
            if isinstance(result, Failure):
                waiter.errback(result)
            else:
                waiter.callback(result)
