"""End to end: a real dockerd uses regproxy as its Docker Hub mirror.

dockerd (20.10) is configured as users do it, with ``registry-mirrors`` in
its ``daemon.json``; ``docker pull multiarch:1`` then asks the mirror for
``library/multiarch``.  dockerd silently falls back to Docker Hub when the
mirror fails (here Docker Hub is a dead loopback proxy port), so every test
checks that the mirror really served the pull: dockerd's log shows no
attempt at Docker Hub, regproxy's cache holds the blobs, and the upstream
registry saw regproxy fetch them.
"""

from __future__ import annotations

import hashlib
import platform
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from .dockerd import DockerDaemon
from .harness import RegProxy, UpstreamRegistry
from .images import Blob, Image

pytestmark = pytest.mark.integration

#: ``uname -m`` -> the platform dockerd picks from an index
MACHINE_PLATFORMS = {
    "x86_64": "linux/amd64",
    "amd64": "linux/amd64",
    "aarch64": "linux/arm64/v8",
    "arm64": "linux/arm64/v8",
    "armv7l": "linux/arm/v7",
}


def for_this_machine(index: Image) -> tuple[Image, str]:
    """The child of *index* dockerd picks here, and its architecture."""
    machine = platform.machine()
    plat = MACHINE_PLATFORMS.get(machine)
    if plat is None or plat not in index.children:
        pytest.skip(f"{index.reference} has no image for this machine ({machine})")
    return index.children[plat], plat.split("/")[1]


def image_blobs(image: Image) -> list[Blob]:
    """The config and layers dockerd downloads for *image*."""
    assert image.config is not None, f"{image.reference} is an index"
    return [image.config, *image.layers]


def short_name(repository: str) -> str:
    """What a user types for a Docker Hub official image: ``library/x`` -> ``x``."""
    return repository.removeprefix("library/")


def pull_failure(
    daemon: DockerDaemon, result: subprocess.CompletedProcess[str], *logs: Path
) -> str:
    """A failure message with what dockerd tried and what the servers logged."""
    parts = [
        f"docker pull exited {result.returncode}: {result.stderr.strip()}",
        "dockerd pull log:",
        *daemon.pull_log()[-20:],
    ]
    for log in logs:
        try:
            tail = Path(log).read_text(errors="replace").splitlines()[-30:]
        except OSError:
            continue
        parts += [f"--- {log} (tail):", *tail]
    return "\n".join(parts)


def assert_pulled(daemon: DockerDaemon, ref: str, index: Image, child: Image, arch: str) -> None:
    """``docker image inspect`` shows the child of *index* for this machine."""
    info = daemon.image_inspect(ref)
    # dockerd 20.10: the image id is the config digest.
    assert info["Id"] == image_blobs(child)[0].digest
    assert info["Architecture"] == arch
    assert info["Os"] == "linux"
    assert f"{short_name(index.repository)}@{index.manifest_digest}" in info["RepoDigests"]
    assert info["RootFS"]["Layers"] and len(info["RootFS"]["Layers"]) == len(child.layers)


@pytest.mark.parametrize("name", ["multiarch", "dockerlist"])
def test_dockerd_pulls_multi_arch_image_through_regproxy(
    workdir: Path,
    upstream_registry: UpstreamRegistry,
    test_images: dict[str, Image],
    regproxy: Callable[..., RegProxy],
    name: str,
) -> None:
    index = test_images[name]
    assert index.is_index and len(index.children) > 1
    child, arch = for_this_machine(index)
    ref = f"{short_name(index.repository)}:{index.tag}"  # docker.io/library/NAME:TAG

    proxy = regproxy()
    start = upstream_registry.mark()
    with DockerDaemon(workdir / "dockerd", proxy.url) as daemon:
        result = daemon.pull(ref)
        assert result.returncode == 0, pull_failure(daemon, result, proxy.log_path)
        assert not daemon.fell_back(), pull_failure(daemon, result, proxy.log_path)
        assert_pulled(daemon, ref, index, child, arch)

        # regproxy served it: it holds every blob dockerd needed, byte for
        # byte, and fetched each from upstream (the only source of them).
        for blob in image_blobs(child):
            path = proxy.blob_path(blob.digest)
            assert path.is_file(), f"{blob.digest} not in regproxy's cache ({path})"
            assert "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest() == blob.digest
            path_part = f"/v2/{index.repository}/blobs/{blob.digest}"
            assert upstream_registry.count_requests("GET", path_part, since=start) >= 1, path_part
        mark = upstream_registry.mark()

        # Remove the image and pull again: dockerd downloads every blob
        # again, and regproxy answers from its cache, not from upstream.
        daemon.docker("image", "rm", ref, check=True)
        result = daemon.pull(ref)
        assert result.returncode == 0, pull_failure(daemon, result, proxy.log_path)
        assert not daemon.fell_back(), pull_failure(daemon, result, proxy.log_path)
        assert_pulled(daemon, ref, index, child, arch)
        upstream_blobs = upstream_registry.count_requests("GET", "/blobs/", since=mark)
        assert upstream_blobs == 0, "the second pull went upstream for blobs"


def test_dockerd_harness_with_upstream_as_mirror(
    workdir: Path, upstream_registry: UpstreamRegistry, test_images: dict[str, Image]
) -> None:
    """The control: the same pull with the token-auth upstream as the mirror.

    If this fails, the harness or the upstream is broken, not regproxy.
    """
    index = test_images["multiarch"]
    child, arch = for_this_machine(index)
    ref = f"{short_name(index.repository)}:{index.tag}"
    start = upstream_registry.mark()
    with DockerDaemon(workdir / "dockerd", upstream_registry.url) as daemon:
        result = daemon.pull(ref)
        assert result.returncode == 0, pull_failure(daemon, result)
        assert not daemon.fell_back(), pull_failure(daemon, result)
        assert_pulled(daemon, ref, index, child, arch)
    for blob in image_blobs(child):
        assert upstream_registry.count_requests("GET", f"/blobs/{blob.digest}", since=start) >= 1
