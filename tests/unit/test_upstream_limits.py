"""Hostile upstreams: silent ones, huge bodies, stalled bodies, and redirects or
token realms that spell an internal address some other way."""

from __future__ import annotations

import json
from typing import Any

import pytest
import pytest_twisted
import treq
from fakeregistry import FakeRegistry, Fault, Override, _pending_bytes
from proxyharness import ProxyClock, settle, until
from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, serverFromString
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock, deferLater
from twisted.logger import formatEvent
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.iweb import IAgent, IAgentEndpointFactory
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from zope.interface import implementer

from registryproxy.cache import index as index_module
from registryproxy.cache import manifests
from registryproxy.config import UpstreamConfig
from registryproxy.errors import RegistryError
from registryproxy.upstream import public
from registryproxy.upstream.auth import Authenticator
from registryproxy.upstream.client import RegistryClient

# -- helpers ------------------------------------------------------------------


@implementer(IAgent)
class Refusing:
    """An agent whose every connection is refused at once."""

    def __init__(self) -> None:
        self.attempts = 0

    def request(self, method: bytes, uri: bytes, headers: Any = None, body: Any = None) -> Any:
        self.attempts += 1
        return fail(ConnectionRefusedError("refused"))


class _Silent(Protocol):
    def connectionMade(self) -> None:
        self.factory.opened += 1  # type: ignore[attr-defined]
        self.factory.open += 1  # type: ignore[attr-defined]

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.factory.open -= 1  # type: ignore[attr-defined]


class SilentFactory(Factory):
    """Accepts connections, reads what it is sent, never answers."""

    protocol = _Silent

    def __init__(self) -> None:
        self.opened = 0
        self.open = 0


@pytest_twisted.async_yield_fixture()
async def silent() -> Any:
    factory = SilentFactory()
    port: IListeningPort = await serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(
        factory
    )
    factory.url = f"http://127.0.0.1:{port.getHost().port}"  # type: ignore[attr-defined]
    yield factory
    await port.stopListening()


@implementer(IAgentEndpointFactory)
class _Hosts:
    """Endpoints as the reactor would make them, but with some names mapped to
    127.0.0.1 ports (an /etc/hosts of the test's own)."""

    def __init__(self, names: dict[str, int]) -> None:
        self._names = names

    def endpointForURI(self, uri: Any) -> Any:
        host = uri.host.decode("ascii")
        if host in self._names:
            return TCP4ClientEndpoint(reactor, "127.0.0.1", self._names[host])
        return HostnameEndpoint(reactor, uri.host, uri.port)


def make_client(
    url: str,
    clock: Any = reactor,
    names: dict[str, int] | None = None,
    agent: IAgent | None = None,
    **config: Any,
) -> RegistryClient:
    """A client as registry.Upstreams makes one; *agent*: in place of one on
    the reactor's sockets (with *names* mapped to 127.0.0.1 ports)."""
    if agent is None:
        pool = HTTPConnectionPool(reactor, persistent=False)
        agent = Agent.usingEndpointFactory(reactor, _Hosts(names or {}), pool=pool)
    upstream = UpstreamConfig(url=url, **config)
    http = treq.client.HTTPClient(agent)
    # as registry.Upstreams makes them: a token fetch has the exchange's deadline too
    auth = Authenticator(url, None, None, http, clock, timeout=upstream.deadline_seconds)
    return RegistryClient("docker.io", upstream, agent, auth, clock, resolve=_resolve)


def manifest(client: RegistryClient, reference: str = "1") -> Deferred[Any]:
    return Deferred.fromCoroutine(client.get_manifest("library/x", reference, ()))


def failure_of(d: Deferred[Any]) -> RegistryError:
    box: list[Any] = []
    d.addBoth(box.append)
    assert box and isinstance(box[0], Failure), box
    error = box[0].value
    assert isinstance(error, RegistryError), box[0]
    return error


def error(reply: Any) -> tuple[int, str, str]:
    (first,) = json.loads(reply.body)["errors"]
    return reply.code, first["code"], first["message"]


def connections(registry: FakeRegistry) -> int:
    return sum(
        1
        for site in registry._sites
        for channel in site.channels
        if getattr(getattr(channel, "transport", None), "connected", False)
    )


# -- item 4: a silent upstream, a silent token service ------------------------


@pytest_twisted.ensureDeferred
async def test_a_silent_upstream_is_given_up_once_at_the_deadline(silent):
    clock = Clock()
    client = make_client(silent.url, clock, read_timeout=5, breaker_threshold=2)
    for _ in range(2):
        d = manifest(client)
        await until(lambda: silent.open == 1)
        clock.advance(5)
        await until(lambda d=d: d.called, timeout=2)
        e = failure_of(d)
        assert (e.status, e.code) == (504, "UNAVAILABLE")
        assert "upstream docker.io" in e.message and "within 5s" in e.message
        assert "Cancelled" not in e.message
        await until(lambda: silent.open == 0)
    assert silent.opened == 2  # a silent answer is not retried
    # the breaker is open: the next caller fails at once, without connecting
    e = failure_of(manifest(client))
    assert (e.status, e.code) == (503, "UNAVAILABLE")
    assert "not asking it again" in e.message
    await settle(0.05)
    assert silent.opened == 2


@pytest_twisted.ensureDeferred
async def test_the_deadline_is_a_config_key(silent):
    clock = Clock()
    client = make_client(silent.url, clock, read_timeout=60, deadline=2)
    d = manifest(client)
    await until(lambda: silent.open == 1)
    clock.advance(2)
    await until(lambda: d.called, timeout=2)
    assert "within 2s" in failure_of(d).message


@pytest_twisted.ensureDeferred
async def test_a_silent_token_service_meets_the_deadline_and_opens_the_breaker(
    fake_registry, silent
):
    challenge = f'Bearer realm="{silent.url}/token",service="fake"'
    fake_registry.status_override["/manifests/"] = Override(401, {"WWW-Authenticate": challenge})
    clock = Clock()
    client = make_client(fake_registry.url, clock, read_timeout=5, breaker_threshold=2)
    for attempt in (1, 2):
        d = manifest(client)
        await until(lambda attempt=attempt: silent.opened == attempt)
        clock.advance(5)
        await until(lambda d=d: d.called, timeout=2)
        e = failure_of(d)
        assert (e.status, e.code) == (504, "UNAVAILABLE")
        assert "upstream docker.io" in e.message and "token service" in e.message
        assert silent.url in e.message
    asked = len(fake_registry.requests)
    e = failure_of(manifest(client))
    assert e.status == 503
    assert len(fake_registry.requests) == asked


@pytest_twisted.ensureDeferred
async def test_a_silent_upstream_costs_clients_one_deadline(silent, make_proxy):
    clock = ProxyClock()
    proxy = await make_proxy(silent.url, read_timeout=0.5, clock=clock)
    asked = proxy.get("/v2/library/x/manifests/1")
    await until(lambda: silent.opened == 1)
    clock.advance(0.5)
    # answered then: not three tries and the pauses between them
    reply = await asked.addTimeout(5, reactor)
    status, code, message = error(reply)
    assert (status, code) == (504, "UNAVAILABLE")
    assert "docker.io" in message and "within 0.5s" in message
    assert silent.opened == 1


def test_connections_that_fail_are_retried():
    # every connection refused at once: tried three times, 0.2 and 0.8 s apart
    refusing = Refusing()
    clock = Clock()
    d = manifest(make_client("http://127.0.0.1:9", clock, agent=refusing, deadline=10))
    assert refusing.attempts == 1
    clock.advance(0.19)
    assert refusing.attempts == 1
    clock.advance(0.01)
    assert refusing.attempts == 2
    clock.advance(0.79)
    assert (refusing.attempts, d.called) == (2, False)
    clock.advance(0.01)
    assert refusing.attempts == 3
    e = failure_of(d)
    assert e.status == 502 and "unreachable" in e.message and "docker.io" in e.message


def test_no_retry_past_the_deadline():
    refusing = Refusing()
    clock = Clock()
    d = manifest(make_client("http://127.0.0.1:9", clock, agent=refusing, deadline=0.5))
    clock.advance(0.2)
    assert refusing.attempts == 2  # no time left for the pause of 0.8 s
    assert failure_of(d).status == 502


# -- item 5: bodies too large ---------------------------------------------------


class Endless(Resource):
    """A body with no Content-Length (unless *declared*): 64 KiB chunks while
    the client reads, up to 100 MiB."""

    isLeaf = True

    def __init__(self, declared: int | None = None) -> None:
        super().__init__()
        self.sent = 0
        self.closed = 0
        self.declared = declared

    def render_GET(self, request: Request) -> int:
        request.setHeader(b"Content-Type", b"application/vnd.oci.image.manifest.v1+json")
        if self.declared is not None:
            request.setHeader(b"Content-Length", b"%d" % self.declared)
        chunk = b" " * 65536

        def more() -> None:
            if request.channel is None or request._disconnected:
                return
            if self.sent >= 100 * 1024 * 1024:
                request.finish()
                return
            if _pending_bytes(request.channel.transport) > 1024 * 1024:
                reactor.callLater(0.001, more)  # the client is not reading: wait
                return
            request.write(chunk)
            self.sent += len(chunk)
            reactor.callLater(0, more)

        def gone(_: object) -> None:
            self.closed += 1

        request.notifyFinish().addBoth(gone)
        request.write(b"{")
        more()
        return NOT_DONE_YET


@pytest_twisted.async_yield_fixture()
async def endless() -> Any:
    resource = Endless()
    port = await serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(Site(resource))
    resource.url = f"http://127.0.0.1:{port.getHost().port}"  # type: ignore[attr-defined]
    yield resource
    await port.stopListening()


@pytest.mark.parametrize(
    ("path", "limit"),
    [
        ("/v2/library/x/manifests/1", 4 * 1024 * 1024),
        ("/v2/library/x/tags/list", 32 * 1024 * 1024),
        ("/v2/library/x/referrers/sha256:" + "a" * 64, 32 * 1024 * 1024),
    ],
)
@pytest_twisted.ensureDeferred
async def test_an_endless_body_is_cut_off_at_its_cap(endless, make_proxy, path, limit):
    proxy = await make_proxy(endless.url)
    reply = await proxy.get(path)
    status, code, message = error(reply)
    assert (status, code) == (502, "UNAVAILABLE")
    assert "docker.io" in message and f"more than {limit} bytes" in message
    await until(lambda: endless.closed == 1)
    assert endless.sent < limit + 8 * 1024 * 1024  # what the sockets' buffers hold


@pytest_twisted.ensureDeferred
async def test_a_declared_length_past_the_cap_is_refused_unread(endless, make_proxy):
    endless.declared = 1_500_000_000
    proxy = await make_proxy(endless.url)
    reply = await proxy.get("/v2/library/x/manifests/1")
    status, code, message = error(reply)
    assert (status, code) == (502, "UNAVAILABLE")
    assert "docker.io" in message and "1500000000 bytes" in message
    await until(lambda: endless.closed == 1)
    assert endless.sent < 4 * 1024 * 1024


# -- item 12 and issue 10: a manifest body that stalls ---------------------------


@pytest_twisted.ensureDeferred
async def test_a_stalled_manifest_body_frees_its_connection(
    fake_registry, make_proxy, logged, recwarn
):
    fake_registry.add_image("library/x", "1", [b"layer"])
    fake_registry.manifest_faults["*"] = Fault.stall(after=10)
    clock = ProxyClock()
    # a deadline past the read timeout: the body's silence is what ends it
    proxy = await make_proxy(fake_registry.url, read_timeout=0.5, deadline=5, clock=clock)
    asked = proxy.get("/v2/library/x/manifests/1")
    await until(lambda: fake_registry.count("GET", "/manifests/") == 1)
    await settle(0.05)  # the headers and the first bytes arrive
    clock.advance(0.5)
    reply = await asked.addTimeout(5, reactor)
    status, code, message = error(reply)
    assert (status, code) == (504, "UNAVAILABLE")
    assert "docker.io" in message and "Deferred" not in message
    assert "sent nothing for 0.5s in the middle of" in message
    # the upstream's socket is closed at the read timeout, not kept until it hangs up
    await until(lambda: connections(fake_registry) == 0, timeout=1)
    await settle(0.2)
    text = [formatEvent(e) + str(e.get("log_failure", "")) for e in logged]
    assert not [t for t in text if "AlreadyCalled" in t or "Unhandled" in t]
    assert not [w for w in recwarn if "abortConnection" in str(w.message)]


@pytest_twisted.ensureDeferred
async def test_a_manifest_body_that_stalls_is_given_up_after_the_read_timeout():
    clock = Clock()
    registry = await FakeRegistry.start()
    try:
        registry.add_image("library/x", "1", [b"layer"])
        registry.manifest_faults["*"] = Fault.stall(after=10)
        client = make_client(registry.url, clock, read_timeout=5, deadline=60)
        d = manifest(client)
        await until(lambda: registry.count("GET", "/manifests/") == 1)
        await settle(0.05)  # the headers arrive
        clock.advance(5)
        await until(lambda d=d: d.called, timeout=2)
        e = failure_of(d)
        assert (e.status, e.code) == (504, "UNAVAILABLE")
        assert "docker.io" in e.message and "5s" in e.message
        await until(lambda: connections(registry) == 0, timeout=1)
    finally:
        await registry.stop()


# -- item 6: other spellings of internal addresses ------------------------------

SPELLINGS = ["2130706433", "0x7f000001", "127.1", "0", "017700000001", "localhost"]


@pytest.fixture
def public_name(monkeypatch: pytest.MonkeyPatch) -> str:
    """registry.example.test 'resolves' to a public address (and is reached on
    the fake registry's port through the test's own hosts map)."""
    real = public.resolve
    name = "registry.example.test"
    monkeypatch.setattr(
        public, "resolve", lambda host, port: ["8.8.8.8"] if host == name else real(host, port)
    )
    return name


def port_of(registry: FakeRegistry) -> int:
    return int(registry.url.rsplit(":", 1)[1])


async def refused(make_fake_registry: Any, public_name: str, answer: Override) -> RegistryError:
    """The error of a manifest fetch from a public upstream answering *answer*."""
    upstream = await make_fake_registry()
    upstream.status_override["/manifests/"] = answer
    port = port_of(upstream)
    client = make_client(f"http://{public_name}:{port}", names={public_name: port})
    with pytest.raises(RegistryError) as e:
        await manifest(client)
    return e.value


@pytest.mark.parametrize("spelling", SPELLINGS)
@pytest_twisted.ensureDeferred
async def test_a_public_upstream_may_not_redirect_to_an_internal_address(
    make_fake_registry, public_name, spelling
):
    internal = await make_fake_registry()
    location = f"http://{spelling}:{port_of(internal)}/v2/library/x/manifests/1"
    e = await refused(make_fake_registry, public_name, Override(302, {"Location": location}))
    assert (e.status, e.code) == (502, "UNAVAILABLE")
    assert "upstream docker.io redirected to" in e.message and "internal address" in e.message
    assert internal.requests == []


@pytest.mark.parametrize("spelling", SPELLINGS)
@pytest_twisted.ensureDeferred
async def test_a_public_upstream_may_not_send_us_to_an_internal_token_realm(
    make_fake_registry, public_name, spelling
):
    internal = await make_fake_registry()
    realm = f"http://{spelling}:{port_of(internal)}/token"
    challenge = {"WWW-Authenticate": f'Bearer realm="{realm}",service="x"'}
    e = await refused(make_fake_registry, public_name, Override(401, challenge))
    assert (e.status, e.code) == (502, "UNAVAILABLE")
    assert "upstream docker.io named as its token service" in e.message
    assert "internal address" in e.message
    assert internal.requests == []


@pytest_twisted.ensureDeferred
async def test_a_token_service_redirect_is_not_followed(make_fake_registry, public_name):
    upstream, internal = await make_fake_registry(), await make_fake_registry()
    port = int(upstream.url.rsplit(":", 1)[1])
    realm = f"http://{public_name}:{port}/token"
    upstream.status_override["/manifests/"] = Override(
        401, {"WWW-Authenticate": f'Bearer realm="{realm}",service="x"'}
    )
    upstream.status_override["/token"] = Override(302, {"Location": internal.url + "/token"})
    client = make_client(f"http://{public_name}:{port}", names={public_name: port})
    with pytest.raises(RegistryError) as e:
        await manifest(client)
    assert "token service" in e.value.message and "redirect" in e.value.message
    assert internal.requests == []


@pytest_twisted.ensureDeferred
async def test_a_loopback_upstream_may_still_redirect_to_loopback(make_fake_registry):
    upstream, cdn = await make_fake_registry(), await make_fake_registry()
    cdn_port = int(cdn.url.rsplit(":", 1)[1])
    digest, _ = cdn.add_image("library/x", "1", [b"layer"])
    upstream.status_override["/manifests/"] = Override(
        307, {"Location": f"http://127.1:{cdn_port}/v2/library/x/manifests/1"}
    )
    got = await manifest(make_client(upstream.url))
    assert got.digest == digest


def _resolve(host: str, port: int) -> Any:
    """Name lookups on the test reactor's threads (regproxy's own use a pool of theirs)."""
    return public.lookup(reactor, public.lookups(reactor, reactor.getThreadPool()), host, port, 5.0)


# -- manifests listing many descriptors ---------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_manifest_listing_too_many_descriptors_is_served_not_cached(
    fake_registry, make_proxy
):
    """Past MAX_REFS descriptors (an upstream listing tens of thousands in a
    4 MiB manifest cost seconds of index writes on the reactor thread), a
    manifest is served, checked against its digest, and not cached; up to
    MAX_REFS it is cached."""
    most = manifests.MAX_REFS
    # a config and MAX_REFS - 1 layers; a config and MAX_REFS layers
    fake_registry.add_image("library/most", "1", [b"%d" % i for i in range(most - 1)])
    fake_registry.add_image("evil/many", "1", [b"%d" % i for i in range(most)])
    proxy = await make_proxy(fake_registry.url)
    db = proxy.proxy.index._db
    for _ in range(2):
        reply = await proxy.get("/v2/evil/many/manifests/1")
        assert (reply.code, reply.header("X-Cache")) == (200, "MISS")
        assert len(json.loads(reply.body)["layers"]) == most
    assert fake_registry.count("GET", "/evil/many/manifests/1") == 2
    assert db.execute("SELECT COUNT(*) FROM refs").fetchone()[0] == 0
    assert db.execute("SELECT COUNT(*) FROM repo_blobs").fetchone()[0] == 0
    assert (await proxy.get("/v2/most/manifests/1")).header("X-Cache") == "MISS"
    assert (await proxy.get("/v2/most/manifests/1")).header("X-Cache") == "HIT"
    assert db.execute("SELECT COUNT(*) FROM refs").fetchone()[0] == most


@pytest_twisted.ensureDeferred
async def test_a_manifest_naming_too_many_digests_is_not_even_parsed(
    fake_registry, make_proxy, monkeypatch
):
    """Not cached, such a manifest is fetched at each request: counting its
    digests spares the reactor thread parsing up to 4 MiB of JSON each time.
    Keys written as escapes are not counted: parsed, it is still refused."""
    parsed: list[int] = []
    references = manifests.references
    monkeypatch.setattr(
        manifests, "references", lambda body: parsed.append(len(body)) or references(body)
    )
    layers = [
        {
            "mediaType": "application/vnd.oci.image.layer.v1.tar",
            "size": 1,
            "digest": f"sha256:{i:064x}",
        }
        for i in range(manifests.MAX_REFS + 1)
    ]
    body = json.dumps({"schemaVersion": 2, "config": layers[0], "layers": layers}).encode()
    kind = "application/vnd.oci.image.manifest.v1+json"
    fake_registry.add_manifest("evil/plain", body, kind, ["1"])
    escaped = body.replace(b'"digest"', b'"\\u0064igest"')
    fake_registry.add_manifest("evil/escaped", escaped, kind, ["1"])
    proxy = await make_proxy(fake_registry.url)
    for repo, expected in (("evil/plain", body), ("evil/escaped", escaped)):
        for _ in range(2):
            reply = await proxy.get(f"/v2/{repo}/manifests/1")
            assert (reply.code, reply.header("X-Cache"), reply.body) == (200, "MISS", expected)
    assert parsed == [len(escaped)] * 2
    assert proxy.proxy.index.totals()["manifests"] == 0


def listed(proxy, digest: str, repo: str) -> tuple[list[str], int]:
    """What the index says *digest* lists, in order, and how many of those
    *repo* may read."""
    db = proxy.proxy.index._db
    rows = db.execute(
        "SELECT child FROM refs WHERE manifest = ? ORDER BY position", (digest,)
    ).fetchall()
    links = db.execute(
        "SELECT COUNT(*) FROM repo_blobs WHERE repo = ? AND digest IN"
        " (SELECT child FROM refs WHERE manifest = ?)",
        (repo, digest),
    ).fetchone()[0]
    return [d for (d,) in rows], links


@pytest.mark.parametrize(
    "meanwhile",
    [
        # the same manifest in another repository: its list goes (no
        # manifest known lists it)
        "twin",
        # the repository's other image: its links go (no manifest of the
        # repository is known)
        "sibling",
    ],
)
@pytest_twisted.ensureDeferred
async def test_a_manifest_listing_many_is_written_ahead_a_step_at_a_time(
    fake_registry, make_proxy, monkeypatch, meanwhile
):
    """What it lists goes into the index ahead in steps of REFS_PER_STEP,
    the reactor serving others between them, then the rest with its row: a
    purge between the steps that takes some of what was written ahead
    leaves it whole all the same."""
    monkeypatch.setattr(manifests, "REFS_PER_STEP", 16)
    monkeypatch.setattr(manifests, "REFS_HOLD_SECONDS", 3600.0)  # a step's size stays 16
    layers = [b"layer %d" % i for i in range(40)]
    fake_registry.add_image("library/tall", "1", layers)
    fake_registry.add_image("library/twin", "1", layers)  # the same manifest
    fake_registry.add_image("library/tall", "0", [b"old"])
    proxy = await make_proxy(fake_registry.url)
    proxy.proxy.manifests._refs_pace.size = 16  # past its first step: at its most
    index = proxy.proxy.index
    other = "/v2/twin/manifests/1" if meanwhile == "twin" else "/v2/tall/manifests/0"
    assert (await proxy.get(other)).code == 200
    # (first, how many, manifests known then, the reactor's turns taken since the first)
    steps: list[tuple[int, int, int, int]] = []
    ran: list[int] = []
    put_refs = index.put_refs

    def stepped(upstream, repo, digest, refs, first):
        steps.append((first, len(refs), index.totals()["manifests"], len(ran)))
        put_refs(upstream, repo, digest, refs, first)
        reactor.callLater(0, ran.append, first)
        if len(steps) == 1:
            index.purge("docker.io", "library/twin" if meanwhile == "twin" else "library/tall")

    monkeypatch.setattr(index, "put_refs", stepped)
    reply = await proxy.get("/v2/tall/manifests/1")
    assert (reply.code, reply.header("X-Cache")) == (200, "MISS")
    # config + 40 layers: two steps of 16 written ahead (the other image
    # known at the first, purged then), with the reactor's turn between
    # them, then the rest with the manifest's row
    assert steps == [(0, 16, 1, 0), (16, 16, 0, 1)]
    body = json.loads(reply.body)
    whole = [body["config"]["digest"], *(layer["digest"] for layer in body["layers"])]
    assert listed(proxy, reply.header("Docker-Content-Digest"), "library/tall") == (whole, 41)
    assert (await proxy.get("/v2/tall/manifests/1")).header("X-Cache") == "HIT"
    assert fake_registry.count("GET", "/tall/manifests/1") == 1


def step_sizes(proxy, monkeypatch) -> list[int]:
    """How many descriptors each step writes ahead, as they are written."""
    index = proxy.proxy.index
    sizes: list[int] = []
    put_refs = index.put_refs

    def stepped(upstream, repo, digest, refs, first):
        sizes.append(len(refs))
        put_refs(upstream, repo, digest, refs, first)

    monkeypatch.setattr(index, "put_refs", stepped)
    return sizes


@pytest_twisted.ensureDeferred
async def test_steps_that_hold_the_reactor_long_write_fewer_descriptors(
    fake_registry, make_proxy, monkeypatch
):
    """A step's size follows how long the last held the reactor thread: at
    twice REFS_HOLD_SECONDS a step, whatever its size, each next step
    writes half as many, down to one; the manifest is recorded whole."""
    monkeypatch.setattr(manifests, "REFS_PER_STEP", 16)
    monkeypatch.setattr(manifests, "REFS_HOLD_SECONDS", 1 / 1024)  # (exact in binary)
    busy = iter(range(10_000))
    monkeypatch.setattr(manifests, "_busy", lambda: next(busy) * 2 / 1024)
    fake_registry.add_image("library/tall", "1", [b"layer %d" % i for i in range(40)])
    proxy = await make_proxy(fake_registry.url)
    sizes = step_sizes(proxy, monkeypatch)
    reply = await proxy.get("/v2/tall/manifests/1")
    assert reply.code == 200
    assert sizes == [8, 4, 2] + [1] * 26  # 40 of 41 ahead, the last with its row
    body = json.loads(reply.body)
    whole = [body["config"]["digest"], *(layer["digest"] for layer in body["layers"])]
    assert listed(proxy, reply.header("Docker-Content-Digest"), "library/tall") == (whole, 41)


@pytest.mark.parametrize("removed", [None, "by-another-connection"])
@pytest_twisted.ensureDeferred
async def test_a_list_written_ahead_is_looked_over_only_if_something_went(
    fake_registry, make_proxy, monkeypatch, removed
):
    """Looking over a list written ahead costs a lookup a descriptor (10 ms
    at 1,000 of them on a big index, on the reactor thread): it is skipped
    when no connection removed anything since the first step, and done,
    the list mended, when another did (the index's worker threads')."""
    monkeypatch.setattr(manifests, "REFS_PER_STEP", 16)
    monkeypatch.setattr(manifests, "REFS_HOLD_SECONDS", 3600.0)
    layers = [b"layer %d" % i for i in range(40)]
    fake_registry.add_image("library/tall", "1", layers)
    fake_registry.add_image("library/twin", "1", layers)  # the same manifest
    proxy = await make_proxy(fake_registry.url)
    proxy.proxy.manifests._refs_pace.size = 16  # past its first step: at its most
    index = proxy.proxy.index
    if removed:
        assert (await proxy.get("/v2/twin/manifests/1")).code == 200
    looked: list[int] = []
    all_ahead = index_module._all_ahead
    monkeypatch.setattr(
        index_module,
        "_all_ahead",
        lambda listed, *counts: looked.append(len(listed)) or all_ahead(listed, *counts),
    )
    purged: list[bool] = []
    put_refs = index.put_refs

    def stepped(upstream, repo, digest, refs, first):
        put_refs(upstream, repo, digest, refs, first)
        if removed and not purged:
            # the twin's purge takes the rows written ahead (no manifest known lists them)
            purged.append(True)
            other = index.companion()  # as the worker thread's does
            other.purge("docker.io", "library/twin")
            other.close()

    monkeypatch.setattr(index, "put_refs", stepped)
    reply = await proxy.get("/v2/tall/manifests/1")
    assert reply.code == 200
    assert looked == ([32] if removed else [])
    body = json.loads(reply.body)
    whole = [body["config"]["digest"], *(layer["digest"] for layer in body["layers"])]
    assert listed(proxy, reply.header("Docker-Content-Digest"), "library/tall") == (whole, 41)


@pytest_twisted.ensureDeferred
async def test_steps_of_a_shared_index_take_the_most(fake_registry, make_proxy, monkeypatch):
    """A shared index's steps run elsewhere, the reactor serving others
    meanwhile: that time is not theirs, and does not shrink them (it took a
    1,000-descriptor manifest to 1,000 transactions on a busy node); after
    the first, each takes REFS_PER_STEP."""
    monkeypatch.setattr(manifests, "REFS_PER_STEP", 16)
    busy = iter(range(10_000))
    monkeypatch.setattr(manifests, "_busy", lambda: next(busy))  # a second a step
    fake_registry.add_image("library/tall", "1", [b"layer %d" % i for i in range(40)])
    proxy = await make_proxy(fake_registry.url)
    access = proxy.proxy.manifests._index
    quick = access.quick

    def elsewhere(work):  # answered on a later turn, as a thread pool's
        return deferLater(reactor, 0, lambda: None).addCallback(lambda _: quick(work))

    monkeypatch.setattr(access, "quick", elsewhere)
    sizes = step_sizes(proxy, monkeypatch)
    reply = await proxy.get("/v2/tall/manifests/1")
    assert reply.code == 200
    assert sizes == [8, 16, 16]
    body = json.loads(reply.body)
    whole = [body["config"]["digest"], *(layer["digest"] for layer in body["layers"])]
    assert listed(proxy, reply.header("Docker-Content-Digest"), "library/tall") == (whole, 41)
