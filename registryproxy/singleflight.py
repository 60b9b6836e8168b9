"""Run one coroutine per key at a time; everyone asking meanwhile shares its result."""

from __future__ import annotations

from typing import Awaitable, Callable, Generic, Hashable, TypeVar

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class SingleFlight(Generic[K, V]):
    def __init__(self) -> None:
        self._waiting: dict[K, list[Deferred[V]]] = {}

    def __contains__(self, key: K) -> bool:
        return key in self._waiting

    async def run(self, key: K, start: Callable[[], Awaitable[V]]) -> V:
        if key in self._waiting:
            d: Deferred[V] = Deferred()
            self._waiting[key].append(d)
            return await d
        self._waiting[key] = []
        try:
            result = await start()
        except BaseException:
            failure = Failure()
            for d in self._waiting.pop(key):
                d.errback(failure)
            raise
        for d in self._waiting.pop(key):
            d.callback(result)
        return result
