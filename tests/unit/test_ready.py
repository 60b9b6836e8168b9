"""Manifest answers used again (registryproxy.proxy.ready): the same answer
as the whole path gives, only faster, and never once it would differ."""

from __future__ import annotations

import base64
import json
import os
from typing import Any

import bcrypt
import pytest_twisted
from proxyharness import settle, until

from registryproxy.admin.backend import PurgeSelector
from registryproxy.cache.manifests import CachedManifest
from registryproxy.login.files import WatchedFile
from registryproxy.proxy.ready import Ready, ReadyAnswers

ACCEPT_ALL = [
    "application/vnd.docker.distribution.manifest.v2+json, "
    "application/vnd.docker.distribution.manifest.list.v2+json"
]
ACCEPT_V2 = ["application/vnd.docker.distribution.manifest.v2+json"]


def _ready(body: bytes, until: float = 10.0, generation: int = 0) -> Ready:
    manifest = CachedManifest(body, "application/json", "sha256:" + "0" * 64, "HIT")
    return Ready(
        manifest,
        "docker.io",
        "library/app",
        "1",
        "docker.io/library/app:1",
        None,
        until,
        generation,
    )


def _key(name: str) -> tuple[bytes, bytes | None, tuple[bytes, ...], bytes | None]:
    return (f"/v2/{name}/manifests/1".encode(), b"host", (b"*/*",), None)


def test_an_answer_ends_with_its_lifetime_and_its_generation():
    answers = ReadyAnswers()
    answers.put(_key("a"), _ready(b"{}", until=10.0, generation=3))
    assert answers.get(_key("a"), 9.9, 3) is not None
    assert answers.get(_key("a"), 9.9, 4) is None  # the upstreams changed
    assert answers.get(_key("a"), 9.9, 3) is None  # and it is gone for good
    answers.put(_key("b"), _ready(b"{}", until=10.0))
    assert answers.get(_key("b"), 10.0, 0) is None


def test_answers_stay_within_their_entry_and_byte_bounds():
    answers = ReadyAnswers(max_entries=2, max_bytes=16_000)
    for name in "abc":
        answers.put(_key(name), _ready(b"{}"))
    assert len(answers) == 2 and answers.get(_key("a"), 0.0, 0) is None
    answers = ReadyAnswers(max_entries=100, max_bytes=1_600)  # at most 100 bytes each
    names = [f"n{i:02}" for i in range(20)]
    for name in names:
        answers.put(_key(name), _ready(b"x" * 60))  # 86 bytes with the key
    assert answers.get(_key(names[0]), 0.0, 0) is None  # past 1,600 bytes: the oldest went
    assert answers.get(_key(names[-1]), 0.0, 0) is not None
    assert len(answers) == 1_600 // 86
    answers.put(_key("huge"), _ready(b"x" * 80))  # over a sixteenth: never kept
    assert answers.get(_key("huge"), 0.0, 0) is None
    # a client chooses its keys: they count too
    long_key = (b"/v2/" + b"n" * 200 + b"/manifests/1", b"host", (b"*/*",), None)
    answers.put(long_key, _ready(b"{}"))
    assert answers.get(long_key, 0.0, 0) is None


def _counting(proxy: Any) -> list[int]:
    """Count the manifest cache's whole-path lookups."""
    calls = [0]
    manifests = proxy.proxy.manifests
    get = manifests.get

    async def counted(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        return await get(*args, **kwargs)

    manifests.get = counted
    return calls


@pytest_twisted.ensureDeferred
async def test_a_kept_manifest_is_answered_again_the_same_without_the_whole_path(
    fake_registry, make_proxy
):
    digest, body = fake_registry.add_image("library/app", "1", [b"layer"])
    proxy = await make_proxy(fake_registry.url)
    calls = _counting(proxy)
    first = await proxy.get("/v2/library/app/manifests/1")  # fetched: a MISS
    assert first.header("X-Cache") == "MISS"
    replies = [await proxy.get("/v2/library/app/manifests/1") for _ in range(3)]
    head = await proxy.head("/v2/library/app/manifests/1")
    assert calls[0] == 2  # the MISS, then the hit that noted the answer
    for reply in replies:
        assert (reply.code, reply.body, reply.header("Docker-Content-Digest")) == (
            200,
            body,
            digest,
        )
        assert reply.header("X-Cache") == "HIT"
        assert reply.header("Content-Type") == first.header("Content-Type")
        assert reply.header("ETag") == f'"{digest}"'
    assert (head.code, head.body, head.header("Content-Length")) == (200, b"", str(len(body)))
    # counted as every answer is
    metrics = proxy.proxy.metrics
    assert metrics.requests.labels("manifest", "hit")._value.get() == 4
    assert metrics.pulls.top(1) == [{"image": "docker.io/library/app:1", "pulls": 4}]


@pytest_twisted.ensureDeferred
async def test_what_decides_an_answer_keeps_answers_apart(
    fake_registry, make_fake_registry, make_proxy
):
    """The Accept header (a list, or its linux/amd64 manifest for a client
    that takes no lists) and the Host header (another upstream)."""
    amd64, _ = fake_registry.add_image("library/app", None, [b"amd64"])
    arm64, _ = fake_registry.add_image("library/app", None, [b"arm64"], architecture="arm64")
    index = fake_registry.add_index("library/app", "1", [arm64, amd64])
    other = await make_fake_registry()
    elsewhere, _ = other.add_image("library/app", "1", [b"elsewhere"])
    proxy = await make_proxy(
        fake_registry.url, upstreams={"quay.io": {"url": other.url, "aliases": ["quay.local"]}}
    )
    path = "/v2/library/app/manifests/1"
    for _ in range(3):
        assert (await proxy.get(path, Accept=ACCEPT_ALL)).header("Docker-Content-Digest") == index
        assert (await proxy.get(path, Accept=ACCEPT_V2)).header("Docker-Content-Digest") == amd64
        reply = await proxy.get(path, Host=["quay.local"], Accept=ACCEPT_ALL)
        assert reply.header("Docker-Content-Digest") == elsewhere


@pytest_twisted.ensureDeferred
async def test_a_purge_or_a_rule_ends_answers_at_once(fake_registry, make_proxy):
    fake_registry.add_image("library/app", "1", [b"layer"])
    proxy = await make_proxy(fake_registry.url)
    path = "/v2/library/app/manifests/1"
    for _ in range(3):
        await proxy.get(path)
    control = proxy.proxy.control
    await control.purge(PurgeSelector(upstream="docker.io", repository="library/app", tag="1"))
    assert (await proxy.get(path)).header("X-Cache") == "MISS"
    for _ in range(2):
        assert (await proxy.get(path)).header("X-Cache") == "HIT"
    control.set_upstream("docker.io", {"deny": ["library/app"]}, merge=True)
    refused = await proxy.get(path)
    assert refused.code == 403 and json.loads(refused.body)["errors"][0]["code"] == "DENIED"


@pytest_twisted.ensureDeferred
async def test_a_tag_past_its_ttl_is_asked_again(fake_registry, make_proxy):
    """A TTL shorter than an answer's lifetime still ends it."""
    fake_registry.add_image("library/app", "1", [b"v1"])
    proxy = await make_proxy(fake_registry.url, cache={"tag_ttl": 0.3})
    path = "/v2/library/app/manifests/1"
    for _ in range(3):
        assert (await proxy.get(path)).code == 200
    new, _ = fake_registry.add_image("library/app", "1", [b"v2"])
    await settle(0.35)
    assert (await proxy.get(path)).header("Docker-Content-Digest") == new


@pytest_twisted.ensureDeferred
async def test_answers_are_kept_apart_by_credentials(
    fake_registry, make_proxy, tmp_path, monkeypatch
):
    """With proxy.auth an answer is used again only for the same credentials:
    wrong ones, another user's or none get what the whole path says."""
    monkeypatch.setattr(WatchedFile, "LOOK_EVERY", 0.05)
    fake_registry.add_image("library/app", "1", [b"layer"])
    users = tmp_path / "htpasswd"
    users.write_bytes(
        b"".join(
            name + b":" + bcrypt.hashpw(name + b"-secret", bcrypt.gensalt(4)) + b"\n"
            for name in (b"ann", b"bob")
        )
    )
    access = tmp_path / "access.log"
    auth = {
        "htpasswd": str(users),
        "rules": [{"repositories": ["library/app"], "users": ["ann"]}],
    }
    proxy = await make_proxy(
        fake_registry.url, top={"proxy": {"auth": auth, "access_log": str(access)}}
    )
    calls = _counting(proxy)
    path = "/v2/library/app/manifests/1"

    def basic(user: str, password: str) -> list[str]:
        return ["Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()]

    for _ in range(3):
        assert (await proxy.get(path, Authorization=basic("ann", "ann-secret"))).code == 200
    assert calls[0] == 2
    assert (await proxy.get(path, Authorization=basic("ann", "wrong"))).code == 401
    assert (await proxy.get(path, Authorization=basic("bob", "bob-secret"))).code == 403
    assert (await proxy.get(path)).code == 401
    # ann taken out of the file: refused as soon as the change is seen,
    # within the answer's lifetime
    users.write_bytes(users.read_bytes().split(b"\n", 1)[1])
    os.utime(users, ns=(0, 10**18))
    await settle(0.1)
    assert (await proxy.get(path, Authorization=basic("ann", "ann-secret"))).code == 401
    # a push to the same URI with ann's credentials is no pull
    push = await proxy.request("PUT", path, {"Authorization": basic("ann", "ann-secret")})
    assert push.code == 405, push.body
    # the access log is flushed every second
    await until(lambda: access.exists() and len(access.read_text().splitlines()) >= 8)
    users_logged = [line.split(" ")[2] for line in access.read_text().splitlines()]
    assert users_logged[:3] == ["ann", "ann", "ann"]
