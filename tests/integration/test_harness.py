"""The integration harness itself, without regproxy: when these fail, the
other integration tests' failures say nothing about regproxy."""

from __future__ import annotations

import base64
import hashlib
import http.client
from collections.abc import Callable

import jwt
import pytest

from . import harness, images, regclient
from .images import Image
from .shim import TCPShim

pytestmark = pytest.mark.integration


def test_token_server_policy(
    upstream_registry: harness.UpstreamRegistry, test_images: dict[str, Image]
) -> None:
    public, private = test_images["multilayer"], test_images["private"]
    anonymous = upstream_registry.client()
    assert anonymous.manifest(public.repository, public.tag, images.MANIFEST_TYPES).status == 200
    # Anonymous token for a private repository: empty actions -> 401, as Docker Hub.
    assert anonymous.manifest(private.repository, private.tag, images.MANIFEST_TYPES).status == 401
    reader = upstream_registry.client(upstream_registry.read_creds)
    resp = reader.manifest(private.repository, private.tag, images.MANIFEST_TYPES)
    assert resp.status == 200 and resp.body == private.manifest

    challenge = regclient.parse_bearer_challenge(
        regclient.request(upstream_registry.url + "/v2/").header("WWW-Authenticate") or ""
    )
    wrong = base64.b64encode(b"reader:wrong").decode()
    bad = regclient.request(
        f"{challenge['realm']}?service={challenge['service']}",
        headers={"Authorization": f"Basic {wrong}"},
    )
    assert bad.status == 401


def test_token_claims(upstream_registry: harness.UpstreamRegistry) -> None:
    challenge = regclient.parse_bearer_challenge(
        regclient.request(upstream_registry.url + "/v2/").header("WWW-Authenticate") or ""
    )
    resp = regclient.request(
        f"{challenge['realm']}?service={challenge['service']}&scope=repository:library/x:pull,push"
    )
    token = resp.json()["token"]  # type: ignore[index]
    assert "x5c" in jwt.get_unverified_header(token)
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["aud"] == challenge["service"]
    assert claims["access"] == [{"type": "repository", "name": "library/x", "actions": ["pull"]}]
    assert {"iss", "sub", "exp", "nbf", "iat", "jti"} <= set(claims)


def test_images_are_served_upstream(
    upstream_registry: harness.UpstreamRegistry, test_images: dict[str, Image]
) -> None:
    client = upstream_registry.client(upstream_registry.read_creds)
    for image in test_images.values():
        for digest, manifest in image.manifests.items():
            resp = client.manifest(image.repository, digest, images.MANIFEST_TYPES)
            assert resp.status == 200 and resp.body == manifest, (image.name, digest)
        for digest, blob in image.blobs.items():
            head = client.blob(image.repository, digest, method="HEAD")
            assert head.status == 200 and head.header("Content-Length") == str(blob.size), (
                image.name,
                digest,
            )
    assert test_images["big"].biggest_layer.size > 100 * 1024 * 1024
    assert set(test_images["multiarch"].children) >= {"linux/amd64", "linux/arm64/v8"}


def test_access_log_counts(
    upstream_registry: harness.UpstreamRegistry, test_images: dict[str, Image]
) -> None:
    image = test_images["dockerimg"]
    digest = image.layers[0].digest
    mark = upstream_registry.mark()
    client = upstream_registry.client()
    assert client.blob(image.repository, digest).status == 200
    assert (
        upstream_registry.count_requests("GET", f"/blobs/{digest}", since=mark, statuses=[200]) == 1
    )
    assert upstream_registry.count_requests("HEAD", "/blobs/", since=mark) == 0


def test_shim_cuts_and_recovers(
    upstream_registry: harness.UpstreamRegistry,
    test_images: dict[str, Image],
    tcp_shim: Callable[..., TCPShim],
) -> None:
    image = test_images["big"]
    layer = image.biggest_layer
    token = upstream_registry.client()._token(_challenge(upstream_registry, image))
    shim = tcp_shim()

    def get() -> tuple[int, str]:
        conn = http.client.HTTPConnection("127.0.0.1", shim.port, timeout=30)
        try:
            conn.request(
                "GET",
                f"/v2/{image.repository}/blobs/{layer.digest}",
                headers={"Authorization": f"Bearer {token}"},
            )
            resp = conn.getresponse()
            h, n = hashlib.sha256(), 0
            try:
                while chunk := resp.read(1 << 20):
                    h.update(chunk)
                    n += len(chunk)
            except (http.client.IncompleteRead, OSError):
                return n, "broken"
            return n, "sha256:" + h.hexdigest()
        finally:
            conn.close()

    shim.cut_after(8 * 1024 * 1024)
    n, outcome = get()
    assert outcome == "broken" and n < 20 * 1024 * 1024
    with pytest.raises(OSError):
        get()  # down: refused
    shim.disarm()
    shim.up()
    assert get() == (layer.size, layer.digest)


def _challenge(upstream_registry: harness.UpstreamRegistry, image: Image) -> dict[str, str]:
    resp = regclient.request(f"{upstream_registry.url}/v2/{image.repository}/manifests/{image.tag}")
    return regclient.parse_bearer_challenge(resp.header("WWW-Authenticate") or "")
