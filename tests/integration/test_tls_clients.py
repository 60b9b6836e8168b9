"""Real clients pull through regproxy listening on TLS (``proxy.listen:
ssl:...``) with a private CA and no insecure flags: skopeo
(``--src-cert-dir``), podman (``--cert-dir``), containerd's ctr (hosts.toml
``ca``) and dockerd (``/etc/docker/certs.d/HOST:PORT/ca.crt``); and skopeo
through mutual TLS (``proxy.client_ca``), refused without its certificate.

A second pull of the same image comes from regproxy's cache (no new blob
fetched upstream): cached blobs go out over TLS, not through sendfile.
"""

from __future__ import annotations

import shutil
import signal
import socket
import ssl
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import bcrypt
import pytest
from tlscerts import CA

from . import harness
from .containerd import Containerd
from .dockerd import DockerDaemon
from .images import Image
from .podman import Podman
from .test_clients import assert_served

pytestmark = pytest.mark.integration

CERTS_D = Path("/etc/docker/certs.d")


@pytest.fixture
def certs(workdir: Path) -> Path:
    """``ca.crt`` (the private CA), ``key.pem`` and ``cert.pem`` (regproxy's),
    ``clients.crt`` (a CA for clients), ``client.cert``/``client.key`` (a
    client certificate it signed) in one directory."""
    ca, clients = CA.make(), CA.make("regproxy clients CA")
    d = workdir / "certs"
    d.mkdir()
    (d / "ca.crt").write_bytes(ca.pem)
    (d / "clients.crt").write_bytes(clients.pem)
    for name, pem in (("", ca.issue(ips=["127.0.0.1"])), ("client.", clients.issue(client=True))):
        split = pem.index(b"-----BEGIN CERTIFICATE-----")
        (d / (f"{name}key" if name else "key.pem")).write_bytes(pem[:split])
        (d / (f"{name}cert" if name else "cert.pem")).write_bytes(pem[split:])
    return d


@pytest.fixture
def tls_proxy(
    regproxy: Callable[..., harness.RegProxy], certs: Path
) -> Callable[..., harness.RegProxy]:
    """``tls_proxy(client_ca=None, **proxy)``: regproxy on an ssl: port
    with *certs* (and more keys of its proxy section)."""

    def make(client_ca: str | None = None, **proxy: Any) -> harness.RegProxy:
        listen = (
            f"ssl:{harness.free_port()}:interface=127.0.0.1"
            f":privateKey={certs / 'key.pem'}:certKey={certs / 'cert.pem'}"
        )
        return regproxy(extra_config={"proxy": {"listen": listen, "client_ca": client_ca, **proxy}})

    return make


def cert_dir(certs: Path, dest: Path, client: bool = False) -> Path:
    """What skopeo and podman read: ``*.crt`` CAs, ``client.cert`` + ``client.key``."""
    dest.mkdir()
    shutil.copy(certs / "ca.crt", dest)
    if client:
        shutil.copy(certs / "client.cert", dest)
        shutil.copy(certs / "client.key", dest)
    return dest


def skopeo_copy(
    skopeo: harness.Skopeo,
    proxy: harness.RegProxy,
    image: Image,
    certs: Path,
    dest: Path,
    *more: str,
) -> subprocess.CompletedProcess[str]:
    return skopeo.run(
        "copy", "--quiet", "--retry-times=0", f"--src-cert-dir={certs}", *more,
        image.docker_ref(proxy.host_port), f"dir:{dest}",
        check=False,
    )  # fmt: skip


def assert_pulled(result: subprocess.CompletedProcess[str], dest: Path, image: Image) -> None:
    assert result.returncode == 0, result.stderr
    assert image.layout is not None
    assert harness.tree_digests(dest) == harness.tree_digests(image.layout)


def blob_fetches(registry: harness.UpstreamRegistry, since: int) -> int:
    return registry.count_requests("GET", "/blobs/", since)


def test_skopeo_cold_then_warm(
    tls_proxy: Callable[..., harness.RegProxy],
    certs: Path,
    skopeo: harness.Skopeo,
    workdir: Path,
    upstream_registry: harness.UpstreamRegistry,
    test_images: dict[str, Image],
) -> None:
    proxy = tls_proxy()
    image = test_images["multilayer"]
    trust = cert_dir(certs, workdir / "trust")
    mark = upstream_registry.mark()
    for attempt in ("cold", "warm"):
        result = skopeo_copy(skopeo, proxy, image, trust, workdir / attempt)
        assert_pulled(result, workdir / attempt, image)
        if attempt == "cold":
            assert_served(proxy, upstream_registry, image, mark)
            fetched = blob_fetches(upstream_registry, mark)
    assert blob_fetches(upstream_registry, mark) == fetched  # the warm pull: all cached
    assert proxy.logged(f"GET /v2/{image.repository}/blobs/")


def test_skopeo_without_the_ca_is_refused(
    tls_proxy: Callable[..., harness.RegProxy],
    skopeo: harness.Skopeo,
    workdir: Path,
    test_images: dict[str, Image],
) -> None:
    """The control: the CA is what makes the pulls above work."""
    proxy = tls_proxy()
    empty = workdir / "empty"
    empty.mkdir()
    result = skopeo_copy(skopeo, proxy, test_images["dockerimg"], empty, workdir / "x")
    assert result.returncode != 0
    assert "certificate signed by unknown authority" in result.stderr, result.stderr


def test_skopeo_mutual_tls(
    tls_proxy: Callable[..., harness.RegProxy],
    certs: Path,
    skopeo: harness.Skopeo,
    workdir: Path,
    upstream_registry: harness.UpstreamRegistry,
    test_images: dict[str, Image],
) -> None:
    proxy = tls_proxy(client_ca=str(certs / "clients.crt"))
    image = test_images["dockerimg"]
    mark = upstream_registry.mark()
    refused = skopeo_copy(
        skopeo, proxy, image, cert_dir(certs, workdir / "no-client"), workdir / "refused"
    )
    assert refused.returncode != 0
    assert "certificate required" in refused.stderr, refused.stderr
    assert upstream_registry.count_requests(None, f"/v2/{image.repository}/", mark) == 0

    known = cert_dir(certs, workdir / "client", client=True)
    result = skopeo_copy(skopeo, proxy, image, known, workdir / "pulled")
    assert_pulled(result, workdir / "pulled", image)
    assert_served(proxy, upstream_registry, image, mark)


def test_podman(
    tls_proxy: Callable[..., harness.RegProxy],
    certs: Path,
    workdir: Path,
    upstream_registry: harness.UpstreamRegistry,
    test_images: dict[str, Image],
) -> None:
    proxy = tls_proxy()
    conf = workdir / "registries.conf"
    conf.write_text(
        'unqualified-search-registries = []\n[[registry]]\nlocation = "docker.io"\n'
        f'[[registry.mirror]]\nlocation = "{proxy.host_port}"\n'
    )
    image = test_images["dockerimg"]
    trust = cert_dir(certs, workdir / "trust")
    mark = upstream_registry.mark()
    with Podman(workdir / "podman", conf) as podman:
        ref = "docker.io/library/dockerimg:1"
        result = podman.run("pull", "--cert-dir", str(trust), ref)
        assert result.returncode == 0, f"{result.stderr}\n{harness.tail(proxy.log_path, 30)}"
        assert podman.inspect(ref)["Digest"] == image.manifest_digest
    assert_served(proxy, upstream_registry, image, mark)


def test_ctr(
    tls_proxy: Callable[..., harness.RegProxy],
    certs: Path,
    containerd: Containerd,
    workdir: Path,
    upstream_registry: harness.UpstreamRegistry,
    test_images: dict[str, Image],
) -> None:
    proxy = tls_proxy()
    hosts = workdir / "hosts"
    (hosts / "docker.io").mkdir(parents=True)
    (hosts / "docker.io" / "hosts.toml").write_text(
        'server = "https://registry-1.docker.io"\n'
        f'[host."https://{proxy.host_port}"]\n'
        '  capabilities = ["pull", "resolve"]\n'
        f'  ca = "{certs / "ca.crt"}"\n'
    )
    image = test_images["dockerimg"]
    mark = upstream_registry.mark()
    result = containerd.pull("docker.io/library/dockerimg:1", hosts)
    assert result.returncode == 0, f"{result.stderr}\n{harness.tail(proxy.log_path, 30)}"
    assert containerd.images()["docker.io/library/dockerimg:1"] == image.manifest_digest
    assert set(image.blobs) <= containerd.content()
    assert_served(proxy, upstream_registry, image, mark)
    assert proxy.logged("?ns=docker.io")


@pytest.fixture
def docker_trusts(certs: Path) -> Iterator[Callable[[str], None]]:
    """``docker_trusts(host_port)``: dockerd trusts the CA for that registry
    (``/etc/docker/certs.d/HOST:PORT/ca.crt``), removed after the test."""
    made: list[Path] = []
    created_root = not CERTS_D.exists()

    def trust(host_port: str) -> None:
        d = CERTS_D / host_port
        d.mkdir(parents=True)
        made.append(d)
        shutil.copy(certs / "ca.crt", d / "ca.crt")

    yield trust
    for d in made:
        shutil.rmtree(d, ignore_errors=True)
    if created_root:
        shutil.rmtree(CERTS_D, ignore_errors=True)


def test_dockerd_mirror(
    tls_proxy: Callable[..., harness.RegProxy],
    docker_trusts: Callable[[str], None],
    workdir: Path,
    upstream_registry: harness.UpstreamRegistry,
    test_images: dict[str, Image],
) -> None:
    proxy = tls_proxy()
    docker_trusts(proxy.host_port)
    image = test_images["dockerimg"]
    mark = upstream_registry.mark()
    with DockerDaemon(workdir / "dockerd", proxy.url) as daemon:
        assert daemon.daemon_config()["insecure-registries"] == []
        result = daemon.pull("dockerimg:1")
        assert result.returncode == 0, f"docker pull: {result.stderr}"
        assert not daemon.fell_back(), daemon.pull_log()
        assert image.config is not None
        assert daemon.image_inspect("dockerimg:1")["Id"] == image.config.digest
    assert_served(proxy, upstream_registry, image, mark)


def served_certificate(proxy: harness.RegProxy, ca_file: Path) -> bytes | None:
    """The certificate regproxy shows (DER), or None if *ca_file* does not vouch for it."""
    context = ssl.create_default_context(cafile=str(ca_file))
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as raw:
        try:
            with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                return tls.getpeercert(binary_form=True)
        except ssl.SSLCertVerificationError:
            return None


def test_sighup_reloads_the_certificate(
    tls_proxy: Callable[..., harness.RegProxy], certs: Path
) -> None:
    """twistd keeps running on SIGHUP and serves the renewed certificate;
    a broken one is logged and the renewed one stays."""
    proxy = tls_proxy()
    before = served_certificate(proxy, certs / "ca.crt")
    renewed = CA.make("renewed CA")
    pem = renewed.issue(ips=["127.0.0.1"])
    split = pem.index(b"-----BEGIN CERTIFICATE-----")
    (certs / "key.pem").write_bytes(pem[:split])
    (certs / "cert.pem").write_bytes(pem[split:])
    (certs / "renewed.crt").write_bytes(renewed.pem)
    assert proxy.proc is not None
    proxy.proc.send_signal(signal.SIGHUP)
    after = harness.wait_until(
        lambda: served_certificate(proxy, certs / "renewed.crt"), 10, "the renewed certificate"
    )
    assert after == ssl.PEM_cert_to_DER_cert(pem[split:].decode()) != before

    (certs / "cert.pem").write_text("broken")
    proxy.proc.send_signal(signal.SIGHUP)
    harness.wait_until(lambda: "not reloaded" in proxy.log_text(), 10, "the refusal logged")
    assert served_certificate(proxy, certs / "renewed.crt") == after
    assert proxy.running


def test_skopeo_logs_in_over_tls(
    tls_proxy: Callable[..., harness.RegProxy],
    certs: Path,
    skopeo: harness.Skopeo,
    workdir: Path,
    upstream_registry: harness.UpstreamRegistry,
    test_images: dict[str, Image],
) -> None:
    """proxy.auth on a TLS port: the challenge sends skopeo to https://.../token
    on the same port, and its Basic credentials travel encrypted."""
    hashed = bcrypt.hashpw(b"alice-secret-1", bcrypt.gensalt(4)).decode()
    (workdir / "htpasswd").write_text(f"alice:$2y${hashed[4:]}\n")
    proxy = tls_proxy(auth={"htpasswd": str(workdir / "htpasswd")})
    image = test_images["dockerimg"]
    trust = cert_dir(certs, workdir / "trust")
    anonymous = skopeo_copy(skopeo, proxy, image, trust, workdir / "anonymous")
    assert anonymous.returncode != 0
    assert "unauthorized" in anonymous.stderr.lower(), anonymous.stderr
    mark = upstream_registry.mark()
    result = skopeo_copy(
        skopeo, proxy, image, trust, workdir / "pulled", "--src-creds=alice:alice-secret-1"
    )
    assert_pulled(result, workdir / "pulled", image)
    assert_served(proxy, upstream_registry, image, mark)
    assert proxy.logged("GET /token")
