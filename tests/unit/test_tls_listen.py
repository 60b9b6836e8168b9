"""The proxy port over TLS: real sockets on 127.0.0.1, a private CA, Python's ssl client."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import ssl
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import attrs
import pytest
import pytest_twisted
from proxyharness import Reply, cache_fds, settle, until
from test_hostile import closed_at_once, failures, hold  # noqa: F401 (failures: a fixture)
from test_login import htpasswd_line
from tlscerts import CA
from twisted.internet import reactor
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort
from twisted.internet.threads import deferToThread

from registryproxy.config import parse_config
from registryproxy.proxy.tls import ServerCertificate, TLSFactory, parse_listen
from registryproxy.tap import Proxy, _ReloadOnHangup, build_proxy


@attrs.define
class TLSProxy:
    port: IListeningPort
    proxy: Proxy
    certificate: ServerCertificate

    @property
    def number(self) -> int:
        return self.port.getHost().port  # type: ignore[attr-defined,no-any-return]

    async def stop(self) -> None:
        await self.port.stopListening()
        await self.proxy.close()


@pytest.fixture
def ca(tmp_path: Path) -> CA:
    authority = CA.make()
    (tmp_path / "ca.pem").write_bytes(authority.pem)
    (tmp_path / "server.pem").write_bytes(authority.issue(ips=["127.0.0.1"]))
    return authority


@pytest_twisted.async_yield_fixture()
async def tls_proxy(tmp_path: Path) -> Any:
    """``await tls_proxy(registry_url, client_ca=None)``: regproxy on a TLS port
    built as makeService builds it, with the files in *tmp_path*."""
    started: list[TLSProxy] = []

    async def start(registry_url: str, client_ca: str | None = None, **proxy: Any) -> TLSProxy:
        server = tmp_path / "server.pem"
        listen = f"ssl:0:interface=127.0.0.1:privateKey={server}:certKey={server}"
        config = parse_config(
            json.dumps(
                {
                    "proxy": {"listen": listen, "client_ca": client_ca, **proxy},
                    "cache": {"directory": str(tmp_path / "cache")},
                    "upstreams": {"docker.io": {"url": registry_url}},
                }
            )
        )
        tls = parse_listen(config.proxy.listen)
        assert tls is not None
        proxy = build_proxy(config, reactor)
        certificate = ServerCertificate(tls, config.proxy.client_ca)
        port = await serverFromString(reactor, tls.tcp).listen(TLSFactory(certificate, proxy.site))
        started.append(TLSProxy(port, proxy, certificate))
        return started[-1]

    yield start
    for running in started:
        await running.stop()


def client_context(ca_file: Path, client_pem: Path | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca_file))
    if client_pem is not None:
        context.load_cert_chain(str(client_pem))
    return context


class Client:
    """A blocking keep-alive HTTPS connection (call from a thread)."""

    def __init__(self, port: int, context: ssl.SSLContext) -> None:
        self.conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=30, context=context)

    def get(self, path: str) -> Reply:
        self.conn.request("GET", path)
        response = self.conn.getresponse()
        return Reply(response.status, response.getheaders(), response.read())

    def peer(self) -> bytes:
        assert self.conn.sock is not None
        return self.conn.sock.getpeercert(binary_form=True)  # type: ignore[union-attr,no-any-return]


async def get(port: int, context: ssl.SSLContext, path: str) -> tuple[Reply, bytes]:
    """GET over a new connection: the reply and the server's certificate (DER)."""

    def run() -> tuple[Reply, bytes]:
        client = Client(port, context)
        try:
            reply = client.get(path)
            return reply, client.peer()
        finally:
            client.conn.close()

    return await deferToThread(run)


def der(pem_file: Path) -> bytes:
    """The certificate in a key + certificate PEM file, as DER."""
    pem = pem_file.read_bytes()
    return ssl.PEM_cert_to_DER_cert(pem[pem.index(b"-----BEGIN CERTIFICATE-----") :].decode())


@pytest_twisted.ensureDeferred
async def test_cold_and_warm_blob_byte_exact(ca, tls_proxy, fake_registry, tmp_path):
    data = os.urandom(3 * 1024 * 1024 + 17)
    digest = fake_registry.add_blob(data)
    running = await tls_proxy(fake_registry.url)
    context = client_context(tmp_path / "ca.pem")
    cold, _ = await get(running.number, context, f"/v2/library/x/blobs/{digest}")
    warm, _ = await get(running.number, context, f"/v2/library/x/blobs/{digest}")
    assert (cold.code, cold.header("X-Cache"), cold.body == data) == (200, "MISS", True)
    assert (warm.code, warm.header("X-Cache"), warm.body == data) == (200, "HIT", True)
    assert fake_registry.count("GET", "/blobs/") == 1


@pytest_twisted.ensureDeferred
async def test_sighup_swaps_certificate_open_connection_goes_on(
    ca, tls_proxy, fake_registry, tmp_path
):
    running = await tls_proxy(fake_registry.url)
    old = der(tmp_path / "server.pem")
    renewed = CA.make("renewed CA")
    (tmp_path / "both.pem").write_bytes(ca.pem + renewed.pem)
    context = client_context(tmp_path / "both.pem")
    client = Client(running.number, context)
    try:
        reply = await deferToThread(client.get, "/v2/")
        assert (reply.code, await deferToThread(client.peer)) == (200, old)
        (tmp_path / "server.pem").write_bytes(renewed.issue(ips=["127.0.0.1"]))
        hangup = _ReloadOnHangup(running.certificate.reload, reactor)
        hangup.startService()
        try:
            os.kill(os.getpid(), signal.SIGHUP)
            await settle()
        finally:
            hangup.stopService()
        _, peer = await get(running.number, context, "/v2/")
        assert peer == der(tmp_path / "server.pem") != old
        # the connection opened before goes on, with its session
        sock = client.conn.sock
        reply = await deferToThread(client.get, "/v2/")
        assert (reply.code, client.conn.sock, await deferToThread(client.peer)) == (200, sock, old)
    finally:
        client.conn.close()
    assert signal.getsignal(signal.SIGHUP) is not hangup._hangup


@pytest.mark.parametrize(
    "damage",
    [
        lambda path, other: path.write_bytes(b"not a certificate"),
        lambda path, other: path.unlink(),
        # a key that does not match the certificate
        lambda path, other: path.write_bytes(
            other[: other.index(b"-----BEGIN CERT")]
            + path.read_bytes()[path.read_bytes().index(b"-----BEGIN CERT") :]
        ),
    ],
    ids=["garbage", "missing", "mismatched"],
)
@pytest_twisted.ensureDeferred
async def test_broken_new_certificate_keeps_the_old(ca, tls_proxy, fake_registry, tmp_path, damage):
    running = await tls_proxy(fake_registry.url)
    old = der(tmp_path / "server.pem")
    damage(tmp_path / "server.pem", ca.issue())
    assert running.certificate.reload() is False
    reply, peer = await get(running.number, client_context(tmp_path / "ca.pem"), "/v2/")
    assert (reply.code, peer) == (200, old)


@pytest_twisted.ensureDeferred
async def test_client_ca_refuses_clients_without_its_certificate(
    ca, tls_proxy, fake_registry, tmp_path
):
    digest = fake_registry.add_blob(b"for known clients")
    clients = CA.make("clients CA")
    (tmp_path / "clients.pem").write_bytes(clients.pem)
    (tmp_path / "good.pem").write_bytes(clients.issue("good client", client=True))
    (tmp_path / "stranger.pem").write_bytes(CA.make("other CA").issue("stranger", client=True))
    running = await tls_proxy(fake_registry.url, client_ca=str(tmp_path / "clients.pem"))
    path = f"/v2/library/x/blobs/{digest}"
    for refused in (None, tmp_path / "stranger.pem"):
        with pytest.raises((ssl.SSLError, ConnectionError, http.client.RemoteDisconnected)):
            await get(running.number, client_context(tmp_path / "ca.pem", refused), path)
    assert fake_registry.count("GET", "/blobs/") == 0
    reply, _ = await get(
        running.number, client_context(tmp_path / "ca.pem", tmp_path / "good.pem"), path
    )
    assert (reply.code, reply.body) == (200, b"for known clients")


def _closed_within(port: int, seconds: float) -> bool:
    """Whether regproxy closes a connection stuck halfway through a ClientHello."""
    with socket.create_connection(("127.0.0.1", port), timeout=seconds) as sock:
        sock.sendall(b"\x16\x03\x01\x02\x00")  # a record header, no record
        try:
            return sock.recv(1) == b""
        except TimeoutError:
            return False
        except ConnectionResetError:
            return True


@pytest_twisted.ensureDeferred
async def test_a_stalled_handshake_is_cut_at_the_idle_timeout(ca, tls_proxy, fake_registry):
    running = await tls_proxy(fake_registry.url, idle_timeout=0.5)
    assert await deferToThread(_closed_within, running.number, 5.0)


@pytest_twisted.ensureDeferred
async def test_connections_past_the_limit_are_closed_without_a_traceback(
    ca,
    tls_proxy,
    fake_registry,
    failures,  # noqa: F811 (the fixture)
):
    running = await tls_proxy(fake_registry.url, max_connections=2)
    url = f"https://127.0.0.1:{running.number}"
    held = await deferToThread(hold, url, 2)
    try:
        await settle(0.2)
        assert await deferToThread(closed_at_once, url)
        assert failures == []
    finally:
        for sock in held:
            sock.close()


def _never_reads(port: int, context: ssl.SSLContext, path: str, done: threading.Event) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as sock:
            sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            done.wait(10)


@pytest_twisted.ensureDeferred
async def test_a_client_that_stops_reading_lets_go_of_the_blob(
    ca, tls_proxy, fake_registry, tmp_path
):
    """send_timeout holds over TLS too: the stalled response is cut, its file closed."""
    digest = fake_registry.add_blob(os.urandom(32 * 1024 * 1024))
    running = await tls_proxy(fake_registry.url, send_timeout=0.5)
    context = client_context(tmp_path / "ca.pem")
    path = f"/v2/library/x/blobs/{digest}"
    assert (await get(running.number, context, path))[0].code == 200
    done = threading.Event()
    reader = deferToThread(_never_reads, running.number, context, path, done)
    holder = SimpleNamespace(cache_dir=tmp_path / "cache")
    try:
        await until(lambda: cache_fds(holder) == 1)
        await until(lambda: cache_fds(holder) == 0, timeout=3.0)
    finally:
        done.set()
        await reader


@pytest_twisted.ensureDeferred
async def test_with_proxy_auth_the_token_realm_is_https(ca, tls_proxy, fake_registry, tmp_path):
    """Clients log in where the challenge says: on this port, over TLS."""
    (tmp_path / "htpasswd").write_text(htpasswd_line("alice", "alice-secret-1"))
    running = await tls_proxy(fake_registry.url, auth={"htpasswd": str(tmp_path / "htpasswd")})
    reply, _ = await get(running.number, client_context(tmp_path / "ca.pem"), "/v2/")
    challenge = reply.header("WWW-Authenticate") or ""
    assert (reply.code, challenge.split(",")[0]) == (
        401,
        f'Bearer realm="https://127.0.0.1:{running.number}/token"',
    )
