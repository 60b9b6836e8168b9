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
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.error import ConnectError, DNSLookupError
from twisted.internet.interfaces import IProtocol, IProtocolFactory, IStreamClientEndpoint
from twisted.internet.threads import deferToThreadPool
from twisted.web.client import URI
from twisted.web.iweb import IAgentEndpointFactory, IPolicyForHTTPS
from zope.interface import implementer


def resolve(host: str, port: int) -> list[str]:
    """Every address *host* resolves to (blocking: run in a thread)."""
    answers = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(sockaddr[0]) for *_, sockaddr in answers))


def is_public(address: str) -> bool:
    return ipaddress.ip_address(address.split("%", 1)[0]).is_global


@implementer(IAgentEndpointFactory)
class PublicEndpoints:
    """An Agent's endpoints: TCP (and TLS for https) to public addresses only."""

    def __init__(
        self,
        reactor: Any,
        policy: IPolicyForHTTPS,
        connect_timeout: float,
        allowed: Callable[[str], bool] = is_public,
    ) -> None:
        self._reactor = reactor
        self._policy = policy
        self._timeout = connect_timeout
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
        try:
            addresses = await deferToThreadPool(
                e._reactor, e._reactor.getThreadPool(), resolve, self._host, self._port
            )
        except OSError as error:
            raise DNSLookupError(f"{self._host}: {error}") from None
        public = [address for address in addresses if e._allowed(address)]
        if not public:
            raise ConnectError(string=f"{self._host} resolves only to internal addresses; refused")
        failure: Exception | None = None
        for address in public:
            endpoint = HostnameEndpoint(e._reactor, address, self._port, timeout=e._timeout)
            try:
                return await endpoint.connect(protocolFactory)
            except ConnectError as error:
                failure = error
        assert failure is not None
        raise failure
