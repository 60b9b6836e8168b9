"""A registry a client names (allow_any_registry) is reached on public addresses only,
whatever its name resolves to."""

from __future__ import annotations

import json

import pytest
import pytest_twisted
import treq
from test_tls import make_ca_and_server_cert
from twisted.internet import reactor
from twisted.internet.error import ConnectError
from twisted.internet.ssl import Certificate, PrivateCertificate, optionsForClientTLS
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

from registryproxy.upstream import public
from registryproxy.upstream.public import PublicEndpoints


def test_resolution_gives_every_address():
    assert "127.0.0.1" in public.resolve("localhost", 80)
    assert public.is_public("8.8.8.8") and public.is_public("2606:4700::1111")
    for internal in ("127.0.0.1", "10.1.2.3", "192.168.0.1", "169.254.169.254", "::1", "fd00::1"):
        assert not public.is_public(internal), internal


def agent(**kwargs) -> treq.client.HTTPClient:
    policy = kwargs.pop("policy", BrowserLikePolicyForHTTPS())
    endpoints = PublicEndpoints(reactor, policy, 5, **kwargs)
    pool = HTTPConnectionPool(reactor, persistent=False)
    return treq.client.HTTPClient(Agent.usingEndpointFactory(reactor, endpoints, pool=pool))


@pytest_twisted.ensureDeferred
async def test_a_name_for_an_internal_address_is_refused(fake_registry):
    port = fake_registry.url.rsplit(":", 1)[1]
    with pytest.raises(ConnectError, match="resolves only to internal addresses"):
        await agent().get(f"http://localhost:{port}/v2/")
    assert fake_registry.requests == []


@implementer(IPolicyForHTTPS)
class TrustOnly:
    def __init__(self, ca_pem: bytes) -> None:
        self._ca = Certificate.loadPEM(ca_pem)

    def creatorForNetloc(self, hostname, port):
        return optionsForClientTLS(hostname.decode(), trustRoot=self._ca)


@pytest_twisted.ensureDeferred
async def test_allowed_addresses_are_reached_over_tcp_and_tls(make_fake_registry):
    plain = await make_fake_registry()
    port = plain.url.rsplit(":", 1)[1]
    reply = await agent(allowed=lambda address: True).get(f"http://localhost:{port}/v2/")
    assert reply.code == 200
    await reply.content()

    ca_pem, server_pem = make_ca_and_server_cert()
    tls = await make_fake_registry(tls=PrivateCertificate.loadPEM(server_pem.decode()).options())
    client = agent(allowed=lambda address: True, policy=TrustOnly(ca_pem))
    reply = await client.get(f"{tls.url}/v2/")  # https://localhost:PORT: checked as localhost
    assert reply.code == 200
    await reply.content()


@pytest_twisted.ensureDeferred
async def test_open_proxy_refuses_names_of_internal_addresses(
    fake_registry, make_proxy, monkeypatch
):
    # registry.example.test "resolves" to the loopback address the fake listens on
    monkeypatch.setattr(public, "resolve", lambda host, port: ["127.0.0.1"])
    proxy = await make_proxy(fake_registry.url, top={"allow_any_registry": True})
    reply = await proxy.get("/v2/registry.example.test/team/app/manifests/1")
    error = json.loads(reply.body)["errors"][0]
    assert reply.code == 502
    assert "registry.example.test resolves only to internal addresses" in error["message"]
    # configured upstreams on internal addresses are the operator's choice, and work
    fake_registry.add_image("team/app", "1", [b"layer"])
    assert (await proxy.get("/v2/team/app/manifests/1")).code == 200
