"""The admin API and regproxy-admin against a running twistd regproxy and real registries."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from . import harness
from .conftest import GHCR_CREDS
from .images import Image

pytestmark = pytest.mark.integration
ADMIN = str(Path(sys.executable).parent / "regproxy-admin")


def admin(proxy: harness.RegProxy, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "REGPROXY_ADMIN_URL": proxy.admin_url}
    env.pop("REGPROXY_ADMIN_TOKEN", None)
    return subprocess.run(
        [ADMIN, *args], capture_output=True, text=True, env=env, timeout=120, check=False
    )


def admin_json(proxy: harness.RegProxy, *args: str) -> Any:
    result = admin(proxy, "--json", *args)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def x_cache(proxy: harness.RegProxy, path: str) -> str | None:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=30)
    try:
        conn.request("HEAD", path)
        return conn.getresponse().getheader("X-Cache")
    finally:
        conn.close()


def test_pull_purge_and_miss_again(
    test_images: dict[str, Image],
    regproxy: Callable[..., harness.RegProxy],
    skopeo: harness.Skopeo,
    workdir: Path,
) -> None:
    image = test_images["multilayer"]
    proxy = regproxy()
    skopeo.pull(image.docker_ref(proxy.host_port), workdir / "first")
    manifest_path = f"/v2/{image.repository}/manifests/{image.tag}"
    layer_path = f"/v2/{image.repository}/blobs/{image.biggest_layer.digest}"
    assert x_cache(proxy, manifest_path) == "HIT"
    assert x_cache(proxy, layer_path) == "HIT"

    listed = admin(proxy, "ls", "docker.io")
    assert listed.returncode == 0 and image.repository in listed.stdout
    stats = admin_json(proxy, "stats")
    assert stats["cache"]["blobs"] >= len(image.blobs)

    result = admin_json(proxy, "purge", f"docker.io/{image.repository}:{image.tag}")
    assert result["manifests"] == 1
    assert result["bytes_freed"] >= sum(b.size for b in image.blobs.values())
    assert not proxy.blob_path(image.biggest_layer.digest).exists()
    assert x_cache(proxy, manifest_path) == "MISS"
    assert x_cache(proxy, layer_path) == "MISS"  # a HEAD: asked upstream, not downloaded
    skopeo.pull(image.docker_ref(proxy.host_port), workdir / "again")
    assert x_cache(proxy, layer_path) == "HIT"


def test_upstream_added_through_the_api_serves_at_once_and_after_restart(
    ghcr_registry: harness.HtpasswdRegistry,
    ghcr_images: dict[str, Image],
    regproxy: Callable[..., harness.RegProxy],
    skopeo: harness.Skopeo,
    workdir: Path,
) -> None:
    image = ghcr_images["image"]
    proxy = regproxy()
    ref = f"docker://{proxy.host_port}/private.example/{image.repository}:{image.tag}"
    assert skopeo.pull(ref, workdir / "before", check=False).returncode != 0

    added = admin(
        proxy,
        "upstreams",
        "add",
        "private.example",
        f"url={ghcr_registry.url}",
        f"username={GHCR_CREDS[0]}",
        f"password={GHCR_CREDS[1]}",
        "share_private=true",
    )
    assert added.returncode == 0, added.stderr
    skopeo.pull(ref, workdir / "after")
    assert (workdir / "after" / "manifest.json").read_bytes() == image.manifest

    proxy.restart()
    shown = admin_json(proxy, "upstreams", "show", "private.example")
    assert shown["url"] == ghcr_registry.url
    assert GHCR_CREDS[1] not in json.dumps(shown)
    skopeo.pull(ref, workdir / "after-restart")

    removed = admin(proxy, "upstreams", "rm", "private.example")
    assert removed.returncode == 0, removed.stderr
    assert skopeo.pull(ref, workdir / "removed", check=False).returncode != 0


def test_prefetch_warms_the_cache(
    test_images: dict[str, Image],
    upstream_registry: harness.UpstreamRegistry,
    regproxy: Callable[..., harness.RegProxy],
) -> None:
    image = test_images["multiarch"]
    proxy = regproxy()
    job = admin_json(
        proxy, "prefetch", "--wait", "--platform", "linux/amd64", f"docker.io/{image.reference}"
    )
    assert job["state"] == "done", job
    since = upstream_registry.mark()
    amd64 = image.children["linux/amd64"]
    others = [c for p, c in image.children.items() if p != "linux/amd64"]
    for digest in amd64.blobs:
        assert proxy.blob_path(digest).exists()
        assert x_cache(proxy, f"/v2/{image.repository}/blobs/{digest}") == "HIT"
    assert upstream_registry.count_requests("GET", "/blobs/", since) == 0
    only_elsewhere = {d for c in others for d in c.blobs} - set(amd64.blobs)
    assert only_elsewhere and not any(proxy.blob_path(d).exists() for d in only_elsewhere)
