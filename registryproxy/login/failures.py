"""Failed logins, counted per client address, so passwords cannot be
guessed at speed: past ``max_failures`` within ``failure_window`` seconds an
address's logins answer 429 until its oldest failure leaves the window.
An IPv6 client is counted by its /64: one machine has a whole /64 to
pick addresses from."""

from __future__ import annotations

import collections
import ipaddress
from collections.abc import Iterator
from contextlib import contextmanager

from twisted.internet.interfaces import IReactorTime

#: addresses remembered at once; the least recently failing are forgotten first
MAX_ADDRESSES = 10_000
#: Retry-After for an address whose checks running now reach the limit
CHECKING_WAIT = 1.0


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
        #: address -> its password checks running now (bounded by the
        #: checks that may wait at all), each a failure until it is not
        self._checking: collections.Counter[str] = collections.Counter()

    def retry_after(self, address: str) -> float | None:
        """Seconds until *address* may try again, or None if it may now.
        Its checks still running count as failures: else guesses sent all at
        once would all be checked before the first failure was counted."""
        address = _counted_as(address)
        now = self._clock.seconds()
        times = self._failures.get(address)
        if times is not None:
            while times and times[0] <= now - self._window:
                times.popleft()
            if not times:
                del self._failures[address]
                times = None
        failed = len(times) if times is not None else 0
        if failed + self._checking[address] < self._limit:
            return None
        if times is not None and failed >= self._limit:
            return times[0] + self._window - now
        return CHECKING_WAIT  # its checks running now may fail: a moment

    @contextmanager
    def checking(self, address: str) -> Iterator[None]:
        """While a password of *address* is checked."""
        address = _counted_as(address)
        self._checking[address] += 1
        try:
            yield
        finally:
            self._checking[address] -= 1
            if not self._checking[address]:
                del self._checking[address]

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
