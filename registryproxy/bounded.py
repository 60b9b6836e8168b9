"""Values kept in memory for a while, within bounds: the least recently
used go past a count or a number of bytes, and each ends at its own time."""

from __future__ import annotations

import collections
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class Bounded(Generic[K, V]):
    def __init__(self, max_bytes: int, max_entries: int) -> None:
        self._max_bytes = max_bytes
        self._max_entries = max_entries
        self._bytes = 0
        #: key -> (value, its size, when it ends: None for never)
        self._kept: collections.OrderedDict[K, tuple[V, int, float | None]] = (
            collections.OrderedDict()
        )

    def get(self, key: K, now: float) -> V | None:
        found = self._kept.get(key)
        if found is None:
            return None
        value, _, until = found
        if until is not None and now >= until:
            self.drop(key)
            return None
        self._kept.move_to_end(key)
        return value

    def put(self, key: K, value: V, size: int, until: float | None) -> None:
        """Keep *value* (of *size* bytes) until *until*; one over a
        sixteenth of the bytes is not kept (it would push out many)."""
        if size > self._max_bytes // 16:
            return
        self.drop(key)
        self._kept[key] = (value, size, until)
        self._bytes += size
        while self._bytes > self._max_bytes or len(self._kept) > self._max_entries:
            self.drop(next(iter(self._kept)))

    def drop(self, key: K) -> None:
        found = self._kept.pop(key, None)
        if found is not None:
            self._bytes -= found[1]

    def clear(self) -> None:
        self._kept.clear()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._kept)
