"""The reactor regproxy runs on, as a type: what its parts ask of it.

Every part takes the reactor, and the thread pools it may block on, from
whoever builds it (``tap.makeService``), never from the global
``twisted.internet.reactor``: tests hand them a reactor of their choice,
and where each part's blocking work runs is written where the part is made.
"""

from __future__ import annotations

from twisted.internet.interfaces import (
    IReactorCore,
    IReactorPluggableNameResolver,
    IReactorTCP,
    IReactorThreads,
    IReactorTime,
)


class IReactor(
    IReactorCore, IReactorTime, IReactorThreads, IReactorTCP, IReactorPluggableNameResolver
):
    """What regproxy's parts ask of their reactor (the real one provides it all)."""
