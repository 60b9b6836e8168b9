"""Real clients pull from two registries through one regproxy, configured with
the very examples shipped in ``etc/`` (regproxy's ``127.0.0.1:5000`` replaced
by the test's port):

- containerd's ``ctr`` with ``etc/containerd/{docker.io,ghcr.io}/hosts.toml``
  (``?ns=<registry>``), with ``etc/containerd/_default/hosts.toml``, and with
  a path-prefixed mirror (``override_path``);
- podman and skopeo with ``etc/registries.conf`` (docker.io: a plain mirror,
  ghcr.io: the mirror ``127.0.0.1:5000/ghcr.io``, a path prefix);
- dockerd with ``etc/daemon.json``'s mirror for Docker Hub, and
  ``docker pull 127.0.0.1:PORT/ghcr.io/owner/image:1`` (a path prefix).

Every client would fall back silently to the real registry (here a dead
loopback proxy port): each test also checks that the right upstream saw
regproxy fetch the image and that regproxy's cache holds it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from . import harness, images
from .containerd import EXAMPLE_HOST_PORT, Containerd, install_hosts_dir
from .dockerd import DockerDaemon
from .images import Image
from .podman import Podman

pytestmark = pytest.mark.integration

ETC = Path(__file__).resolve().parents[2] / "etc"


def example(name: str, proxy: harness.RegProxy, dest: Path) -> Path:
    """``etc/NAME`` with regproxy's address, written to *dest*."""
    text = (ETC / name).read_text()
    assert EXAMPLE_HOST_PORT in text, f"etc/{name} does not name {EXAMPLE_HOST_PORT}"
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(text.replace(EXAMPLE_HOST_PORT, proxy.host_port))
    return dest


def assert_served(
    proxy: harness.RegProxy,
    registry: harness.UpstreamRegistry,
    image: Image,
    since: int,
    blobs: list[images.Blob] | None = None,
) -> None:
    """regproxy fetched *image* from *registry* (and no other) and holds its
    blobs: the client did not get it elsewhere."""
    path = f"/v2/{image.repository}/manifests/"
    assert registry.count_requests("GET", path, since, statuses=[200]) >= 1, (
        f"{registry.url} did not serve {image.reference}'s manifest"
    )
    for blob in image.blobs.values() if blobs is None else blobs:
        assert images.file_digest(proxy.blob_path(blob.digest)) == blob.digest


def ctr_pull(containerd: Containerd, ref: str, hosts_dir: Path, proxy: harness.RegProxy) -> None:
    result = containerd.pull(ref, hosts_dir)
    assert result.returncode == 0, (
        f"ctr pull {ref} failed ({result.returncode}): {result.stderr}\n"
        f"--- regproxy log:\n{harness.tail(proxy.log_path, 30)}"
    )


def own_layers(image: Image, other: Image) -> list[images.Blob]:
    """*image*'s config and the layers *other* does not share."""
    assert image.config is not None
    return [image.config, *(b for b in image.layers if b.digest not in other.blobs)]


# ---------------------------------------------------------------------------
# containerd
# ---------------------------------------------------------------------------


def test_ctr_mirror_per_registry(
    proxy: harness.RegProxy,
    containerd: Containerd,
    workdir: Path,
    upstream_registry: harness.UpstreamRegistry,
    ghcr_registry: harness.HtpasswdRegistry,
    test_images: dict[str, Image],
    ghcr_images: dict[str, Image],
    hub_twin_image: Image,
) -> None:
    """``etc/containerd/docker.io`` and ``ghcr.io``: containerd sends
    ``?ns=docker.io`` / ``?ns=ghcr.io``, and the same ``owner/image`` comes
    from each registry with its own content."""
    hosts = install_hosts_dir(
        ETC / "containerd", workdir / "hosts", proxy.host_port, ["docker.io", "ghcr.io"]
    )
    hub_mark, ghcr_mark = upstream_registry.mark(), ghcr_registry.mark()
    ghcr_image, dockerimg = ghcr_images["image"], test_images["dockerimg"]
    pulls = {
        "docker.io/library/dockerimg:1": dockerimg,
        "ghcr.io/owner/image:1": ghcr_image,
        "docker.io/owner/image:1": hub_twin_image,
    }
    for ref in pulls:
        ctr_pull(containerd, ref, hosts, proxy)
    got = containerd.images()
    assert {ref: got.get(ref) for ref in pulls} == {
        ref: image.manifest_digest for ref, image in pulls.items()
    }
    assert_served(proxy, upstream_registry, dockerimg, hub_mark)
    assert_served(proxy, ghcr_registry, ghcr_image, ghcr_mark)
    assert_served(
        proxy, upstream_registry, hub_twin_image, hub_mark, own_layers(hub_twin_image, ghcr_image)
    )
    assert all("ghcr" not in line.path for line in upstream_registry.requests(hub_mark))
    assert proxy.logged("?ns=ghcr.io", "?ns=docker.io")


def test_ctr_default_mirror(
    proxy: harness.RegProxy,
    containerd: Containerd,
    workdir: Path,
    upstream_registry: harness.UpstreamRegistry,
    ghcr_registry: harness.HtpasswdRegistry,
    test_images: dict[str, Image],
    ghcr_images: dict[str, Image],
) -> None:
    """``etc/containerd/_default`` alone: one mirror for every registry;
    ``library/multilayer`` from docker.io and from ghcr.io differ."""
    hosts = install_hosts_dir(ETC / "containerd", workdir / "hosts", proxy.host_port, ["_default"])
    hub_mark, ghcr_mark = upstream_registry.mark(), ghcr_registry.mark()
    hub, ghcr = test_images["multilayer"], ghcr_images["multilayer"]
    ctr_pull(containerd, "ghcr.io/library/multilayer:1", hosts, proxy)
    ctr_pull(containerd, "docker.io/library/multilayer:1", hosts, proxy)
    got = containerd.images()
    assert got.get("ghcr.io/library/multilayer:1") == ghcr.manifest_digest
    assert got.get("docker.io/library/multilayer:1") == hub.manifest_digest
    assert_served(proxy, ghcr_registry, ghcr, ghcr_mark)
    assert_served(proxy, upstream_registry, hub, hub_mark)

    # A registry regproxy does not serve: 404 NAME_UNKNOWN, and containerd
    # goes on to the registry itself (here: a dead loopback port).
    result = containerd.pull("unknown.example/x:1", hosts)
    assert result.returncode != 0
    assert "https://unknown.example/v2/x/manifests/1" in result.stderr, result.stderr
    assert proxy.logged('HEAD /v2/x/manifests/1?ns=unknown.example HTTP/1.1" 404')


def test_ctr_path_prefixed_mirror(
    proxy: harness.RegProxy,
    containerd: Containerd,
    workdir: Path,
    ghcr_registry: harness.HtpasswdRegistry,
    ghcr_images: dict[str, Image],
) -> None:
    """The alternative in ``etc/containerd/ghcr.io/hosts.toml``: the upstream
    in the mirror's path (``override_path``); regproxy then sees
    ``/v2/ghcr.io/owner/image/...?ns=ghcr.io``."""
    hosts = workdir / "hosts"
    (hosts / "ghcr.io").mkdir(parents=True)
    (hosts / "ghcr.io" / "hosts.toml").write_text(
        'server = "https://ghcr.io"\n'
        f'[host."http://{proxy.host_port}/v2/ghcr.io"]\n'
        '  capabilities = ["pull", "resolve"]\n'
        "  override_path = true\n"
    )
    assert "override_path = true" in (ETC / "containerd" / "ghcr.io" / "hosts.toml").read_text()
    mark = ghcr_registry.mark()
    image = ghcr_images["image"]
    ctr_pull(containerd, "ghcr.io/owner/image:1", hosts, proxy)
    assert containerd.images().get("ghcr.io/owner/image:1") == image.manifest_digest
    assert_served(proxy, ghcr_registry, image, mark)
    assert proxy.logged("/v2/ghcr.io/owner/image/manifests/1?ns=ghcr.io")


def test_ctr_harness_with_upstream_as_mirror(
    containerd: Containerd,
    workdir: Path,
    upstream_registry: harness.UpstreamRegistry,
    test_images: dict[str, Image],
) -> None:
    """The control: ctr with the docker.io upstream itself as the mirror.
    If this fails, the containerd harness is broken, not regproxy."""
    image = test_images["dockerimg"]
    hosts = workdir / "hosts"
    (hosts / "docker.io").mkdir(parents=True)
    (hosts / "docker.io" / "hosts.toml").write_text(
        f'[host."{upstream_registry.url}"]\n  capabilities = ["pull", "resolve"]\n'
    )
    mark = upstream_registry.mark()
    result = containerd.pull("docker.io/library/dockerimg:1", hosts)
    assert result.returncode == 0, result.stderr
    assert containerd.images()["docker.io/library/dockerimg:1"] == image.manifest_digest
    assert set(image.blobs) <= containerd.content()
    assert upstream_registry.count_requests("GET", "ns=docker.io", mark) >= 1


# ---------------------------------------------------------------------------
# podman and skopeo: etc/registries.conf
# ---------------------------------------------------------------------------


def test_skopeo_with_registries_conf(
    proxy: harness.RegProxy,
    skopeo: harness.Skopeo,
    workdir: Path,
    upstream_registry: harness.UpstreamRegistry,
    ghcr_registry: harness.HtpasswdRegistry,
    ghcr_images: dict[str, Image],
    hub_twin_image: Image,
) -> None:
    conf = example("registries.conf", proxy, workdir / "registries.conf")
    hub_mark, ghcr_mark = upstream_registry.mark(), ghcr_registry.mark()
    ghcr_image = ghcr_images["image"]
    for ref, image in (("ghcr.io/owner/image:1", ghcr_image), ("owner/image:1", hub_twin_image)):
        dest = workdir / ref.replace("/", "_")
        args = harness.Skopeo.copy_args(f"docker://{ref}", f"dir:{dest}")
        skopeo.run("--registries-conf", str(conf), *args)
        assert image.layout is not None
        assert harness.tree_digests(dest) == harness.tree_digests(image.layout), ref
    assert_served(proxy, ghcr_registry, ghcr_image, ghcr_mark)
    own = own_layers(hub_twin_image, ghcr_image)
    assert_served(proxy, upstream_registry, hub_twin_image, hub_mark, own)
    assert proxy.logged("GET /v2/ghcr.io/owner/image/manifests/1 ")


def test_podman_with_registries_conf(
    proxy: harness.RegProxy,
    workdir: Path,
    upstream_registry: harness.UpstreamRegistry,
    ghcr_registry: harness.HtpasswdRegistry,
    ghcr_images: dict[str, Image],
    hub_twin_image: Image,
    test_images: dict[str, Image],
) -> None:
    conf = example("registries.conf", proxy, workdir / "registries.conf")
    hub_mark, ghcr_mark = upstream_registry.mark(), ghcr_registry.mark()
    ghcr_image, dockerimg = ghcr_images["image"], test_images["dockerimg"]
    pulls = {
        "ghcr.io/owner/image:1": ghcr_image,
        "docker.io/owner/image:1": hub_twin_image,
        "dockerimg:1": dockerimg,  # a short name: unqualified-search-registries
    }
    with Podman(workdir / "podman", conf) as podman:
        for ref, image in pulls.items():
            result = podman.pull(ref)
            assert result.returncode == 0, (
                f"podman pull {ref} failed: {result.stderr}\n"
                f"--- regproxy log:\n{harness.tail(proxy.log_path, 30)}"
            )
            assert podman.inspect(ref)["Digest"] == image.manifest_digest, ref
    assert_served(proxy, ghcr_registry, ghcr_image, ghcr_mark)
    assert_served(proxy, upstream_registry, dockerimg, hub_mark)
    own = own_layers(hub_twin_image, ghcr_image)
    assert_served(proxy, upstream_registry, hub_twin_image, hub_mark, own)


# ---------------------------------------------------------------------------
# dockerd: etc/daemon.json, and a path prefix in the image reference
# ---------------------------------------------------------------------------


def test_dockerd_mirror_and_path_prefix(
    proxy: harness.RegProxy,
    workdir: Path,
    upstream_registry: harness.UpstreamRegistry,
    ghcr_registry: harness.HtpasswdRegistry,
    ghcr_images: dict[str, Image],
    hub_twin_image: Image,
) -> None:
    """``owner/image:1`` through the Docker Hub mirror of ``etc/daemon.json``,
    and ``127.0.0.1:PORT/ghcr.io/owner/image:1`` from regproxy as a registry."""
    shipped = json.loads(example("daemon.json", proxy, workdir / "daemon.json").read_text())
    (mirror,) = shipped["registry-mirrors"]
    assert mirror == proxy.url and shipped["insecure-registries"] == [proxy.host_port]
    hub_mark, ghcr_mark = upstream_registry.mark(), ghcr_registry.mark()
    ghcr_image = ghcr_images["image"]
    with DockerDaemon(workdir / "dockerd", mirror) as daemon:
        for ref, image in (
            ("owner/image:1", hub_twin_image),
            (f"{proxy.host_port}/ghcr.io/owner/image:1", ghcr_image),
        ):
            result = daemon.pull(ref)
            assert result.returncode == 0, f"docker pull {ref}: {result.stderr}"
            assert not daemon.fell_back(), daemon.pull_log()
            assert image.config is not None
            assert daemon.image_inspect(ref)["Id"] == image.config.digest
    assert_served(proxy, ghcr_registry, ghcr_image, ghcr_mark)
    own = own_layers(hub_twin_image, ghcr_image)
    assert_served(proxy, upstream_registry, hub_twin_image, hub_mark, own)
