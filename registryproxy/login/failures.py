"""Failed logins, counted per client address, so passwords cannot be
guessed at speed: past ``max_failures`` within ``failure_window`` seconds an
address's logins answer 429 until its oldest failure leaves the window.
An IPv6 client is counted by its /64: one machine has a whole /64 to
pick addresses from."""

from __future__ import annotations

import collections
import ipaddress

from twisted.internet.interfaces import IReactorTime

#: addresses remembered at once; the least recently failing are forgotten first
MAX_ADDRESSES = 10_000


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
