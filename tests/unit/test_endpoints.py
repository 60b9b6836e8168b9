"""Upstreams given by address are connected to straight: a refusal is
reported at once, not at HostnameEndpoint's next 0.3 s attempt tick."""

from __future__ import annotations

import pytest
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.web.client import URI, BrowserLikePolicyForHTTPS

from registryproxy.upstream.endpoints import UpstreamEndpoints


@pytest.mark.parametrize(
    "url, host",
    [
        (b"http://127.0.0.1:5000/v2/", "127.0.0.1"),
        (b"https://10.1.2.3:5000/v2/", "10.1.2.3"),
        (b"http://[::1]:5000/v2/", "::1"),
    ],
)
def test_a_refusal_from_an_address_is_reported_at_once(url: bytes, host: str) -> None:
    reactor = MemoryReactorClock()
    endpoints = UpstreamEndpoints(reactor, BrowserLikePolicyForHTTPS(), 7.0)
    failures: list[Failure] = []
    endpoint = endpoints.endpointForURI(URI.fromBytes(url))
    endpoint.connect(Factory.forProtocol(Protocol)).addErrback(failures.append)
    connected_to, port, factory, timeout, _ = reactor.tcpClients[0]
    assert (connected_to, port, timeout) == (host, 5000, 7.0)
    factory.clientConnectionFailed(None, Failure(ConnectionRefusedError()))
    # no time passed on the clock
    assert len(failures) == 1 and failures[0].check(ConnectionRefusedError)


def test_a_name_keeps_hostname_endpoint() -> None:
    """A name is looked up and its addresses tried in turn (HostnameEndpoint),
    whose refusal waits for the next attempt tick: what an address is spared."""
    reactor = MemoryReactorClock()  # its resolver answers 127.0.0.1 for any name
    endpoints = UpstreamEndpoints(reactor, BrowserLikePolicyForHTTPS(), 7.0)
    failures: list[Failure] = []
    endpoint = endpoints.endpointForURI(URI.fromBytes(b"http://registry.example:5000/v2/"))
    endpoint.connect(Factory.forProtocol(Protocol)).addErrback(failures.append)
    _, port, factory, _, _ = reactor.tcpClients[0]
    factory.clientConnectionFailed(None, Failure(ConnectionRefusedError()))
    assert port == 5000 and failures == []
    reactor.advance(0.3)
    assert len(failures) == 1
