"""A registry a client names (allow_any_registry) is reached on public addresses only,
whatever its name resolves to."""

from __future__ import annotations

import json
import threading
from typing import Any

import pytest
import pytest_twisted
import treq
from proxyharness import until
from test_tls import make_ca_and_server_cert
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.error import DNSLookupError
from twisted.internet.ssl import Certificate, PrivateCertificate, optionsForClientTLS
from twisted.python.threadpool import ThreadPool
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

from registryproxy.config import UpstreamConfig
from registryproxy.errors import RegistryError
from registryproxy.upstream import public
from registryproxy.upstream.auth import Authenticator
from registryproxy.upstream.client import RegistryClient
from registryproxy.upstream.public import PublicEndpoints, Refused, lookup


def test_resolution_gives_every_address():
    assert "127.0.0.1" in public.resolve("localhost", 80)


@pytest.mark.parametrize(
    "address",
    ["8.8.8.8", "2606:4700::1111", "64:ff9b::808:808", "2002:808:808::1", "::ffff:8.8.8.8"],
)
def test_public_addresses(address):
    assert public.is_public(address)


@pytest.mark.parametrize(
    "address",
    [
        *("127.0.0.1", "10.1.2.3", "172.16.0.1", "192.168.0.1", "169.254.169.254"),
        *("100.64.0.1", "0.0.0.0", "224.0.0.1", "240.0.0.1", "255.255.255.255"),
        *("::1", "::", "fd00::1", "fe80::1%eth0", "fec0::1", "ff02::1", "2001::1"),
        "::ffff:127.0.0.1",  # mapped
        "64:ff9b::a00:5",  # NAT64 of 10.0.0.5
        "64:ff9b::a9fe:a9fe",  # NAT64 of 169.254.169.254
        "64:ff9b:1::1",  # local-use NAT64
        "2002:a00:5::",  # 6to4 of 10.0.0.5
        "::a00:5",  # IPv4-compatible
        "::ffff:0:a00:5",  # SIIT
    ],
)
def test_internal_addresses(address):
    assert not public.is_public(address)


@pytest.fixture
def lookups():
    pool = ThreadPool(minthreads=0, maxthreads=2, name="test-lookups")
    pool.start()
    threads = public.lookups(reactor, pool)
    yield threads
    threads.stop()


def agent(lookups, **kwargs) -> treq.client.HTTPClient:
    policy = kwargs.pop("policy", BrowserLikePolicyForHTTPS())
    endpoints = PublicEndpoints(reactor, policy, 5, lookups, **kwargs)
    pool = HTTPConnectionPool(reactor, persistent=False)
    return treq.client.HTTPClient(Agent.usingEndpointFactory(reactor, endpoints, pool=pool))


@pytest_twisted.ensureDeferred
async def test_a_name_for_an_internal_address_is_refused(fake_registry, lookups):
    port = fake_registry.url.rsplit(":", 1)[1]
    with pytest.raises(Refused, match="resolves only to internal addresses"):
        await agent(lookups).get(f"http://localhost:{port}/v2/")
    assert fake_registry.requests == []


@pytest_twisted.ensureDeferred
async def test_a_lookup_that_hangs_times_out(monkeypatch, lookups):
    release = threading.Event()
    monkeypatch.setattr(public, "resolve", lambda host, port: release.wait(10) and [])
    endpoints = PublicEndpoints(reactor, BrowserLikePolicyForHTTPS(), 0.2, lookups)
    client = Agent.usingEndpointFactory(reactor, endpoints, pool=HTTPConnectionPool(reactor, False))
    try:
        with pytest.raises(DNSLookupError, match="no answer within 0.2s"):
            await client.request(b"GET", b"http://hangs.example.com/v2/")
    finally:
        release.set()


def hanging_resolve(monkeypatch) -> tuple[threading.Event, list[str]]:
    """resolve() waits for the event; the names it was asked, in order."""
    release, asked = threading.Event(), []

    def resolve(host, port):
        asked.append(host)
        release.wait(10)
        return ["192.0.2.1"]

    monkeypatch.setattr(public, "resolve", resolve)
    return release, asked


@pytest_twisted.ensureDeferred
async def test_lookups_given_up_are_not_run_and_those_past_the_bound_fail_at_once(monkeypatch):
    """Names whose DNS hangs, asked by clients of an open proxy without end:
    the lookups waiting their turn are bounded, and those whose caller gave
    up are skipped when their turn comes."""
    release, asked = hanging_resolve(monkeypatch)
    pool = ThreadPool(minthreads=0, maxthreads=1, name="test-lookups")
    pool.start()
    lookups = public.lookups(reactor, pool, most=4)
    try:
        waiting = [
            Deferred.fromCoroutine(lookup(reactor, lookups, f"n{i}.example.com", 443, 0.1))
            for i in range(4)
        ]
        with pytest.raises(
            DNSLookupError, match="not looked up: 4 calls on test-lookups under way already"
        ):
            await lookup(reactor, lookups, "more.example.com", 443, 5.0)
        for each in waiting:
            with pytest.raises(DNSLookupError, match="no answer within 0.1s"):
                await each
        release.set()
        await until(lambda: lookups.pending == 0)
        assert asked == ["n0.example.com"]  # the others were given up before their turn
        assert await lookup(reactor, lookups, "next.example.com", 443, 5.0) == ["192.0.2.1"]
    finally:
        release.set()
        lookups.stop()


@pytest_twisted.ensureDeferred
async def test_lookups_still_queued_when_regproxy_stops_are_not_run(monkeypatch):
    release, asked = hanging_resolve(monkeypatch)
    pool = ThreadPool(minthreads=0, maxthreads=1, name="test-lookups")
    pool.start()
    lookups = public.lookups(reactor, pool)
    waiting = [
        Deferred.fromCoroutine(lookup(reactor, lookups, f"n{i}.example.com", 443, 30.0))
        for i in range(3)
    ]
    await until(lambda: asked)
    threading.Timer(0.1, release.set).start()
    lookups.stop()  # joins the threads: the one running, then none of the queued
    assert asked == ["n0.example.com"]
    assert await waiting[0] == ["192.0.2.1"]
    for each in waiting[1:]:
        with pytest.raises(DNSLookupError, match="not looked up: test-lookups stopped"):
            await each


@implementer(IPolicyForHTTPS)
class TrustOnly:
    def __init__(self, ca_pem: bytes) -> None:
        self._ca = Certificate.loadPEM(ca_pem)

    def creatorForNetloc(self, hostname, port):
        return optionsForClientTLS(hostname.decode(), trustRoot=self._ca)


@pytest_twisted.ensureDeferred
async def test_allowed_addresses_are_reached_over_tcp_and_tls(make_fake_registry, lookups):
    plain = await make_fake_registry()
    port = plain.url.rsplit(":", 1)[1]
    reply = await agent(lookups, allowed=lambda address: True).get(f"http://localhost:{port}/v2/")
    assert reply.code == 200
    await reply.content()

    ca_pem, server_pem = make_ca_and_server_cert()
    tls = await make_fake_registry(tls=PrivateCertificate.loadPEM(server_pem.decode()).options())
    client = agent(lookups, allowed=lambda address: True, policy=TrustOnly(ca_pem))
    reply = await client.get(f"{tls.url}/v2/")  # https://localhost:PORT: checked as localhost
    assert reply.code == 200
    await reply.content()


async def open_proxy(fake_registry, make_proxy, monkeypatch, resolve):
    monkeypatch.setattr(public, "resolve", resolve)
    return await make_proxy(fake_registry.url, top={"allow_any_registry": True})


def error(reply) -> tuple[int, str, str]:
    (first,) = json.loads(reply.body)["errors"]
    return reply.code, first["code"], first["message"]


@pytest_twisted.ensureDeferred
async def test_open_proxy_refuses_names_of_internal_addresses(
    fake_registry, make_proxy, monkeypatch
):
    # registry.example.test "resolves" to the loopback address the fake listens on
    lookups: list[str] = []
    proxy = await open_proxy(
        fake_registry,
        make_proxy,
        monkeypatch,
        lambda host, port: lookups.append(host) or ["127.0.0.1"],
    )
    reply = await proxy.get("/v2/registry.example.test/team/app/manifests/1")
    status, code, message = error(reply)
    assert (status, code) == (403, "DENIED")
    assert "registry.example.test resolves only to internal addresses" in message
    assert lookups == ["registry.example.test"]  # refused at once, not retried
    # configured upstreams on internal addresses are the operator's choice, and work
    fake_registry.add_image("team/app", "1", [b"layer"])
    assert (await proxy.get("/v2/team/app/manifests/1")).code == 200


@pytest_twisted.ensureDeferred
async def test_open_proxy_answers_bad_hosts_cleanly(fake_registry, make_proxy, monkeypatch):
    def resolve(host, port):
        host.encode("idna")  # as getaddrinfo does: UnicodeError for a bad name
        return ["127.0.0.1"]

    proxy = await open_proxy(fake_registry, make_proxy, monkeypatch, resolve)
    for host, status in [
        ("example.com:65536", 404),  # no such port: not a registry name
        ("example.com:0", 404),
        ("xn--zz.example.com", 502),  # not valid IDNA
        ("a" * 64 + ".example.com", 502),  # a label too long for DNS
    ]:
        reply = await proxy.get(f"/v2/{host}/team/app/manifests/1")
        assert error(reply)[0] == status, (host, reply.body)


@pytest_twisted.ensureDeferred
async def test_hanging_lookups_do_not_hold_up_the_reactors_threads(
    fake_registry, make_proxy, monkeypatch
):
    release = threading.Event()
    hanging: list[str] = []

    def resolve(host, port):
        hanging.append(host)
        release.wait(30)
        return ["127.0.0.1"]

    proxy = await open_proxy(fake_registry, make_proxy, monkeypatch, resolve)
    try:
        names = [f"/v2/slow{i}.example.com/x/y/manifests/1" for i in range(12)]
        # treq, not proxy.get: the test's own client threads must not fill the pool
        client = treq.client.HTTPClient(Agent(reactor, pool=HTTPConnectionPool(reactor, False)))
        stuck = gatherResults([client.get(proxy.url + path) for path in names])
        await until(lambda: len(hanging) >= 4)
        # a miss on a configured upstream needs the reactor's threads (to publish the blob)
        digest = fake_registry.add_blob(b"x" * 100_000)
        reply = await proxy.get(f"/v2/library/x/blobs/{digest}")
        assert (reply.code, reply.header("X-Cache")) == (200, "MISS")
        await until(lambda: proxy.blob_path(digest).exists())
        assert not stuck.called and len(hanging) < 12  # the lookups are still waiting
    finally:
        release.set()
    for response in await stuck:
        assert response.code == 403
        await response.content()


@pytest_twisted.ensureDeferred
async def test_a_client_named_registry_may_not_redirect_to_plain_http(make_fake_registry):
    registry = await make_fake_registry()
    registry.redirect_blobs = True  # to its CDN, on http://
    digest = registry.add_blob(b"layer")
    agent = Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False))

    def client(https_only: bool) -> RegistryClient:
        auth = Authenticator(registry.url, None, None, treq.client.HTTPClient(agent), reactor)
        config = UpstreamConfig(url=registry.url)
        return RegistryClient(
            "x", config, agent, auth, reactor, https_only=https_only, resolve=_resolve
        )

    response = await client(https_only=False).get_blob("team/app", digest)
    assert await treq.content(response) == b"layer"
    with pytest.raises(RegistryError, match="redirected to plain http; refused"):
        await client(https_only=True).get_blob("team/app", digest)


def _resolve(host: str, port: int) -> Any:
    """Name lookups on the test reactor's threads (regproxy's own use a pool of theirs)."""
    return lookup(reactor, public.lookups(reactor, reactor.getThreadPool()), host, port, 5.0)
