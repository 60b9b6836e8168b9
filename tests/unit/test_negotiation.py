"""What each client's Accept gets, and that it never changes what is cached.

A tag's cache entry is what the registry stores for it: one client's narrow
Accept must not make the upstream's platform fallback the tag for everyone.
"""

from __future__ import annotations

import json

import pytest
import pytest_twisted
from test_proxy import DOCKER_LIST, DOCKER_MANIFEST, DOCKERD_ACCEPT, OCI_INDEX, OCI_MANIFEST

from registryproxy.cache.index import Index
from registryproxy.mediatypes import MODERN, acceptable, default_platform, upstream_accept


def multi_arch(registry, repo="library/nginx", tag="latest", media="docker"):
    amd64, _ = registry.add_image(repo, None, [b"amd64 layer"], media, architecture="amd64")
    arm64, _ = registry.add_image(repo, None, [b"arm64 layer"], media, architecture="arm64")
    index = registry.add_index(repo, tag, [amd64, arm64], media)
    return index, amd64, arm64


def sent_accept(registry, method: str) -> set[str]:
    request = [r for r in registry.requests if r.method == method and "/manifests/" in r.path][-1]
    return {t.strip() for line in request.header("Accept") for t in line.split(",")}


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("method", ["GET", "HEAD"])
async def test_a_narrow_accept_does_not_poison_a_multi_arch_tag(fake_registry, make_proxy, method):
    index, amd64, _ = multi_arch(fake_registry)
    proxy = await make_proxy(fake_registry.url)

    first = await proxy.request(
        method, "/v2/library/nginx/manifests/latest", {"Accept": [DOCKER_MANIFEST]}
    )
    assert first.code == 200
    assert first.header("Docker-Content-Digest") == amd64
    # the upstream was asked for what it stores, not for this client's type
    assert set(MODERN) <= sent_accept(fake_registry, "GET")

    later = await proxy.get("/v2/library/nginx/manifests/latest", Accept=DOCKERD_ACCEPT)
    assert later.code == 200
    assert later.header("Docker-Content-Digest") == index
    assert later.header("Content-Type") == DOCKER_LIST
    assert later.header("X-Cache") == "HIT"
    assert fake_registry.count("GET", "/manifests/latest") == 1


@pytest_twisted.ensureDeferred
async def test_revalidation_asks_for_the_stored_type_whatever_the_client_takes(
    fake_registry, make_proxy
):
    index, amd64, _ = multi_arch(fake_registry)
    proxy = await make_proxy(fake_registry.url, cache={"tag_ttl": 0})
    await proxy.get("/v2/library/nginx/manifests/latest", Accept=DOCKERD_ACCEPT)

    narrow = await proxy.head("/v2/library/nginx/manifests/latest", Accept=[DOCKER_MANIFEST])
    assert narrow.header("Docker-Content-Digest") == amd64
    assert set(MODERN) <= sent_accept(fake_registry, "HEAD")
    # the HEAD found the tag unchanged: nothing fetched again, the tag still the index
    assert fake_registry.count("GET", "/manifests/latest") == 1
    wide = await proxy.get("/v2/library/nginx/manifests/latest", Accept=DOCKERD_ACCEPT)
    assert wide.header("Docker-Content-Digest") == index


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("accept", [[], ["*/*"], ["application/json"]])
async def test_curl_and_friends_get_what_the_registry_stores(fake_registry, make_proxy, accept):
    """curl sends */*; no Accept, or only application/json, means the same."""
    index, _, _ = multi_arch(fake_registry, media="oci")
    proxy = await make_proxy(fake_registry.url)
    reply = await proxy.get("/v2/library/nginx/manifests/latest", Accept=accept)
    assert reply.code == 200, reply.body
    assert reply.header("Docker-Content-Digest") == index
    assert reply.header("Content-Type") == OCI_INDEX
    assert set(MODERN) <= sent_accept(fake_registry, "GET")


@pytest_twisted.ensureDeferred
async def test_an_oci_index_yields_its_platform_manifest_to_a_client_without_lists(
    fake_registry, make_proxy
):
    index, amd64, _ = multi_arch(fake_registry, media="oci")
    proxy = await make_proxy(fake_registry.url)
    await proxy.get("/v2/library/nginx/manifests/latest")  # caches the index
    reply = await proxy.get("/v2/library/nginx/manifests/latest", Accept=[OCI_MANIFEST])
    assert (reply.code, reply.header("Docker-Content-Digest")) == (200, amd64)
    assert reply.header("Content-Type") == OCI_MANIFEST
    # the platform manifest came by digest; the tag was asked for once
    assert fake_registry.count("GET", "/manifests/latest") == 1
    assert fake_registry.count("GET", f"/manifests/{amd64}") == 1


@pytest_twisted.ensureDeferred
async def test_a_type_the_client_does_not_take_is_manifest_unknown(fake_registry, make_proxy):
    """As Distribution: an OCI manifest for a client that takes only Docker's."""
    digest, _ = fake_registry.add_image("library/app", "1", [b"x"], "oci")
    proxy = await make_proxy(fake_registry.url)
    reply = await proxy.get("/v2/library/app/manifests/1", Accept=[DOCKER_MANIFEST])
    assert reply.code == 404
    error = json.loads(reply.body)["errors"][0]
    assert error["code"] == "MANIFEST_UNKNOWN"
    assert OCI_MANIFEST in error["message"]
    # and nothing about it was cached wrongly: a client that takes it gets it
    reply = await proxy.get("/v2/library/app/manifests/1", Accept=[OCI_MANIFEST])
    assert (reply.code, reply.header("Docker-Content-Digest")) == (200, digest)


@pytest_twisted.ensureDeferred
async def test_by_digest_the_bytes_of_the_digest_whatever_the_accept(fake_registry, make_proxy):
    index, _, _ = multi_arch(fake_registry)
    proxy = await make_proxy(fake_registry.url)
    reply = await proxy.get(f"/v2/library/nginx/manifests/{index}", Accept=[DOCKER_MANIFEST])
    assert (reply.code, reply.header("Docker-Content-Digest")) == (200, index)
    assert reply.header("Content-Type") == DOCKER_LIST


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("method", ["GET", "HEAD"])
@pytest.mark.parametrize("reference", ["-bad", "a" * 129, "sha256:short", "sha256:" + "Z" * 64])
async def test_a_reference_that_cannot_exist_is_manifest_unknown(
    fake_registry, make_proxy, method, reference
):
    proxy = await make_proxy(fake_registry.url)
    reply = await proxy.request(method, f"/v2/library/app/manifests/{reference}", {})
    assert reply.code == 404
    if method == "GET":
        assert json.loads(reply.body)["errors"][0]["code"] == "MANIFEST_UNKNOWN"
    assert fake_registry.count(None, "/manifests/") == 0


def test_acceptable():
    assert acceptable(OCI_INDEX, [])
    assert acceptable(OCI_INDEX, ["*/*"])
    assert acceptable(OCI_INDEX, ["application/*"])
    assert acceptable(OCI_INDEX, ["application/json"])
    assert not acceptable(OCI_INDEX, [DOCKER_MANIFEST, "application/json"])
    assert acceptable(DOCKER_MANIFEST, DOCKERD_ACCEPT)


def test_upstream_accept_is_every_modern_type_plus_exact_extras():
    artifact = "application/vnd.example.artifact+json"
    assert upstream_accept([DOCKER_MANIFEST]) == list(MODERN)
    assert upstream_accept(["*/*", "application/json", artifact]) == [*MODERN, artifact]


def test_default_platform_picks_linux_amd64():
    body = json.dumps(
        {
            "manifests": [
                {
                    "digest": "sha256:" + "1" * 64,
                    "platform": {"os": "linux", "architecture": "arm64"},
                },
                {
                    "digest": "sha256:" + "2" * 64,
                    "platform": {"os": "windows", "architecture": "amd64"},
                },
                {
                    "digest": "sha256:" + "3" * 64,
                    "platform": {"os": "linux", "architecture": "amd64"},
                },
            ]
        }
    ).encode()
    assert default_platform(body) == "sha256:" + "3" * 64
    assert default_platform(b"not json") is None
    assert default_platform(b'{"manifests": [{"platform": "x"}]}') is None
    # a hostile upstream's list: no traceback, no platform
    for manifests in (b"5", b"true", b'"abc"', b'{"a": 1}'):
        assert default_platform(b'{"manifests": ' + manifests + b"}") is None


def test_tags_of_schema_1_are_forgotten_and_manifests_kept(tmp_path):
    """Schema 1 kept a tag per media type, so poisoned entries may be in it."""
    import sqlite3

    path = str(tmp_path / "index.db")
    Index(path).close()
    db = sqlite3.connect(path)
    db.executescript(
        "DROP TABLE tags; CREATE TABLE tags (upstream TEXT, repo TEXT, tag TEXT,"
        " media_type TEXT, digest TEXT, checked_at REAL,"
        " PRIMARY KEY (upstream, repo, tag, media_type));"
        "INSERT INTO tags VALUES ('docker.io', 'library/a', '1', 'x', 'sha256:aa', 0);"
        "INSERT INTO manifests VALUES ('docker.io', 'library/a', 'sha256:aa', 'x', 1, 0, NULL);"
        "PRAGMA user_version=1;"
    )
    db.commit()
    db.close()
    index = Index(path)
    assert index.tag("docker.io", "library/a", "1") is None
    assert index.manifest("docker.io", "library/a", "sha256:aa") is not None
    index.close()
