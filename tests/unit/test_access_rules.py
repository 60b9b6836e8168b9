"""upstreams.<name>.allow / deny / max_blob_size through the proxy, against
the in-process fake registry."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
import pytest_twisted

from registryproxy.admin.backend import AdminError
from registryproxy.cache.blobs import BlobFetch, MemoryRelay
from registryproxy.cache.store import VerificationError
from registryproxy.names import Digest

DENIED_BY = 'denied by upstreams.docker.io.deny "library/large"'


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def error(reply) -> tuple[int, str, str]:
    first = json.loads(reply.body)["errors"][0]
    return reply.code, first["code"], first["message"]


def paths(repo: str, tag: str, manifest: str, blob: str) -> list[tuple[str, str]]:
    """Every kind of request a client makes of a repository."""
    return [
        ("GET", f"/v2/{repo}/manifests/{tag}"),
        ("HEAD", f"/v2/{repo}/manifests/{tag}"),
        ("GET", f"/v2/{repo}/manifests/{manifest}"),
        ("HEAD", f"/v2/{repo}/manifests/{manifest}"),
        ("GET", f"/v2/{repo}/blobs/{blob}"),
        ("HEAD", f"/v2/{repo}/blobs/{blob}"),
        ("GET", f"/v2/{repo}/tags/list"),
        ("GET", f"/v2/{repo}/referrers/{manifest}"),
    ]


async def refused(proxy, requests, says: str) -> None:
    for method, path in requests:
        reply = await proxy.request(method, path)
        assert reply.code == 403, (method, path)
        if method == "GET":
            status, code, message = error(reply)
            assert (status, code) == (403, "DENIED"), (method, path)
            assert says in message, (method, path, message)


@pytest_twisted.ensureDeferred
async def test_a_denied_repository_is_refused_before_any_upstream_request(
    fake_registry, make_proxy
):
    manifest, _ = fake_registry.add_image("library/large", "1", [b"large layer"])
    proxy = await make_proxy(fake_registry.url, deny=["library/large"])
    await refused(proxy, paths("library/large", "1", manifest, sha(b"large layer")), DENIED_BY)
    # the name as clients write it, the path form and ns= too
    await refused(
        proxy,
        [
            ("GET", "/v2/large/manifests/1"),
            ("GET", "/v2/docker.io/library/large/manifests/1"),
            ("GET", "/v2/large/manifests/1?ns=docker.io"),
        ],
        DENIED_BY,
    )
    assert fake_registry.requests == []


@pytest_twisted.ensureDeferred
async def test_an_allow_list_admits_only_what_it_names(fake_registry, make_proxy):
    images = {
        repo: fake_registry.add_image(repo, "1", [repo.encode()])[0]
        for repo in ("library/alpine", "myorg/team/app", "other/app")
    }
    proxy = await make_proxy(fake_registry.url, allow=["library/*", "myorg/**"])
    for asked, repo in [
        ("library/alpine", "library/alpine"),
        ("alpine", "library/alpine"),
        ("myorg/team/app", "myorg/team/app"),
    ]:
        assert (await proxy.get(f"/v2/{asked}/manifests/1")).code == 200, asked
        assert (await proxy.get(f"/v2/{asked}/blobs/{sha(repo.encode())}")).code == 200, asked
    before = len(fake_registry.requests)
    says = 'docker.io/other/app:1 is not in upstreams.docker.io.allow ("library/*", "myorg/**")'
    status, code, message = error(await proxy.get("/v2/other/app/manifests/1"))
    assert (status, code) == (403, "DENIED") and says in message
    await refused(
        proxy,
        paths("other/app", "1", images["other/app"], sha(b"other/app")),
        "upstreams.docker.io.allow",
    )
    assert len(fake_registry.requests) == before


@pytest_twisted.ensureDeferred
async def test_deny_wins_over_allow(fake_registry, make_proxy):
    fake_registry.add_image("library/alpine", "1", [b"a"])
    manifest, _ = fake_registry.add_image("library/large", "1", [b"b"])
    proxy = await make_proxy(fake_registry.url, allow=["library/*"], deny=["library/large"])
    assert (await proxy.get("/v2/library/alpine/manifests/1")).code == 200
    await refused(proxy, paths("library/large", "1", manifest, sha(b"b")), DENIED_BY)
    # nor prefetched through the admin API: cached, it would never be served
    with pytest.raises(AdminError) as e:
        proxy.proxy.control.prefetch("docker.io", "large", "1", None)
    assert e.value.status == 400 and DENIED_BY in e.value.message
    assert fake_registry.count(None, "library/large") == 0


@pytest_twisted.ensureDeferred
async def test_a_tag_rule_refuses_that_tag_only(fake_registry, make_proxy):
    latest, _ = fake_registry.add_image("me/app", "latest", [b"a"])
    fake_registry.add_image("me/app", "1", [b"b"])
    proxy = await make_proxy(fake_registry.url, deny=["**:latest"])
    status, code, message = error(await proxy.get("/v2/me/app/manifests/latest"))
    assert (status, code) == (403, "DENIED")
    assert 'me/app:latest is denied by upstreams.docker.io.deny "**:latest"' in message
    assert (await proxy.get("/v2/me/app/manifests/1")).code == 200
    # by digest there is no tag: the rule does not apply
    assert (await proxy.get(f"/v2/me/app/manifests/{latest}")).code == 200
    assert (await proxy.get(f"/v2/me/app/blobs/{sha(b'a')}")).code == 200


@pytest_twisted.ensureDeferred
async def test_a_cached_image_is_refused_once_its_repository_is_denied(fake_registry, make_proxy):
    manifest, body = fake_registry.add_image("library/alpine", "3", [b"layer"])
    proxy = await make_proxy(fake_registry.url)
    for path in (
        "/v2/library/alpine/manifests/3",
        f"/v2/library/alpine/manifests/{manifest}",
        f"/v2/library/alpine/blobs/{sha(b'layer')}",
    ):
        assert (await proxy.get(path)).code == 200
    assert (await proxy.get("/v2/library/alpine/manifests/3")).header("X-Cache") == "HIT"
    before = len(fake_registry.requests)

    control = proxy.proxy.control
    view = control.set_upstream("docker.io", {"deny": ["library/alpine"]}, merge=True)
    assert view["deny"] == ["library/alpine"]
    assert control.upstreams()["docker.io"]["deny"] == ["library/alpine"]
    await refused(
        proxy,
        paths("library/alpine", "3", manifest, sha(b"layer")),
        'denied by upstreams.docker.io.deny "library/alpine"',
    )
    assert len(fake_registry.requests) == before

    control.set_upstream("docker.io", {"deny": []}, merge=True)
    reply = await proxy.get("/v2/library/alpine/manifests/3")
    assert (reply.code, reply.body, reply.header("X-Cache")) == (200, body, "HIT")


@pytest_twisted.ensureDeferred
async def test_a_denied_repositorys_blob_is_served_through_an_allowed_one(
    fake_registry, make_proxy
):
    shared = b"a layer both images have"
    fake_registry.add_image("library/alpine", "1", [shared])
    fake_registry.add_image("library/large", "1", [shared])
    proxy = await make_proxy(fake_registry.url, deny=["library/large"])
    # not cached yet: refused through the denied one, no upstream asked
    await refused(proxy, [("GET", f"/v2/library/large/blobs/{sha(shared)}")], DENIED_BY)
    assert fake_registry.requests == []
    assert (await proxy.get("/v2/library/alpine/manifests/1")).code == 200
    reply = await proxy.get(f"/v2/library/alpine/blobs/{sha(shared)}")
    assert (reply.code, reply.body) == (200, shared)
    # cached now: still refused through the denied one
    await refused(proxy, [("GET", f"/v2/library/large/blobs/{sha(shared)}")], DENIED_BY)
    reply = await proxy.get(f"/v2/library/alpine/blobs/{sha(shared)}")
    assert (reply.code, reply.header("X-Cache")) == (200, "HIT")


@pytest_twisted.ensureDeferred
async def test_a_blob_over_max_blob_size_is_refused_before_its_download(fake_registry, make_proxy):
    big, small = os.urandom(5000), b"small layer"
    manifest, _ = fake_registry.add_image("me/big", "1", [small, big])
    fake_registry.add_image("me/small", "1", [small])
    proxy = await make_proxy(fake_registry.url, max_blob_size="1KiB")
    says = f"blob {sha(big)} is 5000 bytes, over upstreams.docker.io.max_blob_size"

    # asked for by digest, nothing known of it: refused on the upstream's Content-Length
    status, code, message = error(await proxy.get(f"/v2/me/big/blobs/{sha(big)}"))
    assert (status, code) == (403, "DENIED") and says in message and '"1KiB"' in message
    assert (await proxy.head(f"/v2/me/big/blobs/{sha(big)}")).code == 403
    assert not proxy.blob_path(sha(big)).exists()
    assert os.listdir(proxy.cache_dir / "tmp") == []
    assert fake_registry.count("GET", f"/blobs/{sha(big)}") == 1  # headers only, then hung up

    # the manifest that lists it says so first: the client downloads nothing
    status, code, message = error(await proxy.get("/v2/me/big/manifests/1"))
    assert (status, code) == (403, "DENIED") and says in message
    assert (await proxy.head(f"/v2/me/big/manifests/{manifest}")).code == 403

    # what fits is served
    assert (await proxy.get("/v2/me/small/manifests/1")).code == 200
    reply = await proxy.get(f"/v2/me/small/blobs/{sha(small)}")
    assert (reply.code, reply.body) == (200, small)
    assert fake_registry.count("GET", f"/blobs/{sha(big)}") == 1
    assert not proxy.blob_path(sha(big)).exists()


@pytest_twisted.ensureDeferred
async def test_max_blob_size_set_through_the_admin_api_covers_cached_blobs(
    fake_registry, make_proxy
):
    big = os.urandom(5000)
    fake_registry.add_image("me/big", "1", [big])
    proxy = await make_proxy(fake_registry.url)
    assert (await proxy.get(f"/v2/me/big/blobs/{sha(big)}")).code == 200
    view = proxy.proxy.control.set_upstream("docker.io", {"max_blob_size": 4096}, merge=True)
    assert view["max_blob_size"] == 4096
    before = len(fake_registry.requests)
    status, code, message = error(await proxy.get(f"/v2/me/big/blobs/{sha(big)}"))
    assert (status, code) == (403, "DENIED") and "max_blob_size" in message
    assert len(fake_registry.requests) == before


@pytest_twisted.ensureDeferred
async def test_bad_rules_through_the_admin_api_are_400(fake_registry, make_proxy):
    proxy = await make_proxy(fake_registry.url)
    control = proxy.proxy.control
    for settings, says in [
        ({"allow": ["Library/*"]}, "allow[0]"),
        ({"deny": ["a/b**"]}, "deny[0]"),
        ({"deny": ["a@sha256:" + "0" * 64]}, "not digests"),
        ({"deny": "library/x"}, "deny"),
        ({"max_blob_size": "lots"}, "max_blob_size"),
    ]:
        with pytest.raises(AdminError) as e:
            control.set_upstream("docker.io", settings, merge=True)
        assert e.value.status == 400 and says in e.value.message, settings
    assert control.upstreams()["docker.io"]["deny"] == []
    assert control.upstreams()["docker.io"]["allow"] is None


def test_a_body_of_no_announced_size_stops_at_max_blob_size():
    digest = Digest.of(b"x" * 20)
    fetch = BlobFetch(digest, None, MemoryRelay(digest, None), "docker.io", max_size=10)
    fetch._data(b"x" * 10)
    with pytest.raises(VerificationError, match="max_blob_size of 10 bytes"):
        fetch._data(b"x")
