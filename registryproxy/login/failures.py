"""Failed logins, counted per client address, so passwords cannot be
guessed at speed: past ``max_failures`` within ``failure_window`` seconds an
address's logins answer 429 until its oldest failure leaves the window.
An IPv6 client is counted by its /64: one machine has a whole /64 to
pick addresses from."""

from __future__ import annotations

import collections
import ipaddress

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime

#: addresses remembered at once; the least recently failing are forgotten first
MAX_ADDRESSES = 10_000
#: seconds a login waits for its turn to be checked (see FailedLogins.turn)
TURN_WAIT = 10.0


class FailedLogins:
    def __init__(
        self,
        limit: int,
        window: float,
        clock: IReactorTime,
        max_addresses: int = MAX_ADDRESSES,
    ) -> None:
        self._limit = limit
        self._window = window
        self._clock = clock
        self._max_addresses = max_addresses
        #: address -> the times of its recent failures (at most limit)
        self._failures: collections.OrderedDict[str, collections.deque[float]] = (
            collections.OrderedDict()
        )
        #: address -> its password checks running now, and the logins
        #: waiting for a turn (see :meth:`turn`): bounded by the connections
        self._running: collections.Counter[str] = collections.Counter()
        self._waiting: dict[str, list[Deferred[None]]] = {}

    def retry_after(self, address: str) -> float | None:
        """Seconds until *address* may try again, or None if it may now."""
        address = _counted_as(address)
        times = self._failures.get(address)
        if times is None:
            return None
        now = self._clock.seconds()
        while times and times[0] <= now - self._window:
            times.popleft()
        if not times:
            del self._failures[address]
            return None
        if len(times) < self._limit:
            return None
        return times[0] + self._window - now

    async def turn(self, address: str) -> float | None:
        """Wait for a turn to check a password of *address*: its failures
        and its checks running now stay under ``limit``, so guesses sent all
        at once are checked no faster than their failures are counted, and
        right ones wait a moment rather than being refused.  The seconds to
        wait before trying again once it is past its failures (no turn);
        None when the turn is the caller's, to give back with :meth:`done`.
        Raises Twisted's TimeoutError after ``TURN_WAIT`` seconds."""
        key = _counted_as(address)
        while True:
            wait = self.retry_after(address)
            if wait is not None:
                return wait
            failed = len(self._failures.get(key, ()))
            if failed + self._running[key] < self._limit:
                self._running[key] += 1
                return None
            woken: Deferred[None] = Deferred()
            self._waiting.setdefault(key, []).append(woken)
            woken.addTimeout(TURN_WAIT, self._clock)
            try:
                await woken
            except BaseException:
                waiting = self._waiting.get(key, [])
                if woken in waiting:
                    waiting.remove(woken)
                if not waiting:
                    self._waiting.pop(key, None)
                raise

    def done(self, address: str) -> None:
        """A check's turn given back (after its failure, if it failed, was
        counted): as many of those waiting as now have a turn look again,
        first come first, or all of them once the address is past its
        failures (to be told so); not every one at every check."""
        key = _counted_as(address)
        self._running[key] -= 1
        if not self._running[key]:
            del self._running[key]
        waiting = self._waiting.get(key)
        if not waiting:
            return
        if self.retry_after(address) is not None:
            woken, waiting[:] = list(waiting), []
        else:
            free = max(self._limit - len(self._failures.get(key, ())) - self._running[key], 0)
            woken, waiting[:] = waiting[:free], waiting[free:]
        if not waiting:
            del self._waiting[key]
        for each in woken:
            each.callback(None)

    def failed(self, address: str) -> None:
        address = _counted_as(address)
        times = self._failures.pop(address, None)
        if times is None:
            times = collections.deque(maxlen=self._limit)
        times.append(self._clock.seconds())
        self._failures[address] = times  # the most recent last
        while len(self._failures) > self._max_addresses:
            self._failures.popitem(last=False)

    def __len__(self) -> int:
        return len(self._failures)


def _counted_as(address: str) -> str:
    """What *address*'s failures are counted under: itself, or its /64."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)
