"""Content regproxy pulls with its own credentials is not for everyone.

With credentials for an upstream, regproxy serves a repository to clients
only where the upstream serves it to anyone, unless ``share_private: true``.
"""

from __future__ import annotations

import json

import pytest
import pytest_twisted
from fakeregistry import Override
from proxyharness import until
from twisted.internet.task import Clock

from registryproxy.errors import RegistryError
from registryproxy.upstream.privacy import Privacy


async def private_setup(make_fake_registry, make_proxy, **upstream):
    registry = await make_fake_registry(auth="bearer", username="u", password="p")
    registry.private_repos.add("kituser/private")
    digest, body = registry.add_image("kituser/private", "1", [b"secret layer"])
    public, _ = registry.add_image("library/alpine", "1", [b"public layer"])
    proxy = await make_proxy(registry.url, username="u", password="p", **upstream)
    layer = json.loads(body)["layers"][0]["digest"]
    return registry, proxy, digest, layer


def code(reply) -> str:
    return json.loads(reply.body)["errors"][0]["code"]


@pytest_twisted.ensureDeferred
async def test_a_private_repository_is_served_to_nobody(make_fake_registry, make_proxy):
    registry, proxy, digest, layer = await private_setup(make_fake_registry, make_proxy)
    for path in [
        "/v2/kituser/private/manifests/1",
        f"/v2/kituser/private/manifests/{digest}",
        f"/v2/kituser/private/blobs/{layer}",
        "/v2/kituser/private/tags/list",
        f"/v2/kituser/private/referrers/{digest}",
    ]:
        for method in ("GET", "HEAD"):
            reply = await proxy.request(method, path, {"Authorization": ["Basic dTpw"]})
            assert reply.code == 401, (method, path)
            assert b"secret layer" not in reply.body
            if method == "GET":
                assert code(reply) == "UNAUTHORIZED"
    # nothing was fetched with regproxy's credentials for it
    assert registry.count("GET", "/v2/kituser/private/manifests/") == 0
    assert registry.count("GET", "/v2/kituser/private/blobs/") == 0


@pytest_twisted.ensureDeferred
async def test_a_public_repository_costs_one_probe(make_fake_registry, make_proxy):
    registry, proxy, _, _ = await private_setup(make_fake_registry, make_proxy)
    reply = await proxy.get("/v2/library/alpine/manifests/1")
    assert reply.code == 200
    probes = registry.count("HEAD", "/v2/library/alpine/")
    assert probes > 0
    config = json.loads(reply.body)["config"]["digest"]
    layer = json.loads(reply.body)["layers"][0]["digest"]
    for digest in (config, layer):
        assert (await proxy.get(f"/v2/library/alpine/blobs/{digest}")).code == 200
    assert (await proxy.get("/v2/library/alpine/tags/list")).code == 200
    # the first probe decided for the whole repository
    assert registry.count("HEAD", "/v2/library/alpine/") == probes


@pytest_twisted.ensureDeferred
async def test_cached_private_content_is_not_served_either(make_fake_registry, make_proxy):
    """A prefetch by the operator caches it; a client still does not get it."""
    registry, proxy, digest, layer = await private_setup(make_fake_registry, make_proxy)
    job = proxy.proxy.control.prefetch("docker.io", "kituser/private", "1", None)
    control = proxy.proxy.control
    await until(lambda: control.prefetch_jobs()[0].state != "running")
    assert control.prefetch_jobs()[0].state == "done", job
    assert proxy.blob_path(layer).exists()
    for path in ("/v2/kituser/private/manifests/1", f"/v2/kituser/private/blobs/{layer}"):
        reply = await proxy.get(path)
        assert reply.code == 401, path
        assert b"secret layer" not in reply.body


@pytest_twisted.ensureDeferred
async def test_share_private_serves_it_to_everyone(make_fake_registry, make_proxy):
    registry, proxy, digest, layer = await private_setup(
        make_fake_registry, make_proxy, share_private=True
    )
    reply = await proxy.get("/v2/kituser/private/manifests/1")
    assert (reply.code, reply.header("Docker-Content-Digest")) == (200, digest)
    reply = await proxy.get(f"/v2/kituser/private/blobs/{layer}")
    assert (reply.code, reply.body) == (200, b"secret layer")


@pytest_twisted.ensureDeferred
async def test_basic_auth_registry_with_no_anonymous_access_shares_nothing(
    make_fake_registry, make_proxy
):
    registry = await make_fake_registry(auth="basic", username="u", password="p")
    registry.add_image("team/app", "1", [b"a"])
    proxy = await make_proxy(registry.url, username="u", password="p")
    reply = await proxy.get("/v2/team/app/manifests/1")
    assert (reply.code, code(reply)) == (401, "UNAUTHORIZED")
    assert registry.count("GET", "/manifests/") == 0


@pytest_twisted.ensureDeferred
async def test_a_missing_tag_in_a_public_repository_is_not_a_verdict(
    make_fake_registry, make_proxy
):
    registry, proxy, _, _ = await private_setup(make_fake_registry, make_proxy)
    reply = await proxy.get("/v2/library/alpine/manifests/nope")
    assert (reply.code, code(reply)) == (404, "MANIFEST_UNKNOWN")
    assert (await proxy.get("/v2/library/alpine/manifests/1")).code == 200


@pytest_twisted.ensureDeferred
async def test_without_credentials_nothing_is_probed(fake_registry, make_proxy):
    fake_registry.add_image("library/alpine", "1", [b"x"])
    proxy = await make_proxy(fake_registry.url)
    assert (await proxy.get("/v2/library/alpine/manifests/1")).code == 200
    assert fake_registry.count("HEAD", "/") == 0


@pytest_twisted.ensureDeferred
async def test_upstream_down_and_no_verdict_shares_nothing(make_fake_registry, make_proxy):
    registry, proxy, _, _ = await private_setup(make_fake_registry, make_proxy)
    registry.status_override["/v2/library/alpine/"] = Override(503)
    reply = await proxy.get("/v2/library/alpine/manifests/1")
    assert reply.code in (502, 503)
    assert registry.count("GET", "/v2/library/alpine/manifests/") == 0


# -- the verdicts, on a clock ------------------------------------------------


def refusal() -> RegistryError:
    return RegistryError(401, "UNAUTHORIZED", "authentication required")


def probe_returning(answers: list):
    calls = []

    async def probe():
        calls.append(1)
        answer = answers.pop(0)
        if isinstance(answer, tuple):  # (error,): the upstream in trouble
            raise answer[0]
        return answer

    return probe, calls


@pytest_twisted.ensureDeferred
async def test_verdicts_last_their_ttl_then_are_asked_again():
    clock = Clock()
    privacy = Privacy("docker.io", clock, ttl=100)
    probe, calls = probe_returning([None, refusal()])
    await privacy.check("a/b", "manifests/1", probe)
    clock.advance(99)
    await privacy.check("a/b", "blobs/x", probe)
    assert len(calls) == 1
    clock.advance(2)
    with pytest.raises(RegistryError) as e:
        await privacy.check("a/b", "manifests/1", probe)
    assert e.value.status == 401
    with pytest.raises(RegistryError):
        await privacy.check("a/b", "manifests/1", probe)
    assert len(calls) == 2


@pytest_twisted.ensureDeferred
async def test_upstream_trouble_keeps_the_last_verdict():
    clock = Clock()
    privacy = Privacy("docker.io", clock, ttl=100)
    down = RegistryError(503, "UNAVAILABLE", "down")
    probe, calls = probe_returning([refusal(), (down,), None])
    with pytest.raises(RegistryError):
        await privacy.check("a/b", "manifests/1", probe)
    clock.advance(101)
    with pytest.raises(RegistryError) as e:  # still private: the upstream could not say
        await privacy.check("a/b", "manifests/1", probe)
    assert e.value.status == 401
    await privacy.check("a/b", "manifests/1", probe)  # asked again: public now
    assert len(calls) == 3


@pytest_twisted.ensureDeferred
async def test_verdicts_are_bounded():
    privacy = Privacy("docker.io", Clock(), size=3)
    probe, calls = probe_returning([None] * 5)
    for repo in ("a/1", "a/2", "a/3", "a/4", "a/1"):
        await privacy.check(repo, "tags/list", probe)
    assert len(calls) == 5  # a/1 was forgotten when a/4 came
