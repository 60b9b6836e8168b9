"""One proxy, many registries: how a request picks its upstream, and what stays apart."""

from __future__ import annotations

import json
import os

import pytest_twisted
from fakeregistry import Fault
from proxyharness import partial_get, until
from twisted.internet.threads import deferToThread

from registryproxy.upstream import registry as registry_module


def code(reply) -> str:
    return json.loads(reply.body)["errors"][0]["code"]


async def two_registries(make_fake_registry, make_proxy, **kwargs):
    hub = await make_fake_registry()
    ghcr = await make_fake_registry()
    proxy = await make_proxy(
        hub.url,
        upstreams={"ghcr.io": {"url": ghcr.url, "aliases": ["ghcr.proxy.test"]}},
        **kwargs,
    )
    return hub, ghcr, proxy


@pytest_twisted.ensureDeferred
async def test_each_way_of_naming_the_registry(make_fake_registry, make_proxy):
    hub, ghcr, proxy = await two_registries(make_fake_registry, make_proxy)
    on_ghcr, _ = ghcr.add_image("owner/image", "1", [b"ghcr layer"])
    on_hub, _ = hub.add_image("owner/image", "1", [b"hub layer"])
    official, _ = hub.add_image("library/nginx", "1", [b"nginx"])

    cases = [
        ("/v2/ghcr.io/owner/image/manifests/1", {}, on_ghcr),  # path prefix
        ("/v2/owner/image/manifests/1?ns=ghcr.io", {}, on_ghcr),  # containerd's ns=
        ("/v2/owner/image/manifests/1", {"Host": ["ghcr.proxy.test:5000"]}, on_ghcr),  # vhost
        ("/v2/owner/image/manifests/1", {}, on_hub),  # default upstream
        ("/v2/docker.io/owner/image/manifests/1", {}, on_hub),
        ("/v2/owner/image/manifests/1?ns=docker.io", {}, on_hub),
        ("/v2/nginx/manifests/1?ns=docker.io", {}, official),  # library/ rule
        ("/v2/docker.io/nginx/manifests/1", {}, official),
        ("/v2/index.docker.io/library/nginx/manifests/1", {}, official),  # an alias
    ]
    for path, headers, digest in cases:
        reply = await proxy.request("GET", path, headers)
        assert reply.code == 200, (path, reply.body)
        assert reply.header("Docker-Content-Digest") == digest, path
    assert ghcr.count("GET", "/v2/owner/image/manifests/1") == 1
    assert hub.count("GET", "/v2/owner/image/manifests/1") == 1
    assert hub.count("GET", "/v2/library/nginx/manifests/1") == 1


@pytest_twisted.ensureDeferred
async def test_unknown_registry_is_not_proxied(make_fake_registry, make_proxy):
    hub, ghcr, proxy = await two_registries(make_fake_registry, make_proxy)
    for path in [
        "/v2/unknown.example/x/manifests/1",
        "/v2/x/manifests/1?ns=unknown.example",
        "/v2/127.0.0.1:22/x/manifests/1",
        "/v2/localhost/x/blobs/sha256:" + "0" * 64,
    ]:
        reply = await proxy.get(path)
        assert (reply.code, code(reply)) == (404, "NAME_UNKNOWN"), path
        assert "not served by this regproxy" in reply.body.decode()
    assert hub.requests == [] and ghcr.requests == []


@pytest_twisted.ensureDeferred
async def test_any_registry_still_refuses_internal_hosts(make_fake_registry, make_proxy):
    hub, ghcr, proxy = await two_registries(
        make_fake_registry, make_proxy, top={"allow_any_registry": True}
    )
    for host in ["127.0.0.1:22", "localhost", "10.0.0.1", "intranet:5000"]:
        reply = await proxy.get(f"/v2/{host}/x/manifests/1")
        assert (reply.code, code(reply)) == (404, "NAME_UNKNOWN"), host


@pytest_twisted.ensureDeferred
async def test_same_name_on_two_registries_never_mixes(make_fake_registry, make_proxy):
    hub, ghcr, proxy = await two_registries(make_fake_registry, make_proxy)
    on_hub, hub_body = hub.add_image("team/app", "latest", [b"from hub"])
    on_ghcr, ghcr_body = ghcr.add_image("team/app", "latest", [b"from ghcr"])
    for _ in range(2):
        a = await proxy.get("/v2/team/app/manifests/latest")
        b = await proxy.get("/v2/ghcr.io/team/app/manifests/latest")
        assert (a.body, b.body) == (hub_body, ghcr_body)
    assert (a.header("X-Cache"), b.header("X-Cache")) == ("HIT", "HIT")
    # by digest too: ghcr's manifest is not served under docker.io's name
    reply = await proxy.get(f"/v2/team/app/manifests/{on_ghcr}")
    assert reply.code == 404


@pytest_twisted.ensureDeferred
async def test_cached_blob_is_served_only_to_repositories_allowed_it(
    make_fake_registry, make_proxy
):
    hub, ghcr, proxy = await two_registries(make_fake_registry, make_proxy)
    _, body = ghcr.add_image("owner/private", "1", [b"secret layer bytes"])
    layer = json.loads(body)["layers"][0]["digest"]
    reply = await proxy.get("/v2/ghcr.io/owner/private/manifests/1")
    assert reply.code == 200
    reply = await proxy.get(f"/v2/ghcr.io/owner/private/blobs/{layer}")
    assert (reply.code, reply.header("X-Cache")) == (200, "MISS")

    # cached now, but docker.io never sent these bytes: it must send them
    # itself (a HEAD's word is not enough), and it has none
    reply = await proxy.get(f"/v2/someone/else/blobs/{layer}")
    assert reply.code == 404
    assert reply.body != b"secret layer bytes"
    assert hub.count("GET", f"/v2/someone/else/blobs/{layer}") == 1
    reply = await proxy.head(f"/v2/someone/else/blobs/{layer}")
    assert reply.code == 404

    # the repository that listed it gets it from the cache without asking upstream
    before = len(ghcr.requests)
    reply = await proxy.get(f"/v2/ghcr.io/owner/private/blobs/{layer}")
    assert (reply.code, reply.header("X-Cache"), reply.body) == (200, "HIT", b"secret layer bytes")
    assert len(ghcr.requests) == before


@pytest_twisted.ensureDeferred
async def test_a_manifest_listing_another_upstreams_layer_reads_nothing_cached(
    make_fake_registry, make_proxy
):
    """docker.io serves a manifest that lists ghcr.io's private layer (and
    answers 200 to every blob request): listing a digest proves nothing,
    so the cached copy is not read through docker.io."""
    hub, ghcr, proxy = await two_registries(make_fake_registry, make_proxy)
    secret = b"secret layer bytes" * 1000
    _, body = ghcr.add_image("owner/private", "1", [secret])
    layer = json.loads(body)["layers"][0]["digest"]
    for path in ("manifests/1", f"blobs/{layer}"):
        assert (await proxy.get(f"/v2/ghcr.io/owner/private/{path}")).code == 200

    hub.add_image("evil/lure", "1", [secret])
    hub.remove_blob(layer)
    assert (await proxy.get("/v2/evil/lure/manifests/1")).code == 200
    reply = await proxy.get(f"/v2/evil/lure/blobs/{layer}")
    assert (reply.code, code(reply)) == (404, "BLOB_UNKNOWN")
    assert hub.count("GET", f"/v2/evil/lure/blobs/{layer}") == 1

    hub.status_override["/blobs/"] = (200, {"Content-Type": "application/octet-stream"}, b"no")
    for repo in ("evil/lure", "evil/other"):
        status, got, short = await deferToThread(
            partial_get, proxy.url, f"/v2/{repo}/blobs/{layer}"
        )
        assert (b"secret" in got, short) == (False, True)
    reply = await proxy.head(f"/v2/evil/lure/blobs/{layer}")
    assert reply.header("X-Cache") != "HIT"
    # ghcr.io's own clients still read it from the cache
    reply = await proxy.get(f"/v2/ghcr.io/owner/private/blobs/{layer}")
    assert (reply.code, reply.header("X-Cache"), reply.body) == (200, "HIT", secret)


@pytest_twisted.ensureDeferred
async def test_an_upstream_that_says_yes_to_anything_reads_nothing_cached(
    make_fake_registry, make_proxy
):
    """docker.io answers 200 to every blob request (hostile, or any registry
    a client names): what ghcr.io sent is not served through it, neither
    stored nor while ghcr.io's download runs."""
    hub, ghcr, proxy = await two_registries(make_fake_registry, make_proxy)
    secret = b"secret layer bytes" * 1000
    stored = ghcr.add_blob(secret)
    running = ghcr.add_blob(secret + b" too")
    hub.status_override["/blobs/"] = (200, {"Content-Type": "application/octet-stream"}, b"no")
    reply = await proxy.get(f"/v2/ghcr.io/owner/private/blobs/{stored}")
    assert (reply.code, reply.body) == (200, secret)

    # its 2 bytes are not the digest's: the client is cut off, and the
    # repository is not linked to the digest (the next ask is cut off too)
    for _ in range(2):
        status, body, short = await deferToThread(
            partial_get, proxy.url, f"/v2/someone/else/blobs/{stored}"
        )
        assert (b"secret" in body, short) == (False, True)
    # the cached copy stays whole, and ghcr.io's clients still get it
    reply = await proxy.get(f"/v2/ghcr.io/owner/private/blobs/{stored}")
    assert (reply.code, reply.header("X-Cache"), reply.body) == (200, "HIT", secret)

    ghcr.blob_faults[running] = Fault.slow(chunk=4096, delay=0.02)
    from_ghcr = proxy.get(f"/v2/ghcr.io/owner/private/blobs/{running}")
    await until(lambda: ghcr.count("GET", running) == 1)
    status, body, short = await deferToThread(
        partial_get, proxy.url, f"/v2/someone/else/blobs/{running}"
    )
    assert (b"secret" in body, short) == (False, True)
    assert (await from_ghcr).body == secret + b" too"


@pytest_twisted.ensureDeferred
async def test_shared_layer_is_confirmed_once_then_served_from_cache(
    make_fake_registry, make_proxy
):
    hub, ghcr, proxy = await two_registries(make_fake_registry, make_proxy)
    shared = hub.add_blob(b"base layer")
    reply = await proxy.get(f"/v2/library/one/blobs/{shared}")
    assert reply.header("X-Cache") == "MISS"
    for _ in range(2):
        reply = await proxy.get(f"/v2/library/two/blobs/{shared}")
        assert (reply.code, reply.header("X-Cache")) == (200, "HIT")
    assert hub.count("GET", "/blobs/") == 1
    assert hub.count("HEAD", f"/v2/library/two/blobs/{shared}") == 1


@pytest_twisted.ensureDeferred
async def test_fallback_serves_while_the_upstream_is_down(make_fake_registry, make_proxy):
    mirror = await make_fake_registry()
    digest, body = mirror.add_image("library/app", "1", [b"from the mirror"])
    proxy = await make_proxy(
        "http://127.0.0.1:9",
        fallbacks=["mirror.internal"],
        upstreams={"mirror.internal": {"url": mirror.url}},
    )
    reply = await proxy.get("/v2/app/manifests/1")
    assert (reply.code, reply.body) == (200, body)
    layer = json.loads(body)["layers"][0]["digest"]
    reply = await proxy.get(f"/v2/app/blobs/{layer}")
    assert (reply.code, reply.body) == (200, b"from the mirror")


@pytest_twisted.ensureDeferred
async def test_fallback_on_rate_limit_but_not_on_not_found(make_fake_registry, make_proxy):
    from fakeregistry import Override

    hub = await make_fake_registry()
    mirror = await make_fake_registry()
    mirror.add_image("library/app", "1", [b"m"])
    hub.status_override["/manifests/1"] = Override(429, {"Retry-After": "60"})
    proxy = await make_proxy(
        hub.url, fallbacks=["mirror.internal"], upstreams={"mirror.internal": {"url": mirror.url}}
    )
    assert (await proxy.get("/v2/app/manifests/1")).code == 200
    reply = await proxy.get("/v2/app/manifests/2")  # a real 404 upstream: no fallback
    assert reply.code == 404
    assert mirror.count("GET", "/manifests/2") == 0


@pytest_twisted.ensureDeferred
async def test_credentials_from_environment_and_file(
    make_fake_registry, make_proxy, tmp_path, monkeypatch
):
    by_env = await make_fake_registry(auth="basic", username="envuser", password="envpass")
    by_file = await make_fake_registry(auth="basic", username="fileuser", password="filepass")
    by_env.add_image("team/app", "1", [b"a"])
    by_file.add_image("team/app", "1", [b"b"])
    monkeypatch.setenv("REGPROXY_TEST_PASSWORD", "envpass")
    secret = tmp_path / "password"
    secret.write_text("filepass\n")
    proxy = await make_proxy(
        by_env.url,
        username="envuser",
        password_env="REGPROXY_TEST_PASSWORD",
        share_private=True,
        upstreams={
            "files.example": {
                "url": by_file.url,
                "username": "fileuser",
                "password_file": str(secret),
                "share_private": True,
            }
        },
    )
    assert (await proxy.get("/v2/team/app/manifests/1")).code == 200
    assert (await proxy.get("/v2/files.example/team/app/manifests/1")).code == 200


@pytest_twisted.ensureDeferred
async def test_tag_ttl_per_upstream(make_fake_registry, make_proxy):
    hub = await make_fake_registry()
    ghcr = await make_fake_registry()
    hub.add_image("team/app", "1", [b"a"])
    ghcr.add_image("team/app", "1", [b"b"])
    proxy = await make_proxy(
        hub.url, cache={"tag_ttl": 3600}, upstreams={"ghcr.io": {"url": ghcr.url, "tag_ttl": 0}}
    )
    for _ in range(3):
        await proxy.get("/v2/team/app/manifests/1")
        await proxy.get("/v2/ghcr.io/team/app/manifests/1")
    assert hub.count("HEAD", "/manifests/") == 0
    assert ghcr.count("HEAD", "/manifests/") == 2


@pytest_twisted.ensureDeferred
async def test_tag_list_pages_lead_back_the_way_the_client_came(make_fake_registry, make_proxy):
    hub, ghcr, proxy = await two_registries(make_fake_registry, make_proxy)
    for tag in ("a", "b", "c"):
        ghcr.add_image("owner/app", tag, [tag.encode()])
        hub.add_image("library/app", tag, [tag.encode()])
    for first, expected in [
        ("/v2/ghcr.io/owner/app/tags/list?n=2", "</v2/ghcr.io/owner/app/tags/list?n=2&last=b>"),
        (
            "/v2/owner/app/tags/list?n=2&ns=ghcr.io",
            "</v2/owner/app/tags/list?n=2&last=b&ns=ghcr.io>",
        ),
        ("/v2/app/tags/list?n=2", "</v2/app/tags/list?n=2&last=b>"),  # no library/ added
    ]:
        reply = await proxy.get(first)
        assert json.loads(reply.body)["tags"] == ["a", "b"], first
        link = reply.header("Link")
        assert link == expected + '; rel="next"', first
        reply = await proxy.get(link[1 : link.index(">")])
        assert (reply.code, json.loads(reply.body)["tags"]) == (200, ["c"]), first


@pytest_twisted.ensureDeferred
async def test_registries_clients_name_share_one_metrics_label(make_fake_registry, make_proxy):
    """An open proxy counts its made-up registries under "other": one label
    set, not one per host a client names, kept for good."""
    hub, ghcr, proxy = await two_registries(
        make_fake_registry, make_proxy, top={"allow_any_registry": True}
    )
    for n in range(3):
        reply = await proxy.get(f"/v2/h{n}.example.invalid/x/manifests/1")
        assert reply.code >= 400
    assert (await proxy.get("/v2/ghcr.io/team/app/manifests/1")).code == 404
    counted = proxy.proxy.metrics.summary()["upstream_requests"]
    assert set(counted) == {"ghcr.io", "other"}, counted
    assert sum(counted["other"].values()) >= 3


@pytest_twisted.ensureDeferred
async def test_named_registries_look_up_names_on_threads_of_their_own(
    make_fake_registry, make_proxy, monkeypatch
):
    """A client chooses the hosts an open proxy looks up, and a lookup that
    never answers holds its thread: those threads are not the ones where
    the configured upstreams' redirects and token realms are looked up."""
    hub, ghcr, proxy = await two_registries(
        make_fake_registry, make_proxy, top={"allow_any_registry": True}
    )
    threads: dict[str, str] = {}

    async def lookup(reactor, pool, host, port, timeout):
        threads[host] = pool.name
        return []

    monkeypatch.setattr(registry_module, "lookup", lookup)
    upstreams = proxy.proxy.upstreams
    for name in ("docker.io", "quay.example.com"):
        client = upstreams.get(name)
        assert client is not None
        await client._resolve(f"cdn-of-{name}", 443)
    assert threads == {
        "cdn-of-docker.io": "regproxy-lookups",
        "cdn-of-quay.example.com": "regproxy-lookups-named",
    }


@pytest_twisted.ensureDeferred
async def test_a_download_another_upstream_sends_is_not_joined(make_fake_registry, make_proxy):
    """docker.io is sending other bytes under ghcr.io's digest, slowly: a
    ghcr.io client whose manifest lists the digest gets ghcr.io's bytes,
    not docker.io's (nor waits for them)."""
    hub, ghcr, proxy = await two_registries(make_fake_registry, make_proxy)
    secret = os.urandom(64 * 1024)
    _, body = ghcr.add_image("owner/app", "1", [secret])
    layer = json.loads(body)["layers"][0]["digest"]
    hub._blobs[layer] = bytes(len(secret))
    hub.blob_faults[layer] = Fault.slow(chunk=4096, delay=0.02)
    from_hub = deferToThread(partial_get, proxy.url, f"/v2/someone/else/blobs/{layer}")
    await until(lambda: hub.count("GET", layer) == 1)
    assert (await proxy.get("/v2/ghcr.io/owner/app/manifests/1")).code == 200
    reply = await proxy.get(f"/v2/ghcr.io/owner/app/blobs/{layer}")
    assert (reply.code, reply.body) == (200, secret)
    assert ghcr.count("GET", f"/blobs/{layer}") == 1
    status, got, short = await from_hub
    assert short and secret not in got
