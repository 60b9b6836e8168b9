"""The fake upstream registry behaves like Docker Hub, faults included.

Every test talks to the fake's real port with treq, as a plain client would.
"""

from __future__ import annotations

import base64
import gzip
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import pytest_twisted
import treq
from fakeregistry import (
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    OCI_INDEX,
    OCI_MANIFEST,
    FakeRegistry,
    Fault,
    Override,
    sha256,
)
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.task import Clock, deferLater
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool, ResponseFailed
from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse

Make = Callable[..., Awaitable[FakeRegistry]]
LAYER = bytes(range(256)) * 8  # 2048 bytes


async def get(url: str, headers: Any = None, method: str = "GET") -> IResponse:
    return await treq.request(method, url, headers=headers, persistent=False, allow_redirects=False)


class _Collect(Protocol):
    def __init__(self) -> None:
        self.data = b""
        self.closed: Deferred[bytes] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.closed.callback(self.data)


async def raw_http(base: str, request_line: str) -> bytes:
    """Send one HTTP/1.0 request and return everything the server sent."""
    host, port = base.removeprefix("http://").split(":")
    protocol = _Collect()
    await connectProtocol(TCP4ClientEndpoint(reactor, host, int(port)), protocol)
    assert protocol.transport is not None
    protocol.transport.write(f"{request_line} HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
    return await protocol.closed


def header(response: IResponse, name: str) -> str | None:
    values = response.headers.getRawHeaders(name)
    return values[0] if values else None


async def errors(response: IResponse) -> list[str]:
    return [e["code"] for e in json.loads(await treq.content(response))["errors"]]


def challenge_params(value: str) -> dict[str, str]:
    scheme, _, rest = value.partition(" ")
    assert scheme == "Bearer"
    return {k: v.strip('"') for k, v in (p.split("=", 1) for p in rest.split('",'))}


async def token_for(registry: FakeRegistry, scope: str) -> str:
    response = await get(f"{registry.url}/token?service=fake-registry&scope={scope}")
    assert response.code == 200
    return json.loads(await treq.content(response))["token"]


# ---------------------------------------------------------------------------
# content


@pytest_twisted.ensureDeferred
async def test_v2_manifest_blob_without_auth(fake_registry: FakeRegistry) -> None:
    registry = fake_registry
    digest, manifest = registry.add_image("a/b/c", "v1", [LAYER])
    layer = sha256(LAYER)

    response = await get(f"{registry.url}/v2/")
    assert response.code == 200
    assert header(response, "Docker-Distribution-API-Version") == "registry/2.0"

    for ref in ("v1", digest):
        response = await get(f"{registry.url}/v2/a/b/c/manifests/{ref}")
        assert response.code == 200
        assert header(response, "Content-Type") == DOCKER_MANIFEST
        assert header(response, "Docker-Content-Digest") == digest
        assert response.length == len(manifest)
        assert await treq.content(response) == manifest

    # Twisted's client hides a HEAD's Content-Length: read the raw answer
    raw = await raw_http(registry.url, "HEAD /v2/a/b/c/manifests/v1")
    assert raw.startswith(b"HTTP/1.0 200 ") or raw.startswith(b"HTTP/1.1 200 ")
    assert f"\r\nContent-Length: {len(manifest)}\r\n".encode() in raw
    assert f"\r\nDocker-Content-Digest: {digest}\r\n".encode() in raw
    assert raw.endswith(b"\r\n\r\n")

    response = await get(f"{registry.url}/v2/a/b/c/blobs/{layer}")
    assert response.code == 200
    assert header(response, "Content-Type") == "application/octet-stream"
    assert header(response, "Docker-Content-Digest") == layer
    assert await treq.content(response) == LAYER

    raw = await raw_http(registry.url, f"HEAD /v2/a/b/c/blobs/{layer}")
    assert f"\r\nContent-Length: {len(LAYER)}\r\n".encode() in raw
    assert raw.endswith(b"\r\n\r\n")

    response = await get(f"{registry.url}/v2/a/b/c/blobs/sha256:{'0' * 64}")
    assert response.code == 404
    assert await errors(response) == ["BLOB_UNKNOWN"]
    response = await get(f"{registry.url}/v2/a/b/c/manifests/nope")
    assert (response.code, await errors(response)) == (404, ["MANIFEST_UNKNOWN"])
    response = await get(f"{registry.url}/v2/x/y/manifests/v1")
    assert (response.code, await errors(response)) == (404, ["NAME_UNKNOWN"])

    manifest_json = json.loads(manifest)
    config = manifest_json["config"]["digest"]
    response = await get(f"{registry.url}/v2/a/b/c/blobs/{config}")
    assert sha256(await treq.content(response)) == config


@pytest_twisted.ensureDeferred
async def test_accept_picks_the_variant(fake_registry: FakeRegistry) -> None:
    registry = fake_registry
    amd, _ = registry.add_image("library/alpine", None, [LAYER], "oci")
    arm, _ = registry.add_image("library/alpine", None, [LAYER[:10]], "oci", architecture="arm64")
    index = registry.add_index("library/alpine", "3.20", [amd, arm], "oci")
    single, _ = registry.add_image("library/alpine", "3.20", [LAYER])
    url = f"{registry.url}/v2/library/alpine/manifests/3.20"

    # no Accept: the first variant
    assert header(await get(url), "Docker-Content-Digest") == index
    # Accept spread over lines and commas, with parameters
    accept = [f"{DOCKER_MANIFEST}; q=0.5, text/plain", f"{OCI_INDEX};q=0.9"]
    assert header(await get(url, {"Accept": accept}), "Docker-Content-Digest") == index
    assert header(await get(url, {"Accept": [DOCKER_MANIFEST]}), "Docker-Content-Digest") == single
    # no variant taken: a list's linux/amd64 manifest, as registries answer
    response = await get(url, {"Accept": [DOCKER_MANIFEST_LIST, OCI_MANIFEST]})
    assert header(response, "Docker-Content-Digest") == amd
    response = await get(url, {"Accept": [DOCKER_MANIFEST_LIST]})
    assert (response.code, await errors(response)) == (404, ["MANIFEST_UNKNOWN"])
    # by digest, Accept does not matter
    response = await get(f"{registry.url}/v2/library/alpine/manifests/{index}", {"Accept": ["x/y"]})
    assert header(response, "Content-Type") == OCI_INDEX
    descriptors = json.loads(await treq.content(response))["manifests"]
    assert [d["platform"]["architecture"] for d in descriptors] == ["amd64", "arm64"]


@pytest_twisted.ensureDeferred
async def test_tags_list_paginates(fake_registry: FakeRegistry) -> None:
    registry = fake_registry
    for tag in ("c", "a", "b"):
        registry.add_image("r", tag, [tag.encode()])
    response = await get(f"{registry.url}/v2/r/tags/list")
    assert json.loads(await treq.content(response)) == {"name": "r", "tags": ["a", "b", "c"]}
    assert header(response, "Link") is None

    response = await get(f"{registry.url}/v2/r/tags/list?n=2")
    assert json.loads(await treq.content(response))["tags"] == ["a", "b"]
    link = header(response, "Link")
    assert link == '</v2/r/tags/list?n=2&last=b>; rel="next"'
    response = await get(registry.url + link[1 : link.index(">")])
    assert json.loads(await treq.content(response))["tags"] == ["c"]
    assert header(response, "Link") is None


# ---------------------------------------------------------------------------
# auth


@pytest_twisted.ensureDeferred
async def test_bearer_token_dance(make_fake_registry: Make) -> None:
    registry = await make_fake_registry(auth="bearer")
    digest, _ = registry.add_image("library/alpine", "latest", [LAYER])
    url = f"{registry.url}/v2/library/alpine/manifests/latest"

    response = await get(f"{registry.url}/v2/")
    assert response.code == 401
    params = challenge_params(header(response, "WWW-Authenticate") or "")
    assert params == {"realm": f"{registry.url}/token", "service": "fake-registry"}

    response = await get(url)
    assert (response.code, await errors(response)) == (401, ["UNAUTHORIZED"])
    params = challenge_params(header(response, "WWW-Authenticate") or "")
    assert params["scope"] == "repository:library/alpine:pull"

    response = await get(f"{params['realm']}?service={params['service']}&scope={params['scope']}")
    issued = json.loads(await treq.content(response))
    assert set(issued) == {"token", "access_token", "expires_in", "issued_at"}
    assert issued["token"] == issued["access_token"]
    assert issued["expires_in"] == 300

    bearer = {"Authorization": [f"Bearer {issued['token']}"]}
    response = await get(url, bearer)
    assert response.code == 200
    assert header(response, "Docker-Content-Digest") == digest
    assert (await get(f"{registry.url}/v2/", bearer)).code == 200
    assert registry.count("GET", "/token") == 1
    assert registry.requests[-1].authorization == f"Bearer {issued['token']}"

    registry.expire_tokens()
    response = await get(url, bearer)
    assert response.code == 401
    assert challenge_params(header(response, "WWW-Authenticate") or "")["error"] == "invalid_token"


@pytest_twisted.ensureDeferred
async def test_token_only_works_for_its_scope(make_fake_registry: Make) -> None:
    registry = await make_fake_registry(auth="bearer")
    registry.add_image("library/alpine", "latest", [LAYER])
    registry.add_image("library/busybox", "latest", [LAYER])
    token = await token_for(registry, "repository:library/busybox:pull")

    response = await get(
        f"{registry.url}/v2/library/alpine/manifests/latest",
        {"Authorization": [f"Bearer {token}"]},
    )
    assert response.code == 401
    params = challenge_params(header(response, "WWW-Authenticate") or "")
    assert params["error"] == "insufficient_scope"
    assert params["scope"] == "repository:library/alpine:pull"

    response = await get(
        f"{registry.url}/v2/library/busybox/manifests/latest",
        {"Authorization": [f"Bearer {token}"]},
    )
    assert response.code == 200


@pytest_twisted.ensureDeferred
async def test_token_expiry_follows_the_clock(make_fake_registry: Make) -> None:
    clock = Clock()
    clock.advance(1_700_000_000)
    registry = await make_fake_registry(auth="bearer", token_expires_in=60, clock=clock)
    registry.add_image("r", "t", [LAYER])
    bearer = {"Authorization": [f"Bearer {await token_for(registry, 'repository:r:pull')}"]}
    url = f"{registry.url}/v2/r/manifests/t"
    assert (await get(url, bearer)).code == 200
    clock.advance(59)
    assert (await get(url, bearer)).code == 200
    clock.advance(1)
    assert (await get(url, bearer)).code == 401


@pytest_twisted.ensureDeferred
async def test_token_endpoint_checks_credentials(make_fake_registry: Make) -> None:
    registry = await make_fake_registry(auth="bearer", username="u", password="p")
    token_url = f"{registry.url}/token?service=fake-registry&scope=repository:r:pull"
    good = "Basic " + base64.b64encode(b"u:p").decode()
    bad = "Basic " + base64.b64encode(b"u:x").decode()
    assert (await get(token_url, {"Authorization": [good]})).code == 200
    assert (await get(token_url, {"Authorization": [bad]})).code == 401
    assert (await get(token_url)).code == 200
    registry.anonymous_tokens = False
    assert (await get(token_url)).code == 401
    assert registry.requests[0].authorization == good


@pytest_twisted.ensureDeferred
async def test_basic_auth(make_fake_registry: Make) -> None:
    registry = await make_fake_registry(auth="basic")
    response = await get(f"{registry.url}/v2/")
    assert response.code == 401
    assert header(response, "WWW-Authenticate") == 'Basic realm="fake"'
    good = "Basic " + base64.b64encode(b"user:pass").decode()
    bad = "Basic " + base64.b64encode(b"user:nope").decode()
    assert (await get(f"{registry.url}/v2/", {"Authorization": [good]})).code == 200
    assert (await get(f"{registry.url}/v2/", {"Authorization": [bad]})).code == 401


# ---------------------------------------------------------------------------
# redirects and the CDN


@pytest_twisted.ensureDeferred
async def test_redirect_to_cdn_which_refuses_authorization(make_fake_registry: Make) -> None:
    registry = await make_fake_registry(auth="bearer")
    registry.redirect_blobs = True
    digest = registry.add_blob(LAYER)
    token = await token_for(registry, "repository:r:pull")
    bearer = {"Authorization": [f"Bearer {token}"]}

    response = await get(f"{registry.url}/v2/r/blobs/{digest}", bearer)
    assert response.code == 307
    location = header(response, "Location") or ""
    assert location.startswith(f"{registry.cdn_url}/blobs/{digest}?")
    assert "sig=" in location

    response = await get(location, bearer)
    assert response.code == 400
    assert b"InvalidArgument" in await treq.content(response)
    assert [r.authorization for r in registry.cdn_rejections] == [f"Bearer {token}"]

    response = await get(location)
    assert response.code == 200
    assert header(response, "Docker-Content-Digest") is None
    assert await treq.content(response) == LAYER
    assert (await get(location.replace("sig=", "sig=0"))).code == 403
    assert registry.count("GET", "/blobs/", host="cdn") == 3
    assert registry.count("GET", "/blobs/", host="registry") == 1
    # HEAD is answered directly unless redirect_head
    assert (await get(f"{registry.url}/v2/r/blobs/{digest}", bearer, "HEAD")).code == 200


@pytest_twisted.ensureDeferred
async def test_a_redirect_following_client_that_drops_authorization_gets_the_blob(
    make_fake_registry: Make,
) -> None:
    registry = await make_fake_registry(auth="bearer")
    registry.redirect_blobs = True
    digest = registry.add_blob(LAYER)
    token = await token_for(registry, "repository:r:pull")
    # Twisted's RedirectAgent drops Authorization on a cross-origin hop (other port)
    bearer = Headers({"Authorization": [f"Bearer {token}"]})
    response = await treq.get(
        f"{registry.url}/v2/r/blobs/{digest}", headers=bearer, persistent=False
    )
    assert response.code == 200
    assert await treq.content(response) == LAYER
    assert registry.cdn_rejections == []
    assert registry.count("GET", "/blobs/", host="cdn") == 1


@pytest_twisted.ensureDeferred
async def test_signed_cdn_url_expires(make_fake_registry: Make) -> None:
    clock = Clock()
    clock.advance(1_700_000_000)
    registry = await make_fake_registry(clock=clock)
    registry.redirect_blobs = True
    registry.redirect_expires_in = 10
    digest = registry.add_blob(LAYER)
    location = header(await get(f"{registry.url}/v2/r/blobs/{digest}"), "Location") or ""
    assert (await get(location)).code == 200
    clock.advance(10)
    assert (await get(location)).code == 403


# ---------------------------------------------------------------------------
# faults


@pytest_twisted.ensureDeferred
async def test_wrong_bytes_once(fake_registry: FakeRegistry) -> None:
    digest = fake_registry.add_blob(LAYER)
    fake_registry.blob_faults[digest] = Fault.wrong_bytes(times=1)
    url = f"{fake_registry.url}/v2/r/blobs/{digest}"
    response = await get(url)
    assert response.length == len(LAYER)
    body = await treq.content(response)
    assert len(body) == len(LAYER) and body != LAYER
    assert await treq.content(await get(url)) == LAYER
    assert fake_registry.blob_faults[digest].used == 1


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize(("reset", "reason"), [(True, ConnectionLost), (False, ConnectionDone)])
async def test_truncate_cuts_the_connection(
    fake_registry: FakeRegistry, reset: bool, reason: type[Exception]
) -> None:
    digest = fake_registry.add_blob(LAYER)
    fake_registry.blob_faults["*"] = Fault.truncate(after=1000, reset=reset)
    response = await get(f"{fake_registry.url}/v2/r/blobs/{digest}")
    assert response.length == len(LAYER)
    chunks: list[bytes] = []
    with pytest.raises(ResponseFailed) as failed:
        await treq.collect(response, chunks.append)
    assert b"".join(chunks) == LAYER[:1000]
    assert any(f.check(reason) for f in failed.value.reasons)


@pytest_twisted.ensureDeferred
async def test_extra_bytes(fake_registry: FakeRegistry) -> None:
    digest = fake_registry.add_blob(LAYER)
    fake_registry.blob_faults[digest] = Fault.extra_bytes(5)
    response = await get(f"{fake_registry.url}/v2/r/blobs/{digest}")
    assert response.length == len(LAYER) + 5
    body = await treq.content(response)
    assert body.startswith(LAYER) and len(body) == len(LAYER) + 5


@pytest_twisted.ensureDeferred
async def test_stall_holds_the_connection_until_stop(fake_registry: FakeRegistry) -> None:
    digest = fake_registry.add_blob(LAYER)
    fake_registry.blob_faults[digest] = Fault.stall(after=100)
    response = await get(f"{fake_registry.url}/v2/r/blobs/{digest}")
    chunks: list[bytes] = []
    done = treq.collect(response, chunks.append)
    await deferLater(reactor, 0.2, lambda: None)
    assert not done.called
    assert b"".join(chunks) == LAYER[:100]
    await fake_registry.stop()
    with pytest.raises(ResponseFailed):
        await done


@pytest_twisted.ensureDeferred
async def test_slow_sends_everything_late(fake_registry: FakeRegistry) -> None:
    digest = fake_registry.add_blob(LAYER)
    fake_registry.blob_faults[digest] = Fault.slow(chunk=512, delay=0.03)
    started = time.monotonic()
    response = await get(f"{fake_registry.url}/v2/r/blobs/{digest}")
    assert await treq.content(response) == LAYER
    assert time.monotonic() - started >= 0.09  # four chunks, three gaps


@pytest_twisted.ensureDeferred
async def test_manifest_faults(fake_registry: FakeRegistry) -> None:
    digest, manifest = fake_registry.add_image("r", "t", [LAYER])
    fake_registry.manifest_faults[digest] = Fault.wrong_bytes(times=1)
    body = await treq.content(await get(f"{fake_registry.url}/v2/r/manifests/t"))
    assert body != manifest and len(body) == len(manifest)
    assert await treq.content(await get(f"{fake_registry.url}/v2/r/manifests/t")) == manifest


@pytest_twisted.ensureDeferred
async def test_gzip_encoding_header_keeps_the_bytes(fake_registry: FakeRegistry) -> None:
    layer = gzip.compress(b"a tar stream")
    digest = fake_registry.add_blob(layer)
    fake_registry.gzip_encoding_header = True
    url = f"{fake_registry.url}/v2/r/blobs/{digest}"
    # a plain Agent sees the header and the blob's own bytes
    response = await Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False)).request(
        b"GET", url.encode()
    )
    assert header(response, "Content-Encoding") == "gzip"
    assert response.length == len(layer)
    assert await treq.content(response) == layer
    # treq always decodes gzip: exactly the corruption this knob exists to catch
    assert await treq.content(await get(url)) == b"a tar stream"


@pytest_twisted.ensureDeferred
async def test_ranges(fake_registry: FakeRegistry) -> None:
    digest = fake_registry.add_blob(LAYER)
    url = f"{fake_registry.url}/v2/r/blobs/{digest}"
    response = await get(url, {"Range": ["bytes=1000-"]})
    assert response.code == 206
    assert header(response, "Content-Range") == f"bytes 1000-2047/{len(LAYER)}"
    assert await treq.content(response) == LAYER[1000:]
    response = await get(url, {"Range": ["bytes=5000-"]})
    assert response.code == 416
    fake_registry.honour_ranges = False
    response = await get(url, {"Range": ["bytes=1000-"]})
    assert response.code == 200
    assert await treq.content(response) == LAYER


@pytest_twisted.ensureDeferred
async def test_status_override(make_fake_registry: Make) -> None:
    registry = await make_fake_registry(auth="bearer")
    registry.add_image("library/alpine", "latest", [LAYER])
    url = f"{registry.url}/v2/library/alpine/manifests/latest"
    registry.status_override["/manifests/"] = Override(429, {"Retry-After": "7"}, times=1)
    registry.status_override["/blobs/"] = (500, {}, b"boom")

    response = await get(url)
    assert response.code == 429
    assert header(response, "Retry-After") == "7"
    assert await errors(response) == ["TOOMANYREQUESTS"]
    assert (await get(url)).code == 401  # the override is used up
    response = await get(f"{registry.url}/v2/library/alpine/blobs/{sha256(LAYER)}")
    assert (response.code, await treq.content(response)) == (500, b"boom")

    assert registry.count("GET", "/manifests/latest") == 2
    assert registry.count(None, "/v2/") == 3
    assert [r.status for r in registry.requests] == [429, 401, 500]
