"""Many registries through one regproxy: how a request picks its upstream,
and that the upstreams' content never mixes.

Two real upstreams on 127.0.0.1: ``upstream_registry`` as docker.io (token
auth, the default upstream) and ``ghcr_registry`` as ghcr.io (private, Basic
auth, with the alias ``ghcr.proxy.test``).  Both hold a repository
``owner/image`` and ``library/multilayer`` with different content (and one
base layer in common, byte for byte).  The forms of routing:

- a path prefix, ``/v2/ghcr.io/owner/image/...`` (skopeo here, and a plain
  client);
- containerd's ``?ns=ghcr.io`` (a plain client here; ctr in ``test_clients.py``);
- the Host header, ``Host: ghcr.proxy.test``;
- else the default upstream.

Each test checks the upstream access logs: the right registry, and only it,
saw the requests.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from . import harness, images, regclient
from .conftest import GHCR_ALIAS
from .images import Image

pytestmark = pytest.mark.integration

ACCEPT = {"Accept": ", ".join(images.MANIFEST_TYPES)}


def get(
    proxy: harness.RegProxy, path: str, method: str = "GET", **headers: str
) -> regclient.Response:
    """A request straight to regproxy, as a client that knows no auth."""
    return regclient.request(proxy.url + path, method, {**ACCEPT, **headers})


def error_codes(resp: regclient.Response) -> list[str]:
    try:
        body = json.loads(resp.body)
    except ValueError:
        return []
    return [e.get("code") for e in body.get("errors", [])] if isinstance(body, dict) else []


def manifest_fetched(
    registry: harness.UpstreamRegistry, image: Image, since: int, *, by_tag: bool = True
) -> int:
    """How many times *registry* served *image*'s manifest (200) since *since*."""
    ref = image.tag if by_tag else image.manifest_digest
    return registry.count_requests(
        "GET", f"/v2/{image.repository}/manifests/{ref}", since, statuses=[200]
    )


def unique_layer(image: Image, other: Image) -> images.Blob:
    """A layer of *image* that *other* does not have."""
    (blob,) = [b for b in image.layers if b.digest not in other.blobs]
    return blob


# ---------------------------------------------------------------------------
# each routing form reaches its upstream
# ---------------------------------------------------------------------------


def test_skopeo_pulls_through_a_path_prefix(
    proxy: harness.RegProxy,
    skopeo: harness.Skopeo,
    workdir: Path,
    ghcr_registry: harness.HtpasswdRegistry,
    upstream_registry: harness.UpstreamRegistry,
    ghcr_images: dict[str, Image],
) -> None:
    image = ghcr_images["image"]
    ghcr_mark, hub_mark = ghcr_registry.mark(), upstream_registry.mark()
    # No credentials: regproxy holds ghcr's.
    skopeo.pull(f"docker://{proxy.host_port}/ghcr.io/{image.reference}", workdir / "pulled")

    assert image.layout is not None
    assert harness.tree_digests(workdir / "pulled") == harness.tree_digests(image.layout)
    assert manifest_fetched(ghcr_registry, image, ghcr_mark) == 1
    for digest in image.blobs:
        assert ghcr_registry.count_requests("GET", digest, ghcr_mark, statuses=[200]) == 1
        assert images.file_digest(proxy.blob_path(digest)) == digest
    assert upstream_registry.requests(hub_mark) == [], "docker.io was asked for ghcr.io's image"


def test_ns_parameter_selects_the_upstream(
    proxy: harness.RegProxy,
    ghcr_registry: harness.HtpasswdRegistry,
    upstream_registry: harness.UpstreamRegistry,
    ghcr_images: dict[str, Image],
    hub_twin_image: Image,
) -> None:
    """``?ns=`` as containerd sends it to a mirror; ``ns=docker.io`` keeps
    Docker Hub's ``library/`` rule."""
    ghcr_image = ghcr_images["image"]
    mark = ghcr_registry.mark()
    resp = get(proxy, "/v2/owner/image/manifests/1?ns=ghcr.io")
    assert resp.status == 200, resp.body
    assert resp.body == ghcr_image.manifest
    assert resp.header("X-Cache") == "MISS"
    assert manifest_fetched(ghcr_registry, ghcr_image, mark) == 1

    resp = get(proxy, "/v2/owner/image/manifests/1?ns=docker.io")
    assert resp.status == 200 and resp.body == hub_twin_image.manifest

    mark = upstream_registry.mark()
    resp = get(proxy, "/v2/dockerimg/manifests/1?ns=docker.io")
    assert resp.status == 200, resp.body
    assert upstream_registry.count_requests("GET", "/v2/library/dockerimg/manifests/1", mark) >= 1


def test_host_header_selects_the_upstream(
    proxy: harness.RegProxy,
    ghcr_registry: harness.HtpasswdRegistry,
    ghcr_images: dict[str, Image],
    hub_twin_image: Image,
) -> None:
    """A virtual host per upstream: ``Host: ghcr.proxy.test[:port]``."""
    image = ghcr_images["image"]
    mark = ghcr_registry.mark()
    for host in (f"{GHCR_ALIAS}:{proxy.port}", GHCR_ALIAS, GHCR_ALIAS.upper()):
        resp = get(proxy, "/v2/owner/image/manifests/1", Host=host)
        assert resp.status == 200, (host, resp.status, resp.body)
        assert resp.body == image.manifest, f"Host: {host} did not reach ghcr.io"
        blob = get(proxy, f"/v2/owner/image/blobs/{image.layers[-1].digest}", Host=host)
        assert blob.status == 200 and images.sha256_digest(blob.body) == image.layers[-1].digest
    assert manifest_fetched(ghcr_registry, image, mark) == 1  # then from the cache

    # Any other Host: the default upstream (docker.io).
    resp = get(proxy, "/v2/owner/image/manifests/1", Host=f"elsewhere.test:{proxy.port}")
    assert resp.status == 200 and resp.body == hub_twin_image.manifest


def test_unknown_registry_is_name_unknown(
    proxy: harness.RegProxy,
    ghcr_registry: harness.HtpasswdRegistry,
    upstream_registry: harness.UpstreamRegistry,
) -> None:
    """A registry neither configured nor a preset: 404 NAME_UNKNOWN from
    regproxy itself; no upstream is asked."""
    ghcr_mark, hub_mark = ghcr_registry.mark(), upstream_registry.mark()
    for path in (
        "/v2/unknown.example/x/manifests/1",
        "/v2/unknown.example:5000/x/manifests/1",
        "/v2/unknown.example/x/blobs/sha256:" + "0" * 64,
        "/v2/x/y/manifests/1?ns=unknown.example",
    ):
        resp = get(proxy, path)
        assert resp.status == 404, (path, resp.status, resp.body)
        assert error_codes(resp) == ["NAME_UNKNOWN"], (path, resp.body)
    assert ghcr_registry.requests(ghcr_mark) == []
    assert upstream_registry.requests(hub_mark) == []


# ---------------------------------------------------------------------------
# the cache keeps upstreams apart
# ---------------------------------------------------------------------------


def test_same_repository_on_two_upstreams(
    proxy: harness.RegProxy,
    test_images: dict[str, Image],
    ghcr_images: dict[str, Image],
    hub_twin_image: Image,
) -> None:
    """``owner/image`` and ``library/multilayer`` exist on both upstreams:
    each route gets its own, asked first or second, cold or cached."""
    pairs = [
        # (docker.io image, ghcr.io image), docker.io asked first
        (hub_twin_image, ghcr_images["image"]),
        # ghcr.io asked first
        (test_images["multilayer"], ghcr_images["multilayer"]),
    ]
    for round_ in ("MISS", "HIT"):
        for i, (hub, ghcr) in enumerate(pairs):
            hub_paths = [
                f"/v2/{hub.repository}/manifests/{hub.tag}",
                f"/v2/docker.io/{hub.repository}/manifests/{hub.tag}",
                f"/v2/{hub.repository}/manifests/{hub.tag}?ns=docker.io",
            ]
            ghcr_paths = [
                f"/v2/ghcr.io/{ghcr.repository}/manifests/{ghcr.tag}",
                f"/v2/{ghcr.repository}/manifests/{ghcr.tag}?ns=ghcr.io",
            ]
            order = [(hub, hub_paths), (ghcr, ghcr_paths)]
            for image, paths in order if i == 0 else order[::-1]:
                for n, path in enumerate(paths):
                    resp = get(proxy, path)
                    assert resp.status == 200, (path, resp.status, resp.body)
                    assert resp.body == image.manifest, f"{path} served the other upstream's"
                    want = round_ if n == 0 else "HIT"
                    assert resp.header("X-Cache") == want, (path, resp.header("X-Cache"))

    # By digest, a manifest is found only in its own upstream's repository.
    hub, ghcr = hub_twin_image, ghcr_images["image"]
    resp = get(proxy, f"/v2/owner/image/manifests/{ghcr.manifest_digest}")
    assert resp.status == 404, ("ghcr.io's manifest via docker.io", resp.status, resp.body)
    resp = get(proxy, f"/v2/ghcr.io/owner/image/manifests/{hub.manifest_digest}")
    assert resp.status == 404, ("docker.io's manifest via ghcr.io", resp.status, resp.body)


def test_cached_blob_is_not_served_through_another_repository(
    proxy: harness.RegProxy,
    ghcr_registry: harness.HtpasswdRegistry,
    upstream_registry: harness.UpstreamRegistry,
    test_images: dict[str, Image],
    ghcr_images: dict[str, Image],
    hub_twin_image: Image,
) -> None:
    """A layer of ghcr.io's private ``owner/image``, once cached, is served
    to a repository only if that repository references it upstream."""
    private = ghcr_images["image"]
    secret = unique_layer(private, hub_twin_image)
    resp = get(proxy, f"/v2/ghcr.io/{private.repository}/blobs/{secret.digest}")
    assert resp.status == 200 and resp.header("X-Cache") == "MISS"
    assert proxy.blob_path(secret.digest).is_file()
    resp = get(proxy, f"/v2/ghcr.io/{private.repository}/blobs/{secret.digest}")
    assert resp.status == 200 and resp.header("X-Cache") == "HIT"

    for path in (
        # docker.io repositories: the twin, one that exists, one that does not
        f"/v2/owner/image/blobs/{secret.digest}",
        f"/v2/{test_images['dockerimg'].repository}/blobs/{secret.digest}",
        f"/v2/nobody/nothing/blobs/{secret.digest}",
        f"/v2/docker.io/owner/image/blobs/{secret.digest}",
        # another repository of ghcr.io itself
        f"/v2/ghcr.io/library/multilayer/blobs/{secret.digest}",
        f"/v2/ghcr.io/other/repo/blobs/{secret.digest}",
    ):
        for method in ("GET", "HEAD"):
            resp = get(proxy, path, method)
            assert resp.status in (401, 403, 404), (method, path, resp.status, resp.body[:200])
            assert secret.digest not in (resp.header("Docker-Content-Digest") or "")
            assert images.sha256_digest(resp.body) != secret.digest

    # The control: a layer both upstreams really have (the shared base) is
    # served to either.  docker.io never sent it, so it must, once (a HEAD's
    # word is not enough); then docker.io's repositories read the cached copy.
    shared = next(b for b in private.layers if b.digest in hub_twin_image.blobs)
    assert get(proxy, f"/v2/ghcr.io/owner/image/blobs/{shared.digest}").status == 200
    mark = upstream_registry.mark()
    for cache in ("MISS", "HIT"):
        resp = get(proxy, f"/v2/owner/image/blobs/{shared.digest}")
        assert (resp.status, resp.header("X-Cache")) == (200, cache), resp.body
        assert images.sha256_digest(resp.body) == shared.digest
    assert upstream_registry.count_requests("GET", f"/blobs/{shared.digest}", mark, [200]) == 1


def test_private_upstream_credentials(
    regproxy: Callable[..., harness.RegProxy],
    ghcr_upstream: dict[str, Any],
    ghcr_images: dict[str, Image],
    workdir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """ghcr.io's password inline (the other tests), from the environment, from
    a file; without one, its private images are refused."""
    image = ghcr_images["image"]
    path = f"/v2/ghcr.io/{image.repository}/manifests/{image.tag}"
    password = ghcr_upstream["password"]
    monkeypatch.setenv("REGPROXY_TEST_GHCR_PASSWORD", password)  # twistd inherits it
    (workdir / "ghcr-password").write_text(password + "\n")
    anonymous = {k: v for k, v in ghcr_upstream.items() if k not in ("username", "password")}
    with_env = {**anonymous, "username": ghcr_upstream["username"]}
    with_file = dict(with_env)
    with_env["password_env"] = "REGPROXY_TEST_GHCR_PASSWORD"
    with_file["password_file"] = str(workdir / "ghcr-password")
    for upstream in (with_env, with_file):
        proxy = regproxy(extra_config={"upstreams": {"ghcr.io": upstream}})
        resp = get(proxy, path)
        assert resp.status == 200 and resp.body == image.manifest, (upstream, resp.body)
        proxy.kill()

    proxy = regproxy(extra_config={"upstreams": {"ghcr.io": anonymous}})
    resp = get(proxy, path)
    assert resp.status in (401, 403), (resp.status, resp.body)
    assert image.manifest not in resp.body
