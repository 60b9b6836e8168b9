"""The /v2/ proxy against an in-process fake registry: caching, auth, negotiation, errors."""

from __future__ import annotations

import hashlib
import json
import os
from urllib.parse import quote

import pytest_twisted
from fakeregistry import Fault, Override
from proxyharness import ProxyClock, advance_until, settle, until
from twisted.internet.defer import gatherResults

from registryproxy.upstream import client as client_module

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
#: what dockerd sends: one Accept header per type
DOCKERD_ACCEPT = [
    DOCKER_MANIFEST,
    DOCKER_LIST,
    OCI_MANIFEST,
    OCI_INDEX,
    "application/vnd.docker.distribution.manifest.v1+prettyjws",
    "application/json",
]


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def error_code(reply) -> str:
    return json.loads(reply.body)["errors"][0]["code"]


@pytest_twisted.ensureDeferred
async def test_base_endpoint(fake_registry, make_proxy):
    proxy = await make_proxy(fake_registry.url)
    reply = await proxy.get("/v2/")
    assert reply.code == 200
    assert reply.header("Docker-Distribution-API-Version") == "registry/2.0"


@pytest_twisted.ensureDeferred
async def test_manifest_by_tag_miss_then_hit(fake_registry, make_proxy):
    digest, body = fake_registry.add_image("library/alpine", "3.19", [b"layer one"])
    proxy = await make_proxy(fake_registry.url)
    first = await proxy.get("/v2/library/alpine/manifests/3.19", Accept=[DOCKER_MANIFEST])
    second = await proxy.get("/v2/library/alpine/manifests/3.19", Accept=[DOCKER_MANIFEST])
    for reply in (first, second):
        assert reply.code == 200
        assert reply.body == body
        assert reply.header("Docker-Content-Digest") == digest
        assert reply.header("Content-Type") == DOCKER_MANIFEST
        assert reply.header("Content-Length") == str(len(body))
    assert [first.header("X-Cache"), second.header("X-Cache")] == ["MISS", "HIT"]
    assert fake_registry.count("GET", "/manifests/") == 1


@pytest_twisted.ensureDeferred
async def test_official_image_gets_library_prefix(fake_registry, make_proxy):
    digest, _ = fake_registry.add_image("library/nginx", "1", [b"x"])
    proxy = await make_proxy(fake_registry.url)
    reply = await proxy.get("/v2/nginx/manifests/1")
    assert reply.code == 200
    assert reply.header("Docker-Content-Digest") == digest
    assert fake_registry.count("GET", "/v2/library/nginx/manifests/1") == 1


@pytest_twisted.ensureDeferred
async def test_head_manifest_carries_digest_and_no_body(fake_registry, make_proxy):
    digest, body = fake_registry.add_image("library/alpine", "1", [b"x"])
    proxy = await make_proxy(fake_registry.url)
    for _ in range(2):
        reply = await proxy.head("/v2/library/alpine/manifests/1", Accept=DOCKERD_ACCEPT)
        assert reply.code == 200
        assert reply.body == b""
        assert reply.header("Docker-Content-Digest") == digest
        assert reply.header("Content-Length") == str(len(body))
    # the miss fetched the manifest once; the second HEAD was answered locally
    assert fake_registry.count(None, "/manifests/") == 1


@pytest_twisted.ensureDeferred
async def test_separate_accept_lines_are_all_read(fake_registry, make_proxy):
    """dockerd's six Accept lines must reach the upstream as one list, so it
    answers with the index rather than a single-platform conversion."""
    amd64, _ = fake_registry.add_image("library/multi", None, [b"a"], architecture="amd64")
    arm64, _ = fake_registry.add_image("library/multi", None, [b"b"], architecture="arm64")
    index = fake_registry.add_index("library/multi", "1", [amd64, arm64])
    proxy = await make_proxy(fake_registry.url)

    reply = await proxy.get("/v2/library/multi/manifests/1", Accept=DOCKERD_ACCEPT)
    assert reply.header("Docker-Content-Digest") == index
    assert reply.header("Content-Type") == DOCKER_LIST
    sent = fake_registry.requests[-1].header("Accept")
    assert DOCKER_LIST in ", ".join(sent) and DOCKER_MANIFEST in ", ".join(sent)

    # containerd's single comma-separated line: same answer, now from the cache
    reply = await proxy.get("/v2/library/multi/manifests/1", Accept=[", ".join(DOCKERD_ACCEPT)])
    assert (reply.header("Docker-Content-Digest"), reply.header("X-Cache")) == (index, "HIT")

    # a client that takes no index gets the index's linux/amd64 manifest,
    # picked from the cached index, as a registry does
    reply = await proxy.get("/v2/library/multi/manifests/1", Accept=[DOCKER_MANIFEST])
    assert reply.header("Docker-Content-Digest") == amd64
    assert reply.header("Content-Type") == DOCKER_MANIFEST
    assert fake_registry.count("GET", "/manifests/1") == 1


@pytest_twisted.ensureDeferred
async def test_expired_tag_revalidates_with_head(fake_registry, make_proxy):
    old, _ = fake_registry.add_image("library/app", "latest", [b"v1"])
    proxy = await make_proxy(fake_registry.url, cache={"tag_ttl": 0})
    await proxy.get("/v2/library/app/manifests/latest")
    reply = await proxy.get("/v2/library/app/manifests/latest")
    assert (reply.header("Docker-Content-Digest"), reply.header("X-Cache")) == (old, "HIT")
    assert fake_registry.count("HEAD", "/manifests/latest") == 1
    assert fake_registry.count("GET", "/manifests/latest") == 1

    new, body = fake_registry.add_image("library/app", "latest", [b"v2"])
    reply = await proxy.get("/v2/library/app/manifests/latest")
    assert (reply.header("Docker-Content-Digest"), reply.body) == (new, body)
    assert reply.header("X-Cache") == "MISS"
    assert fake_registry.count("GET", "/manifests/latest") == 2


@pytest_twisted.ensureDeferred
async def test_tag_within_ttl_asks_nothing_upstream(fake_registry, make_proxy):
    fake_registry.add_image("library/app", "latest", [b"v1"])
    proxy = await make_proxy(fake_registry.url)
    await proxy.get("/v2/library/app/manifests/latest")
    before = len(fake_registry.requests)
    fake_registry.add_image("library/app", "latest", [b"v2"])
    reply = await proxy.get("/v2/library/app/manifests/latest")
    assert reply.header("X-Cache") == "HIT"
    assert len(fake_registry.requests) == before


@pytest_twisted.ensureDeferred
async def test_manifest_by_digest_never_revalidates(fake_registry, make_proxy):
    digest, body = fake_registry.add_image("library/app", None, [b"v1"])
    proxy = await make_proxy(fake_registry.url, cache={"tag_ttl": 0})
    await proxy.get(f"/v2/library/app/manifests/{digest}")
    before = len(fake_registry.requests)
    reply = await proxy.get(f"/v2/library/app/manifests/{digest}")
    assert (reply.body, reply.header("X-Cache")) == (body, "HIT")
    assert len(fake_registry.requests) == before


@pytest_twisted.ensureDeferred
async def test_manifest_with_wrong_digest_is_refused(fake_registry, make_proxy):
    digest, _ = fake_registry.add_image("library/app", "1", [b"v1"])
    fake_registry.manifest_faults[digest] = Fault.wrong_bytes()
    proxy = await make_proxy(fake_registry.url)
    reply = await proxy.get(f"/v2/library/app/manifests/{digest}")
    assert reply.code == 502
    assert error_code(reply) == "MANIFEST_INVALID"
    del fake_registry.manifest_faults[digest]
    reply = await proxy.get(f"/v2/library/app/manifests/{digest}")
    assert (reply.code, reply.header("X-Cache")) == (200, "MISS")


@pytest_twisted.ensureDeferred
async def test_blob_miss_then_hit_exact_bytes(fake_registry, make_proxy):
    data = os.urandom(3 * 1024 * 1024 + 17)
    digest = fake_registry.add_blob(data)
    proxy = await make_proxy(fake_registry.url)
    first = await proxy.get(f"/v2/library/x/blobs/{digest}")
    second = await proxy.get(f"/v2/library/x/blobs/{digest}")
    assert first.body == second.body == data
    assert [first.header("X-Cache"), second.header("X-Cache")] == ["MISS", "HIT"]
    assert first.header("Docker-Content-Digest") == digest
    assert second.header("Content-Length") == str(len(data))
    assert fake_registry.count("GET", "/blobs/") == 1
    assert proxy.blob_path(digest).read_bytes() == data
    assert os.listdir(proxy.cache_dir / "tmp") == []


@pytest_twisted.ensureDeferred
async def test_gzip_encoded_blob_is_stored_verbatim(fake_registry, make_proxy):
    """A CDN's Content-Encoding: gzip must not make us decode a layer."""
    import gzip

    data = gzip.compress(os.urandom(50_000))
    digest = fake_registry.add_blob(data)
    fake_registry.gzip_encoding_header = True
    proxy = await make_proxy(fake_registry.url)
    reply = await proxy.get(f"/v2/library/x/blobs/{digest}")
    assert reply.code == 200 and reply.body == data
    assert proxy.blob_path(digest).read_bytes() == data


@pytest_twisted.ensureDeferred
async def test_blob_redirect_never_carries_authorization(make_fake_registry, make_proxy):
    registry = await make_fake_registry(auth="bearer")
    data = os.urandom(10_000)
    digest = registry.add_blob(data)
    registry.add_image("library/x", "1", [data])
    registry.redirect_blobs = True
    proxy = await make_proxy(registry.url)
    reply = await proxy.get(f"/v2/library/x/blobs/{digest}")
    assert reply.code == 200 and reply.body == data
    assert registry.count("GET", "", host="cdn") == 1
    assert registry.cdn_rejections == []


@pytest_twisted.ensureDeferred
async def test_expired_token_is_renewed_once(make_fake_registry, make_proxy):
    registry = await make_fake_registry(auth="bearer")
    registry.add_image("library/x", "1", [b"a"])
    registry.add_image("library/x", "2", [b"b"])
    proxy = await make_proxy(registry.url)
    assert (await proxy.get("/v2/library/x/manifests/1")).code == 200
    tokens = registry.count("GET", "/token")
    registry.expire_tokens()
    assert (await proxy.get("/v2/library/x/manifests/2")).code == 200
    assert registry.count("GET", "/token") == tokens + 1


@pytest_twisted.ensureDeferred
async def test_token_is_reused_across_requests(make_fake_registry, make_proxy):
    registry = await make_fake_registry(auth="bearer")
    registry.add_image("library/x", "1", [b"a", b"b", b"c"])
    proxy = await make_proxy(registry.url)
    reply = await proxy.get("/v2/library/x/manifests/1")
    for layer in json.loads(reply.body)["layers"]:
        assert (await proxy.get(f"/v2/library/x/blobs/{layer['digest']}")).code == 200
    assert registry.count("GET", "/token") == 1


@pytest_twisted.ensureDeferred
async def test_basic_auth_upstream_with_credentials(make_fake_registry, make_proxy):
    registry = await make_fake_registry(auth="basic", username="u", password="p")
    digest, body = registry.add_image("private/x", "1", [b"a"])
    proxy = await make_proxy(registry.url, username="u", password="p", share_private=True)
    reply = await proxy.get("/v2/private/x/manifests/1")
    assert (reply.code, reply.body) == (200, body)


@pytest_twisted.ensureDeferred
async def test_invalid_names_and_digests(fake_registry, make_proxy):
    proxy = await make_proxy(fake_registry.url)
    for path, code in [
        ("/v2/UPPER/manifests/1", "NAME_INVALID"),
        ("/v2/a/../../etc/manifests/1", "NAME_INVALID"),
        ("/v2/a/%2e%2e/b/manifests/1", "NAME_INVALID"),
        ("/v2/a//b/manifests/1", "NAME_INVALID"),
        ("/v2/library/x/blobs/sha256:abc", "DIGEST_INVALID"),
        ("/v2/library/x/blobs/md5:" + "0" * 32, "DIGEST_INVALID"),
        ("/v2/library/x/blobs/..", "DIGEST_INVALID"),
    ]:
        reply = await proxy.get(path)
        assert reply.code == 400, path
        assert error_code(reply) == code, path
    assert fake_registry.requests == []


@pytest_twisted.ensureDeferred
async def test_push_and_delete_are_unsupported(fake_registry, make_proxy):
    proxy = await make_proxy(fake_registry.url)
    for method, path in [
        ("POST", "/v2/library/x/blobs/uploads/"),
        ("PATCH", "/v2/library/x/blobs/uploads/abc"),
        ("PUT", "/v2/library/x/manifests/1"),
        ("DELETE", "/v2/library/x/manifests/1"),
        ("DELETE", "/v2/library/x/blobs/sha256:" + "0" * 64),
    ]:
        reply = await proxy.request(method, path)
        assert reply.code == 405, (method, path)
        assert error_code(reply) == "UNSUPPORTED"
    reply = await proxy.get("/v2/library/x/blobs/uploads/abc")
    assert (reply.code, error_code(reply)) == (405, "UNSUPPORTED")


@pytest_twisted.ensureDeferred
async def test_upstream_not_found_keeps_its_code(fake_registry, make_proxy):
    fake_registry.add_image("library/something", "1", [b"a"])
    proxy = await make_proxy(fake_registry.url)
    reply = await proxy.get("/v2/library/nothing/manifests/1")
    assert (reply.code, error_code(reply)) == (404, "NAME_UNKNOWN")
    reply = await proxy.get("/v2/library/something/manifests/2")
    assert (reply.code, error_code(reply)) == (404, "MANIFEST_UNKNOWN")
    reply = await proxy.get("/v2/library/nothing/blobs/sha256:" + "0" * 64)
    assert (reply.code, error_code(reply)) == (404, "BLOB_UNKNOWN")


@pytest_twisted.ensureDeferred
async def test_rate_limit_passes_retry_after(fake_registry, make_proxy):
    fake_registry.add_image("library/x", "1", [b"a"])
    fake_registry.status_override["/manifests/"] = Override(429, {"Retry-After": "42"})
    proxy = await make_proxy(fake_registry.url)
    reply = await proxy.get("/v2/library/x/manifests/1")
    assert (reply.code, error_code(reply)) == (429, "TOOMANYREQUESTS")
    assert reply.header("Retry-After") == "42"


@pytest_twisted.ensureDeferred
async def test_upstream_unreachable_names_upstream(make_proxy):
    proxy = await make_proxy("http://127.0.0.1:9")
    reply = await proxy.get("/v2/library/x/manifests/1")
    assert reply.code == 502
    assert "docker.io" in json.loads(reply.body)["errors"][0]["message"]


@pytest_twisted.ensureDeferred
async def test_upstream_silence_is_a_504(fake_registry, make_proxy):
    digest, _ = fake_registry.add_image("library/x", "1", [b"a"])
    fake_registry.status_override["/manifests/"] = Override(500)
    proxy = await make_proxy(fake_registry.url)
    reply = await proxy.get("/v2/library/x/manifests/1")
    assert (reply.code, error_code(reply)) == (502, "UNAVAILABLE")


@pytest_twisted.ensureDeferred
async def test_head_on_uncached_blob_does_not_download(fake_registry, make_proxy):
    data = os.urandom(1000)
    digest = fake_registry.add_blob(data)
    proxy = await make_proxy(fake_registry.url)
    reply = await proxy.head(f"/v2/library/x/blobs/{digest}")
    assert reply.code == 200
    assert reply.header("Content-Length") == "1000"
    assert reply.header("X-Cache") == "MISS"
    assert fake_registry.count("GET", "/blobs/") == 0
    assert fake_registry.count("HEAD", "/blobs/") == 1
    assert not proxy.blob_path(digest).exists()


@pytest_twisted.ensureDeferred
async def test_ranges_on_cached_blob(fake_registry, make_proxy):
    data = os.urandom(1000)
    digest = fake_registry.add_blob(data)
    proxy = await make_proxy(fake_registry.url)
    path = f"/v2/library/x/blobs/{digest}"
    await proxy.get(path)
    for header, start, end in [
        ("bytes=0-99", 0, 100),
        ("bytes=900-", 900, 1000),
        ("bytes=-10", 990, 1000),
        ("bytes=990-5000", 990, 1000),
    ]:
        reply = await proxy.get(path, Range=[header])
        assert reply.code == 206, header
        assert reply.body == data[start:end], header
        assert reply.header("Content-Range") == f"bytes {start}-{end - 1}/1000"
        assert reply.header("X-Cache") == "HIT"
    for header in ["bytes=1000-", "bytes=5-2", "bytes=0-1,5-6", "items=0-1", "bytes=abc"]:
        reply = await proxy.get(path, Range=[header])
        assert reply.code == 416, header
        assert reply.header("Content-Range") == "bytes */1000"
        assert error_code(reply) == "RANGE_INVALID"


@pytest_twisted.ensureDeferred
async def test_tags_list_passes_through(fake_registry, make_proxy):
    for tag in ["a", "b", "c"]:
        fake_registry.add_image("library/x", tag, [tag.encode()])
    proxy = await make_proxy(fake_registry.url)
    reply = await proxy.get("/v2/x/tags/list?n=2")
    assert reply.code == 200
    assert json.loads(reply.body)["tags"] == ["a", "b"]
    assert "last=b" in (reply.header("Link") or "")
    reply = await proxy.get("/v2/x/tags/list?n=2&last=b")
    assert json.loads(reply.body)["tags"] == ["c"]


@pytest_twisted.ensureDeferred
async def test_clients_asking_for_one_listing_at_once_share_its_fetch(
    make_fake_registry, make_proxy
):
    """A listing may run to 32 MiB: clients asking for the same one at
    once share one upstream fetch (and its body in memory)."""
    clock = ProxyClock()
    fake_registry = await make_fake_registry(clock=clock)
    fake_registry.add_image("library/x", "a", [b"a"])
    fake_registry.tags_delay = 0.3
    proxy = await make_proxy(fake_registry.url, clock=clock)
    asked = gatherResults([proxy.get("/v2/x/tags/list") for _ in range(5)])
    await until(lambda: fake_registry.count("GET", "/tags/list") == 1)
    await settle(0.02)  # and any other fetch would be asked for by now
    clock.advance(0.3)
    replies = await asked
    assert [json.loads(reply.body)["tags"] for reply in replies] == [["a"]] * 5
    assert fake_registry.count("GET", "/tags/list") == 1
    # and one asked for after gets its own
    again = proxy.get("/v2/x/tags/list")
    await advance_until(clock, 0.1, lambda: again.called)
    assert (await again).code == 200
    assert fake_registry.count("GET", "/tags/list") == 2


@pytest_twisted.ensureDeferred
async def test_listings_fetched_at_once_are_bounded(make_fake_registry, make_proxy, monkeypatch):
    """Different listings at once take a slot each (each may hold 32 MiB):
    with two slots, the third waits for one."""
    monkeypatch.setattr(client_module, "LISTINGS_AT_ONCE", 2)
    clock = ProxyClock()
    fake_registry = await make_fake_registry(clock=clock)
    for name in ("a", "b", "c"):
        fake_registry.add_image(f"library/{name}", "1", [name.encode()])
    fake_registry.tags_delay = 0.3
    proxy = await make_proxy(fake_registry.url, clock=clock)
    asked = gatherResults([proxy.get(f"/v2/{n}/tags/list") for n in ("a", "b", "c")])
    await until(lambda: fake_registry.count("GET", "/tags/list") == 2)
    await settle(0.02)
    assert fake_registry.count("GET", "/tags/list") == 2  # the third waits for a slot
    clock.advance(0.3)  # two answered: the third is asked for
    await until(lambda: fake_registry.count("GET", "/tags/list") == 3)
    assert not asked.called
    clock.advance(0.3)
    replies = await asked
    assert [reply.code for reply in replies] == [200] * 3


@pytest_twisted.ensureDeferred
async def test_a_listing_that_waits_past_the_deadline_for_a_slot_answers_503(
    make_fake_registry, make_proxy, monkeypatch
):
    """One slot, three listings of 0.4 s each, a deadline of 0.7 s: the
    third waits for two fetches (0.8 s at least) and is told to try again."""
    monkeypatch.setattr(client_module, "LISTINGS_AT_ONCE", 1)
    clock = ProxyClock()
    fake_registry = await make_fake_registry(clock=clock)
    for name in ("a", "b", "c"):
        fake_registry.add_image(f"library/{name}", "1", [name.encode()])
    fake_registry.tags_delay = 0.4
    proxy = await make_proxy(fake_registry.url, deadline=0.7, read_timeout=5, clock=clock)
    asked = gatherResults([proxy.get(f"/v2/{n}/tags/list") for n in ("a", "b", "c")])
    await advance_until(clock, 0.1, lambda: asked.called)
    replies = await asked
    assert sorted(reply.code for reply in replies) == [200, 200, 503]
    (refused,) = [reply for reply in replies if reply.code == 503]
    assert json.loads(refused.body)["errors"][0]["code"] == "UNAVAILABLE"
    assert fake_registry.count("GET", "/tags/list") == 2


SIGNATURE = "application/vnd.dev.cosign.artifact.sig.v1+json"
SBOM = "application/spdx+json"


def referrer(subject: str, subject_body: bytes, artifact_type: str) -> bytes:
    """An OCI 1.1 artifact manifest about *subject* (a signature, an SBOM)."""
    return json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "artifactType": artifact_type,
            "config": {
                "mediaType": "application/vnd.oci.empty.v1+json",
                "digest": sha(b"{}"),
                "size": 2,
            },
            "layers": [],
            "subject": {"mediaType": OCI_MANIFEST, "digest": subject, "size": len(subject_body)},
            "annotations": {"kind": artifact_type},
        }
    ).encode()


@pytest_twisted.ensureDeferred
async def test_referrers_pass_through(fake_registry, make_proxy):
    digest, body = fake_registry.add_image("library/app", "1", [b"app"], media="oci")
    signature = fake_registry.add_manifest(
        "library/app", referrer(digest, body, SIGNATURE), OCI_MANIFEST
    )
    sbom = fake_registry.add_manifest("library/app", referrer(digest, body, SBOM), OCI_MANIFEST)
    proxy = await make_proxy(fake_registry.url)

    reply = await proxy.get(f"/v2/app/referrers/{digest}")
    assert reply.code == 200
    assert reply.header("Content-Type") == OCI_INDEX
    index = json.loads(reply.body)
    assert {(m["digest"], m["artifactType"]) for m in index["manifests"]} == {
        (signature, SIGNATURE),
        (sbom, SBOM),
    }
    assert reply.header("OCI-Filters-Applied") is None

    reply = await proxy.get(f"/v2/app/referrers/{digest}?artifactType={quote(SBOM, safe='')}")
    assert [m["digest"] for m in json.loads(reply.body)["manifests"]] == [sbom]
    assert reply.header("OCI-Filters-Applied") == "artifactType"
    assert fake_registry.count("GET", f"/v2/library/app/referrers/{digest}") == 2

    # the referrer itself is a manifest like any other, cached by digest
    for cache in ("MISS", "HIT"):
        reply = await proxy.get(f"/v2/app/manifests/{signature}", Accept=[OCI_MANIFEST])
        assert (reply.code, reply.header("X-Cache")) == (200, cache)


@pytest_twisted.ensureDeferred
async def test_referrers_of_a_registry_without_the_api_are_404(make_fake_registry, make_proxy):
    # 404 (not 502 or 500) is what tells clients to look for the sha256-<hex> tag instead
    registry = await make_fake_registry()
    registry.referrers_api = False
    digest, _ = registry.add_image("library/app", "1", [b"app"], media="oci")
    proxy = await make_proxy(registry.url)
    reply = await proxy.get(f"/v2/app/referrers/{digest}")
    assert reply.code == 404
    reply = await proxy.get("/v2/app/referrers/sha256:nothex")
    assert (reply.code, error_code(reply)) == (400, "DIGEST_INVALID")


@pytest_twisted.ensureDeferred
async def test_listings_are_json_whatever_the_upstream_sends(fake_registry, make_proxy):
    proxy = await make_proxy(fake_registry.url)
    page = b"<html><script>alert(1)</script></html>"
    fake_registry.status_override["/tags/list"] = (200, {"Content-Type": "text/html"}, page)
    reply = await proxy.get("/v2/x/tags/list")
    assert (reply.code, error_code(reply)) == (502, "UNAVAILABLE")
    assert reply.body != page

    links = (
        '<https://elsewhere.example/v2/library/x/tags/list?n=1>; rel="prev", '
        '</v2/library/x/tags/list?n=1&last=a&ns=evil.example.com>; rel="next"'
    )
    headers = {"Content-Type": "text/html", "Link": links, "OCI-Filters-Applied": "€"}
    fake_registry.status_override["/tags/list"] = (200, headers, b'{"tags": ["a"]}')
    reply = await proxy.get("/v2/x/tags/list?n=1")
    assert reply.code == 200
    assert reply.header("Content-Type") == "application/json"
    assert reply.header("X-Content-Type-Options") == "nosniff"
    assert reply.header("OCI-Filters-Applied") is None
    # the next page, through regproxy, by the client's name, without the upstream's ns=
    assert reply.header("Link") == '</v2/x/tags/list?n=1&last=a>; rel="next"'


@pytest_twisted.ensureDeferred
async def test_listing_queries_are_checked(fake_registry, make_proxy):
    digest, _ = fake_registry.add_image("library/app", "1", [b"app"], media="oci")
    proxy = await make_proxy(fake_registry.url)
    for path in (
        "/v2/app/tags/list?n=%C2%B2",  # a superscript two is no number
        "/v2/app/tags/list?n=1234567890123",
        f"/v2/app/referrers/{digest}?artifactType=not-a-type",
        f"/v2/app/referrers/{digest}?artifactType=%FF/x",
    ):
        reply = await proxy.get(path)
        assert reply.code == 400, path
    assert fake_registry.count("GET", "/tags/list") == 0
    assert fake_registry.count("GET", "/referrers/") == 0


@pytest_twisted.ensureDeferred
async def test_unknown_route_is_json_404(fake_registry, make_proxy):
    proxy = await make_proxy(fake_registry.url)
    for path in ["/", "/v1/", "/v2/x/other/thing"]:
        reply = await proxy.get(path)
        assert reply.code == 404
        assert json.loads(reply.body)["errors"]


@pytest_twisted.ensureDeferred
async def test_stale_tag_is_served_while_the_upstream_fails(fake_registry, make_proxy):
    digest, body = fake_registry.add_image("library/app", "1", [b"v1"])
    proxy = await make_proxy(fake_registry.url, cache={"tag_ttl": 0})
    assert (await proxy.get("/v2/app/manifests/1")).header("X-Cache") == "MISS"
    for status in (500, 503, 429):
        fake_registry.status_override["/manifests/"] = Override(status)
        reply = await proxy.get("/v2/app/manifests/1")
        assert (reply.code, reply.body, reply.header("X-Cache")) == (200, body, "STALE"), status
        assert reply.header("Docker-Content-Digest") == digest
    # the tag moved upstream (HEAD says so) but the new manifest cannot be fetched
    fake_registry.status_override.clear()
    fake_registry.add_image("library/app", "1", [b"v2"])
    fake_registry.manifest_faults["*"] = Fault.truncate(5)
    reply = await proxy.get("/v2/app/manifests/1")
    assert (reply.body, reply.header("X-Cache")) == (body, "STALE")
    # a real answer (404: the tag is gone) is passed on, not papered over
    fake_registry.manifest_faults.clear()
    fake_registry.untag("library/app", "1")
    assert (await proxy.get("/v2/app/manifests/1")).code == 404


@pytest_twisted.ensureDeferred
async def test_stale_serving_has_a_limit_when_configured(make_proxy, fake_registry):
    fake_registry.add_image("library/app", "1", [b"v1"])
    proxy = await make_proxy(fake_registry.url, cache={"tag_ttl": 0, "max_stale": 0})
    await proxy.get("/v2/app/manifests/1")
    fake_registry.status_override["/manifests/"] = Override(503)
    reply = await proxy.get("/v2/app/manifests/1")
    assert reply.code == 502


@pytest_twisted.ensureDeferred
async def test_stale_when_the_upstream_is_gone(fake_registry, make_proxy):
    _, body = fake_registry.add_image("library/app", "1", [b"v1"])
    proxy = await make_proxy(fake_registry.url, cache={"tag_ttl": 0})
    await proxy.get("/v2/app/manifests/1")
    layer = json.loads(body)["layers"][0]["digest"]
    await proxy.get(f"/v2/app/blobs/{layer}")
    await fake_registry.stop()
    reply = await proxy.get("/v2/app/manifests/1")
    assert (reply.code, reply.header("X-Cache")) == (200, "STALE")
    reply = await proxy.get(f"/v2/app/blobs/{layer}")
    assert (reply.code, reply.header("X-Cache"), reply.body) == (200, "HIT", b"v1")


@pytest_twisted.ensureDeferred
async def test_basic_auth_upstream_without_credentials_is_a_clear_401(
    make_fake_registry, make_proxy
):
    registry = await make_fake_registry(auth="basic", username="u", password="p")
    registry.add_image("private/x", "1", [b"a"])
    proxy = await make_proxy(registry.url)
    reply = await proxy.get("/v2/private/x/manifests/1")
    assert (reply.code, error_code(reply)) == (401, "UNAUTHORIZED")
    assert "username and a password" in json.loads(reply.body)["errors"][0]["message"]


@pytest_twisted.ensureDeferred
async def test_cache_hits_go_out_with_sendfile(fake_registry, make_proxy, monkeypatch):
    data = os.urandom(12 * 1024 * 1024 + 5)
    digest = fake_registry.add_blob(data)
    proxy = await make_proxy(fake_registry.url)
    path = f"/v2/library/x/blobs/{digest}"
    await proxy.get(path)
    sent = []
    real = os.sendfile

    def counting(out_fd, in_fd, offset, count):
        n = real(out_fd, in_fd, offset, count)
        sent.append(n)
        return n

    monkeypatch.setattr(os, "sendfile", counting)
    reply = await proxy.socket_get(path)
    assert (reply.code, reply.header("X-Cache"), reply.body) == (200, "HIT", data)
    assert sum(sent) == len(data)
    sent.clear()
    reply = await proxy.socket_get(path, Range=["bytes=1000-2000999"])
    assert (reply.code, reply.body) == (206, data[1000:2001000])
    assert sum(sent) == 2_000_000
    stats = await proxy.proxy.control.stats()
    assert stats["bytes_from_cache"] == len(data) + 2_000_000


@pytest_twisted.ensureDeferred
async def test_sendfile_can_be_turned_off(fake_registry, make_proxy, monkeypatch):
    data = os.urandom(100_000)
    digest = fake_registry.add_blob(data)
    proxy = await make_proxy(fake_registry.url, top={"proxy": {"sendfile": False}})
    await proxy.get(f"/v2/library/x/blobs/{digest}")

    def refuse(*args):
        raise AssertionError("sendfile used although turned off")

    monkeypatch.setattr(os, "sendfile", refuse)
    reply = await proxy.socket_get(f"/v2/library/x/blobs/{digest}")
    assert (reply.code, reply.body) == (200, data)


@pytest_twisted.ensureDeferred
async def test_bad_tag_list_page_size_is_a_400(fake_registry, make_proxy):
    proxy = await make_proxy(fake_registry.url)
    for query in ("n=%ff", "n=lots", "n=-1"):
        reply = await proxy.get(f"/v2/x/tags/list?{query}")
        assert (reply.code, error_code(reply)) == (400, "PAGINATION_NUMBER_INVALID"), query


@pytest_twisted.ensureDeferred
async def test_a_non_manifest_body_is_not_cached_as_a_manifest(fake_registry, make_proxy):
    fake_registry.add_manifest("library/x", b"<html>not a manifest</html>", DOCKER_MANIFEST, ["1"])
    # JSON nested deeper than Python parses (RecursionError, not ValueError)
    fake_registry.add_manifest("library/x", b"[" * 200_000, DOCKER_MANIFEST, ["deep"])
    proxy = await make_proxy(fake_registry.url)
    for tag in ("1", "deep"):
        reply = await proxy.get(f"/v2/x/manifests/{tag}")
        assert (reply.code, error_code(reply)) == (502, "MANIFEST_INVALID"), tag
