"""Connections to public addresses only, for registries nobody configured.

With ``allow_any_registry`` a client names the host regproxy connects to.
Checking the name is not enough (``internal.example.com`` may resolve to
10.0.0.5), so these endpoints resolve it themselves and connect only to the
public addresses among the answers: an open proxy must not be a way into the
network it runs in.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint, wrapClientTLS
from twisted.internet.error import ConnectError, DNSLookupError
from twisted.internet.interfaces import IProtocol, IProtocolFactory, IStreamClientEndpoint
from twisted.python.threadpool import ThreadPool
from twisted.web.client import URI
from twisted.web.iweb import IAgentEndpointFactory, IPolicyForHTTPS
from zope.interface import implementer

from ..runtime import Bounded, Busy, IReactor, Stopped


class Refused(ConnectError):
    """The host is not on the public internet: regproxy will not connect."""


def resolve(host: str, port: int) -> list[str]:
    """Every address *host* resolves to (blocking: run in a thread)."""
    answers = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(sockaddr[0]) for *_, sockaddr in answers))


#: name lookups queued or running at once on one pool: a name whose DNS
#: never answers holds a thread until the system's resolver gives up, and a
#: client of an open proxy may name new hosts without end
MAX_LOOKUPS = 64


def lookups(reactor: IReactor, pool: ThreadPool, most: int = MAX_LOOKUPS) -> Bounded:
    """Where :func:`lookup` runs: *pool*, bounded."""
    return Bounded(reactor, pool, most)


async def lookup(
    reactor: IReactor, threads: Bounded, host: str, port: int, timeout: float
) -> list[str]:
    """:func:`resolve` on *threads*, the way a socket would resolve *host*
    (numeric forms such as ``2130706433`` or ``127.1`` included);
    :class:`DNSLookupError` if it fails, takes longer than *timeout* or
    finds too many lookups under way."""
    try:
        return await threads.run(timeout, resolve, host, port)
    except defer.TimeoutError:
        raise DNSLookupError(f"{host}: no answer within {timeout:g}s") from None
    except (Busy, Stopped) as error:
        raise DNSLookupError(f"{host}: not looked up: {error}") from None
    except (OSError, ValueError) as error:  # UnicodeError too: a bad IDNA name
        raise DNSLookupError(f"{host}: {error}") from None


_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_UNICAST6 = ipaddress.IPv6Network("2000::/3")
#: IPv6 forms that carry or reach IPv4 addresses in ways we do not unpack
_REFUSED6 = [
    ipaddress.IPv6Network(net)
    for net in ("::/96", "::ffff:0:0:0/96", "64:ff9b:1::/48", "2001::/32", "fec0::/10")
]


def is_public(address: str) -> bool:
    """Whether *address* is a unicast address on the public internet: not
    loopback, private, link-local, shared, multicast or reserved, also when
    an IPv4 address hides in an IPv6 one (mapped, NAT64, 6to4)."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address):
        inner = ip.ipv4_mapped or ip.sixtofour
        if inner is None and ip in _NAT64:
            inner = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if inner is not None:
            return is_public(str(inner))
        if ip not in _UNICAST6 or any(ip in net for net in _REFUSED6):
            return False
    return ip.is_global and not ip.is_multicast and not ip.is_reserved


@implementer(IAgentEndpointFactory)
class PublicEndpoints:
    """An Agent's endpoints: TCP (and TLS for https) to public addresses only."""

    def __init__(
        self,
        reactor: IReactor,
        policy: IPolicyForHTTPS,
        connect_timeout: float,
        lookups: Bounded,
        allowed: Callable[[str], bool] = is_public,
    ) -> None:
        """*lookups* is a pool of their own for the name lookups, so that
        names whose DNS hangs hold up only each other, not the reactor's
        threads (configured upstreams resolve there, and blobs are published)."""
        self._reactor = reactor
        self._policy = policy
        self._timeout = connect_timeout
        self._lookups = lookups
        self._allowed = allowed

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        host = uri.host.decode("ascii")
        endpoint: IStreamClientEndpoint = _Resolved(self, host, uri.port)
        if uri.scheme == b"https":
            endpoint = wrapClientTLS(self._policy.creatorForNetloc(uri.host, uri.port), endpoint)
        return endpoint


@implementer(IStreamClientEndpoint)
class _Resolved:
    def __init__(self, endpoints: PublicEndpoints, host: str, port: int) -> None:
        self._endpoints = endpoints
        self._host = host
        self._port = port

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        return Deferred.fromCoroutine(self._connect(protocolFactory))

    async def _connect(self, protocolFactory: IProtocolFactory) -> IProtocol:
        e = self._endpoints
        addresses = await lookup(e._reactor, e._lookups, self._host, self._port, e._timeout)
        public = [address for address in addresses if e._allowed(address)]
        if not public:
            raise Refused(string=f"{self._host} resolves only to internal addresses; refused")
        failure: Exception | None = None
        for address in public:
            tcp = TCP6ClientEndpoint if ":" in address else TCP4ClientEndpoint
            endpoint = tcp(e._reactor, address, self._port, timeout=e._timeout)
            try:
                return await endpoint.connect(protocolFactory)
            except ConnectError as error:
                failure = error
        assert failure is not None
        raise failure
