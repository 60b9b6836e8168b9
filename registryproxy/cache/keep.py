"""What may not be deleted now, decided in one place.

Eviction (the budget, idle images, making room) and purges ask this before
removing anything: pinned images are never evicted, and an image with a blob
being read, downloaded or published (on this node, or in a cluster on any
other) is passed over, as deleting it frees nothing yet.  That a blob other
cached manifests still list stays is the index's rule, in its SQL.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence

#: a pinned image as eviction's SQL takes it: upstream, repository, tag, digest
Pin = tuple[str, str, "str | None", "str | None"]


class Keep:
    def __init__(self, pins: Sequence[Pin] = ()) -> None:
        #: the pins, as the config and the admin API set them
        self.pins: list[Pin] = list(pins)
        self._busy: list[Callable[[], Collection[str]]] = []

    def busy_from(self, source: Callable[[], Collection[str]]) -> None:
        """Also spare the blobs *source* names whenever asked (given by the
        part that knows them, when it is made)."""
        self._busy.append(source)

    def busy(self) -> set[str]:
        """The blobs in use now, by every source."""
        found: set[str] = set()
        for source in self._busy:
            found.update(source())
        return found
