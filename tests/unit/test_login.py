"""Client authentication on the /v2/ port (``proxy.auth``): the token flow,
the rules, failed-login limits and the users' files, against the
in-process fake registry.  The real clients' logins are in
tests/integration/test_login.py."""

from __future__ import annotations

import base64
import http.client
import json
import os
import random
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

import bcrypt
import jwt
import pytest
import pytest_twisted
from proxyharness import ProxyClock, Reply, settle, until
from twisted.internet import reactor
from twisted.internet.defer import Deferred, TimeoutError, gatherResults
from twisted.internet.endpoints import serverFromString
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread
from twisted.logger import globalLogPublisher
from twisted.web.test.requesthelper import DummyRequest

from registryproxy.config import AuthConfig, AuthRule, ConfigError, parse_config
from registryproxy.login.failures import TURN_WAIT, FailedLogins
from registryproxy.login.files import WatchedFile, parse_tokens
from registryproxy.login.policy import Decision, Policy
from registryproxy.login.tokens import Invalid, Tokens, parse_scopes
from registryproxy.proxy import resource
from registryproxy.proxy.connections import access_line
from registryproxy.proxy.plaintext import PlainHTTPFactory

PASSWORDS = {"alice": "alice-secret-1", "bob": "bob-secret-22", "carol": "carol-secret-333"}
ROBOT_TOKEN = "robot-token-0123456789abcdef"


def htpasswd_line(user: str, password: str) -> str:
    # as `htpasswd -B` writes it; cost 4 keeps the tests fast
    hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(4)).decode()
    return f"{user}:$2y${hashed[4:]}\n"


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def code(reply: Any) -> str:
    return json.loads(reply.body)["errors"][0]["code"]


@pytest.fixture
def users(tmp_path: Path) -> Path:
    path = tmp_path / "htpasswd"
    path.write_text("".join(htpasswd_line(u, p) for u, p in PASSWORDS.items()))
    return path


@pytest.fixture
def robots(tmp_path: Path) -> Path:
    path = tmp_path / "tokens"
    path.write_text(f"# robots\nrobot {ROBOT_TOKEN}\n")
    return path


async def proxy_with_auth(make_proxy, registry, users, robots=None, upstream=None, **auth):
    section: dict[str, Any] = {"htpasswd": str(users), **auth}
    if robots is not None:
        section["tokens"] = str(robots)
    return await make_proxy(registry.url, top={"proxy": {"auth": section}}, **(upstream or {}))


async def token_for(proxy, user: str | None, scope: str = "repository:library/alpine:pull") -> str:
    headers = {"Authorization": [basic(user, PASSWORDS[user])]} if user else {}
    query = urlencode({"service": "regproxy", "scope": scope})
    reply = await proxy.request("GET", f"/token?{query}", headers)
    assert reply.code == 200, reply.body
    answer = json.loads(reply.body)
    assert answer["token"] == answer["access_token"]
    return answer["token"]


@pytest_twisted.ensureDeferred
async def test_the_token_flow_clients_speak(fake_registry, make_proxy, users):
    fake_registry.add_image("library/alpine", "1", [b"layer"])
    proxy = await proxy_with_auth(make_proxy, fake_registry, users)
    port = proxy.url.rsplit(":", 1)[1]
    # a client learns where to log in from the challenge
    reply = await proxy.get("/v2/")
    assert reply.code == 401
    assert code(reply) == "UNAUTHORIZED"
    challenge = reply.header("WWW-Authenticate")
    assert challenge == f'Bearer realm="http://127.0.0.1:{port}/token",service="regproxy"'
    reply = await proxy.get("/v2/library/alpine/manifests/1")
    assert reply.code == 401
    assert 'scope="repository:library/alpine:pull"' in reply.header("WWW-Authenticate")
    # then gets a token for the scope with Basic credentials, and pulls with it
    token = await token_for(proxy, "alice")
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["sub"] == "alice"
    assert claims["aud"] == "regproxy"
    assert claims["access"] == [
        {"type": "repository", "name": "library/alpine", "actions": ["pull"]}
    ]
    bearer = {"Authorization": [f"Bearer {token}"]}
    assert (await proxy.request("GET", "/v2/", bearer)).code == 200
    reply = await proxy.request("GET", "/v2/library/alpine/manifests/1", bearer)
    assert reply.code == 200
    # Basic credentials are taken on /v2/ requests too (curl -u)
    reply = await proxy.request(
        "GET", "/v2/library/alpine/manifests/1", {"Authorization": [basic("bob", PASSWORDS["bob"])]}
    )
    assert reply.code == 200


@pytest_twisted.ensureDeferred
async def test_wrong_or_missing_credentials_get_no_token(fake_registry, make_proxy, users):
    fake_registry.add_image("library/alpine", "1", [b"layer"])
    proxy = await proxy_with_auth(make_proxy, fake_registry, users)
    for headers in (
        {"Authorization": [basic("alice", "wrong")]},
        {"Authorization": [basic("nobody", "alice-secret-1")]},
        {},  # no anonymous pulls here
    ):
        reply = await proxy.request("GET", "/token?service=regproxy", headers)
        assert reply.code == 401, headers
        assert code(reply) == "UNAUTHORIZED"
        assert b"token" not in reply.body
    # and none of that opens the manifest
    reply = await proxy.request(
        "GET", "/v2/library/alpine/manifests/1", {"Authorization": [basic("alice", "wrong")]}
    )
    assert reply.code == 401
    forged = jwt.encode(
        {"sub": "alice", "aud": "regproxy", "iss": "regproxy", "iat": 0, "exp": 2**40},
        "not the key, though as long as one",
        algorithm="HS256",
    )
    reply = await proxy.request(
        "GET", "/v2/library/alpine/manifests/1", {"Authorization": [f"Bearer {forged}"]}
    )
    assert reply.code == 401
    assert 'error="invalid_token"' in reply.header("WWW-Authenticate")


@pytest_twisted.ensureDeferred
async def test_the_oauth2_password_grant(fake_registry, make_proxy, users):
    """containerd POSTs a form first, and falls back to GET on 400, 401 or 404."""
    fake_registry.add_image("library/alpine", "1", [b"layer"])
    proxy = await proxy_with_auth(make_proxy, fake_registry, users)

    async def post(form: dict[str, str], query: str = "") -> Any:
        def send() -> Reply:
            parts = urlsplit(proxy.url)
            conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
            conn.request(
                "POST",
                "/token" + query,
                urlencode(form),
                {"Content-Type": "application/x-www-form-urlencoded"},
            )
            response = conn.getresponse()
            return Reply(response.status, response.getheaders(), response.read())

        return await deferToThread(send)

    form = {
        "grant_type": "password",
        "username": "carol",
        "password": PASSWORDS["carol"],
        "service": "regproxy",
        "scope": "repository:library/alpine:pull,push",
        "client_id": "containerd-client",
    }
    reply = await post(form)
    assert reply.code == 200, reply.body
    answer = json.loads(reply.body)
    assert answer["scope"] == "repository:library/alpine:pull"  # never push
    bearer = {"Authorization": [f"Bearer {answer['access_token']}"]}
    assert (await proxy.request("GET", "/v2/library/alpine/manifests/1", bearer)).code == 200
    assert (await post({**form, "password": "wrong"})).code == 401
    refresh = await post({"grant_type": "refresh_token", "refresh_token": "x"})
    assert refresh.code == 400
    # the grant belongs in the body: a password in the URL is refused (and
    # kept out of the access log)
    in_url = await post({}, "?" + urlencode(form))
    assert in_url.code == 400 and b"POST body" in in_url.body, in_url.body
    no_password = {k: v for k, v in form.items() if k != "password"}
    assert (await post(no_password, "?password=" + PASSWORDS["carol"])).code == 400


def test_the_access_log_keeps_no_password_from_a_url() -> None:
    request = DummyRequest([b"token"])
    request.uri = b"/token?grant_type=password&username=carol&password=s3cret&scope=x"
    request.method, request.code, request.sentLength = b"POST", 400, 0
    line = access_line("[29/Nov/2026:00:00:00 +0000]", request)
    assert "s3cret" not in line and "password=-&scope=x" in line, line


async def private_upstream(make_fake_registry):
    registry = await make_fake_registry(auth="bearer", username="u", password="p")
    registry.private_repos.add("private/secret")
    digest, body = registry.add_image("private/secret", "1", [b"secret layer"])
    registry.add_image("library/alpine", "1", [b"public layer"])
    layer = json.loads(body)["layers"][0]["digest"]
    return registry, digest, layer


@pytest_twisted.ensureDeferred
async def test_a_private_repository_is_pulled_only_by_users_a_rule_names(
    make_fake_registry, make_proxy, users
):
    registry, digest, layer = await private_upstream(make_fake_registry)
    proxy = await proxy_with_auth(
        make_proxy,
        registry,
        users,
        upstream={"username": "u", "password": "p"},
        max_failures=100,
        anonymous=True,
        groups={"ops": ["carol"]},
        rules=[
            {"repositories": ["private/**"], "users": ["alice"], "groups": ["ops"]},
            {"repositories": ["library/*"], "anonymous": True},
        ],
    )
    paths = [
        "/v2/private/secret/manifests/1",
        f"/v2/private/secret/manifests/{digest}",
        f"/v2/private/secret/blobs/{layer}",
        "/v2/private/secret/tags/list",
    ]
    bob = {"Authorization": [f"Bearer {await token_for(proxy, 'bob')}"]}
    wrong = {"Authorization": [basic("alice", "wrong")]}
    anonymous_token = {"Authorization": [f"Bearer {await token_for(proxy, None)}"]}
    for path in paths:
        for method in ("GET", "HEAD"):
            for who, headers, status in (
                ("anonymous", {}, 401),
                ("an anonymous token", anonymous_token, 401),
                ("a wrong password", wrong, 401),
                ("bob", bob, 403),
            ):
                reply = await proxy.request(method, path, headers)
                assert reply.code == status, (who, method, path)
                assert b"secret layer" not in reply.body
    # (by digest through another repository: the fake registry serves any
    # blob through any repository, a real one does not: tests/integration/test_login.py)
    assert registry.count("GET", "/v2/private/secret/") == 0
    # alice, and carol by her group, pull it, with regproxy's credentials upstream
    for user in ("alice", "carol"):
        headers = {"Authorization": [f"Bearer {await token_for(proxy, user)}"]}
        assert (await proxy.request("GET", paths[0], headers)).code == 200
        reply = await proxy.request("GET", paths[2], headers)
        assert (reply.code, reply.body) == (200, b"secret layer")
    # anonymous pulls where a rule allows them
    assert (await proxy.get("/v2/library/alpine/manifests/1")).code == 200
    # ... and bob pulls what no rule names, but only what the upstream serves to anyone
    assert (await proxy.request("GET", "/v2/library/alpine/manifests/1", bob)).code == 200


@pytest_twisted.ensureDeferred
async def test_failed_logins_are_limited_per_address(fake_registry, make_proxy, users):
    proxy = await proxy_with_auth(make_proxy, fake_registry, users, max_failures=3)
    for _ in range(3):
        reply = await proxy.request("GET", "/token", {"Authorization": [basic("alice", "guess")]})
        assert reply.code == 401
    # past the limit even the right password waits
    for headers in (
        {"Authorization": [basic("alice", "guess")]},
        {"Authorization": [basic("alice", PASSWORDS["alice"])]},
    ):
        reply = await proxy.request("GET", "/token", headers)
        assert reply.code == 429
        assert code(reply) == "TOOMANYREQUESTS"
        assert 1 <= int(reply.header("Retry-After")) <= 60


@pytest_twisted.ensureDeferred
async def test_guesses_sent_at_once_are_limited_too(fake_registry, make_proxy, users):
    """A password check takes a while (bcrypt): guesses sent all at once
    count as failures while they are checked, so no more than the limit
    are checked, not as many as may wait for the checking threads."""
    proxy = await proxy_with_auth(make_proxy, fake_registry, users, max_failures=3)
    guess = {"Authorization": [basic("alice", "guess")]}
    replies = await gatherResults([proxy.request("GET", "/token", guess) for _ in range(12)])
    logins = proxy.proxy.metrics.logins
    counted = {k: logins.labels(k)._value.get() for k in ("failed", "limited", "ok")}
    assert sorted(reply.code for reply in replies) == [401] * 3 + [429] * 9, (
        counted,
        [(r.code, r.body[:120]) for r in replies],
    )
    assert counted["failed"] == 3


@pytest_twisted.ensureDeferred
async def test_right_passwords_sent_at_once_all_get_in(fake_registry, make_proxy, users):
    """A build farm behind one address logs in all at once: its logins wait
    their turns (at most the limit at once), none is refused."""
    proxy = await proxy_with_auth(make_proxy, fake_registry, users, max_failures=3)
    right = {"Authorization": [basic("alice", PASSWORDS["alice"])]}
    replies = await gatherResults([proxy.request("GET", "/token", right) for _ in range(8)])
    assert [reply.code for reply in replies] == [200] * 8


def test_a_turn_waits_while_failures_and_checks_running_reach_the_limit() -> None:
    clock = Clock()
    failures = FailedLogins(2, 60.0, clock)

    def turn(address: str) -> Deferred[float | None]:
        return Deferred.fromCoroutine(failures.turn(address))

    first, second, third = turn("10.0.0.1"), turn("10.0.0.1"), turn("10.0.0.1")
    assert (first.result, second.result, third.called) == (None, None, False)
    assert turn("10.0.0.2").result is None  # another address has its own
    failures.failed("10.0.0.1")  # the first check failed ...
    failures.done("10.0.0.1")
    assert not third.called  # ... and the second may fail too
    failures.done("10.0.0.1")  # it did not
    assert third.result is None
    failures.failed("10.0.0.1")
    failures.done("10.0.0.1")
    assert turn("10.0.0.1").result == pytest.approx(60.0)  # past its failures
    late = turn("10.0.0.2")  # its one turn taken, a second is free
    assert late.result is None
    waiting = [turn("10.0.0.2")]
    clock.advance(TURN_WAIT + 1)
    waiting[0].addErrback(lambda f: f.trap(TimeoutError))
    assert waiting[0].called and failures._waiting == {}


def test_failed_logins_leave_the_window_and_memory_is_bounded() -> None:
    clock = Clock()
    failures = FailedLogins(2, 60.0, clock, max_addresses=3)
    failures.failed("10.0.0.1")
    assert failures.retry_after("10.0.0.1") is None
    clock.advance(10)
    failures.failed("10.0.0.1")
    assert failures.retry_after("10.0.0.1") == pytest.approx(50)
    clock.advance(51)
    assert failures.retry_after("10.0.0.1") is None  # the first one left the window
    for i in range(10):
        failures.failed(f"10.0.1.{i}")
    assert len(failures) == 3


def test_a_users_file_is_looked_at_once_a_second(tmp_path) -> None:
    path = tmp_path / "tokens"
    path.write_text("robot " + "r" * 16 + "\n")
    clock = Clock()
    watched = WatchedFile(str(path), parse_tokens, clock)
    path.write_text("other " + "o" * 16 + "\n")
    os.utime(path, ns=(0, 10**18))
    clock.advance(WatchedFile.LOOK_EVERY - 0.01)
    assert list(watched.current().values()) == ["robot"]  # not looked at yet
    clock.advance(0.01)
    assert list(watched.current().values()) == ["other"]
    assert watched.generation == 1
    path.write_text("third " + "t" * 16 + "\n")
    os.utime(path, ns=(0, 2 * 10**18))
    clock.advance(0.5)
    assert list(watched.current().values()) == ["other"]  # looked at a moment ago


@pytest_twisted.ensureDeferred
async def test_the_users_file_is_read_again_when_it_changes(
    fake_registry, make_proxy, users, robots, monkeypatch
):
    # once a second is tested on a Clock above; here the real reactor's, and
    # more often
    monkeypatch.setattr(WatchedFile, "LOOK_EVERY", 0.05)
    # and answers used again for a fifth of a second rather than a second
    monkeypatch.setattr(resource, "LIFETIME", 0.2)
    fake_registry.add_image("library/alpine", "1", [b"layer"])
    proxy = await proxy_with_auth(make_proxy, fake_registry, users, robots)
    path = "/v2/library/alpine/manifests/1"
    alice = {"Authorization": [basic("alice", PASSWORDS["alice"])]}
    assert (await proxy.request("GET", path, alice)).code == 200
    dave = {"Authorization": [basic("dave", "dave-secret-4444")]}
    assert (await proxy.request("GET", path, dave)).code == 401
    alices_token = {"Authorization": [f"Bearer {await token_for(proxy, 'alice')}"]}
    assert (await proxy.request("GET", path, alices_token)).code == 200
    # alice leaves, dave comes; an answer made for her is used again for a
    # moment at most (ready answers)
    users.write_text(htpasswd_line("dave", "dave-secret-4444"))
    os.utime(users, ns=(0, 10**18))
    await settle(resource.LIFETIME + 0.1)
    assert (await proxy.request("GET", path, dave)).code == 200
    assert (await proxy.request("GET", path, alice)).code == 401  # remembered no more
    assert (await proxy.request("GET", path, alices_token)).code == 401  # her token too
    # a broken file keeps what it had, and says why in the log
    users.write_text("dave:{SHA}W6ph5Mm5Pz8GgiULbPgzG37mj9g=\n")
    os.utime(users, ns=(0, 2 * 10**18))
    await settle(0.1)
    assert (await proxy.request("GET", path, dave)).code == 200


@pytest_twisted.ensureDeferred
async def test_static_tokens_for_robots(fake_registry, make_proxy, users, robots):
    fake_registry.add_image("library/alpine", "1", [b"layer"])
    proxy = await proxy_with_auth(
        make_proxy,
        fake_registry,
        users,
        robots,
        rules=[{"repositories": ["library/**"], "users": ["robot"]}],
    )
    path = "/v2/library/alpine/manifests/1"
    assert (
        await proxy.request("GET", path, {"Authorization": [f"Bearer {ROBOT_TOKEN}"]})
    ).code == 200
    # as a password too (docker login -u robot -p TOKEN)
    assert (
        await proxy.request("GET", path, {"Authorization": [basic("robot", ROBOT_TOKEN)]})
    ).code == 200
    assert (
        await proxy.request("GET", path, {"Authorization": [basic("alice", ROBOT_TOKEN)]})
    ).code == 401
    # a token from the token endpoint for a user of the tokens file only
    reply = await proxy.request("GET", "/token", {"Authorization": [basic("robot", ROBOT_TOKEN)]})
    jwt_token = json.loads(reply.body)["token"]
    assert (
        await proxy.request("GET", path, {"Authorization": [f"Bearer {jwt_token}"]})
    ).code == 200
    # the rule names robot alone
    alice = {"Authorization": [basic("alice", PASSWORDS["alice"])]}
    assert (await proxy.request("GET", path, alice)).code == 403


@pytest_twisted.ensureDeferred
async def test_passwords_never_reach_the_log(fake_registry, make_proxy, users):
    proxy = await proxy_with_auth(make_proxy, fake_registry, users)
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        for password in ("a-wrong-password-xyz", PASSWORDS["alice"]):
            await proxy.request("GET", "/token", {"Authorization": [basic("alice", password)]})
            await proxy.request(
                "GET",
                "/v2/library/alpine/manifests/1",
                {"Authorization": [basic("alice", password)]},
            )
    finally:
        globalLogPublisher.removeObserver(events.append)
    text = repr(events)
    assert "failed login as 'alice'" in "".join(
        e.get("log_format", "").format(**{k: v for k, v in e.items() if isinstance(k, str)})
        for e in events
        if "failed login" in e.get("log_format", "")
    )
    assert "a-wrong-password-xyz" not in text
    assert PASSWORDS["alice"] not in text


@pytest_twisted.ensureDeferred
async def test_fuzzed_credentials_get_400_or_401_never_500(fake_registry, make_proxy, users):
    fake_registry.add_image("library/alpine", "1", [b"layer"])
    proxy = await proxy_with_auth(make_proxy, fake_registry, users, max_failures=1000)
    rng = random.Random(12)
    junk = [
        "Basic",
        "Basic ",
        "Basic !!!notbase64",
        "Basic " + base64.b64encode(b"no-colon").decode(),
        "Basic " + base64.b64encode(b":empty-user").decode(),
        "Basic " + base64.b64encode(b"\xff\xfe:\xff").decode(),
        "Basic " + base64.b64encode(b"a" * 5000 + b":b").decode(),
        "Bearer",
        "Bearer " + "x" * 5000,
        "Bearer a.b.c",
        "Bearer eyJhbGciOiJub25lIn0.eyJzdWIiOiJhbGljZSJ9.",
        "Digest username=alice",
        "Negotiate YII=",
        "basic " + base64.b64encode(b"alice:wrong").decode(),
        "\u00e9\u00e8 zz",
        "Basic " + "A" * 9000,
    ]
    for _ in range(40):
        junk.append(
            rng.choice(["Basic ", "Bearer ", "", "Token "])
            + "".join(chr(rng.randrange(0x21, 0x7F)) for _ in range(rng.randrange(0, 200)))
        )
    for value in junk:
        for path in ("/v2/", "/v2/library/alpine/manifests/1", "/token?scope=repository:a:pull"):
            reply = await proxy.request(
                "GET", path, {"Authorization": [value.encode("utf-8").decode("latin-1")]}
            )
            assert reply.code in (400, 401), (value[:60], path, reply.code)
            assert code(reply) in ("UNAUTHORIZED", "UNSUPPORTED"), (value[:60], path)
    alice = {"Authorization": [basic("alice", PASSWORDS["alice"])]}
    for scope in ("nonsense", "repository::pull", "repository:" + "a" * 600 + ":pull", "a b c d"):
        reply = await proxy.request("GET", "/token?" + urlencode({"scope": scope}), alice)
        assert reply.code == 400, scope
        assert code(reply) == "UNSUPPORTED"
    # more than a form's worth of body, and methods the endpoint does not take
    reply = await proxy.request("DELETE", "/token", alice)
    assert reply.code == 405


@pytest_twisted.ensureDeferred
async def test_without_auth_there_is_no_token_endpoint(fake_registry, make_proxy):
    proxy = await make_proxy(fake_registry.url)
    reply = await proxy.get("/token")
    assert reply.code == 404
    assert (await proxy.get("/v2/")).code == 200


def test_tokens_expire_and_name_their_user() -> None:
    clock = Clock()
    clock.advance(1_000_000)
    tokens = Tokens(lambda: b"k" * 32, "regproxy", 300, clock)
    answer = tokens.issue("alice", parse_scopes(["repository:library/alpine:pull"]))
    assert answer["expires_in"] == 300
    assert tokens.user(answer["token"]) == "alice"
    assert tokens.user(tokens.issue(None, [])["token"]) is None
    clock.advance(300 + 31)
    with pytest.raises(Invalid):
        tokens.user(answer["token"])
    other = Tokens(lambda: b"o" * 32, "regproxy", 300, clock)
    with pytest.raises(Invalid):
        other.user(tokens.issue("alice", [])["token"])
    with pytest.raises(Invalid):
        Tokens(lambda: b"k" * 32, "elsewhere", 300, clock).user(tokens.issue("alice", [])["token"])


def test_scopes_grant_pull_only() -> None:
    scopes = parse_scopes(
        [
            "repository:library/alpine:pull,push repository:127.0.0.1:5000/a/b:pull",
            "registry:catalog:*",
        ]
    )
    assert [(s.type, s.name, s.actions) for s in scopes] == [
        ("repository", "library/alpine", ("pull",)),
        ("repository", "127.0.0.1:5000/a/b", ("pull",)),
        ("registry", "catalog", ()),
    ]
    for bad in ("pull", "repository:pull", "Repository:a:pull", "repository:a:pull " * 70):
        with pytest.raises(ValueError):
            parse_scopes([bad])


def test_the_policy_table() -> None:
    config = AuthConfig(
        htpasswd=None,
        tokens=os.devnull,
        anonymous=True,
        groups={"ci": ("robot",)},
        rules=(
            AuthRule(
                upstream="ghcr.io", repositories=("myorg/**",), users=("alice",), groups=("ci",)
            ),
            AuthRule(repositories=("library/*",), anonymous=True),
            AuthRule(repositories=("internal/**",), users=("*",)),
        ),
    )
    policy = Policy(config)
    cases = [
        (None, "ghcr.io", "myorg/app", Decision.REFUSED),
        ("bob", "ghcr.io", "myorg/app", Decision.REFUSED),
        ("alice", "ghcr.io", "myorg/app", Decision.NAMED),
        ("robot", "ghcr.io", "myorg/team/app", Decision.NAMED),
        # the first rule is ghcr.io's: on docker.io no rule names myorg
        (None, "docker.io", "myorg/app", Decision.PUBLIC),
        (None, "docker.io", "library/alpine", Decision.PUBLIC),
        ("bob", "docker.io", "library/alpine", Decision.PUBLIC),
        (None, "docker.io", "internal/x", Decision.REFUSED),
        ("bob", "docker.io", "internal/x", Decision.NAMED),
    ]
    for user, upstream, repository, decision in cases:
        assert policy.decide(user, upstream, repository) is decision, (user, upstream, repository)
    closed = Policy(AuthConfig(tokens=os.devnull))
    assert closed.decide(None, "docker.io", "library/alpine") is Decision.REFUSED
    assert closed.decide("bob", "docker.io", "library/alpine") is Decision.PUBLIC


@pytest.mark.parametrize(
    "auth, says",
    [
        ({}, "give htpasswd or tokens"),
        ({"htpasswd": "/nonexistent"}, "htpasswd: cannot read '/nonexistent'"),
        ({"htpasswd": "MD5"}, "is not bcrypt: write it with htpasswd -B"),
        ({"tokens": "SHORT"}, "shorter than 16"),
        ({"tokens": "OK", "rules": [{"groups": ["nope"]}]}, "rules[0].groups: 'nope' is not one"),
        (
            {"tokens": "OK", "rules": [{"anonymous": True}]},
            "rules[0].anonymous: anonymous pulls are off",
        ),
        ({"tokens": "OK", "rules": [{"repositories": ["a:latest"]}]}, "not tags"),
        ({"tokens": "OK", "rules": [{"repositories": ["A/**"]}]}, "repositories[0]"),
        ({"tokens": "OK", "rules": [{"users": "alice"}]}, "users: expected a list"),
        ({"tokens": "OK", "groups": {"bad name": []}}, "is not a name"),
        ({"tokens": "OK", "realm": "ftp://x/token"}, "realm: expected"),
        ({"tokens": "OK", "token_ttl": 0}, "token_ttl: expected seconds >= 60"),
        ({"tokens": "OK", "max_failures": 0}, "max_failures: expected a number > 0"),
        ({"tokens": "OK", "passwords": "x"}, "proxy.auth.passwords: unknown key"),
    ],
)
def test_config_mistakes_are_one_clear_line(
    tmp_path: Path, auth: dict[str, Any], says: str
) -> None:
    files = {
        "MD5": "alice:$apr1$x$y\n",
        "SHORT": "robot short\n",
        "OK": f"robot {ROBOT_TOKEN}\n",
    }
    for key in ("htpasswd", "tokens"):
        if auth.get(key) in files:
            path = tmp_path / key
            path.write_text(files[auth[key]])
            auth = {**auth, key: str(path)}
    with pytest.raises(ConfigError) as e:
        parse_config(json.dumps({"proxy": {"auth": auth}}))
    assert says in str(e.value)
    assert "\n" not in str(e.value)


def proxied_get(port: int, source: str, path: str, authorization: str) -> int:
    """A GET through a PROXY-protocol header, as haproxy's send-proxy sends it."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(
            f"PROXY TCP4 {source} 127.0.0.1 40000 80\r\n"
            f"GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: {authorization}\r\n"
            "Connection: close\r\n\r\n".encode()
        )
        status = b""
        while b"\r\n" not in status:
            chunk = conn.recv(4096)
            if not chunk:
                break
            status += chunk
    return int(status.split()[1])


@pytest_twisted.ensureDeferred
async def test_behind_a_load_balancer_failures_count_per_client(fake_registry, make_proxy, users):
    """With ``haproxy:`` before the endpoint (haproxy's send-proxy), the
    failed-login limit sees each client, not the balancer's one address."""
    proxy = await proxy_with_auth(make_proxy, fake_registry, users, max_failures=2)
    port = await serverFromString(reactor, "haproxy:tcp:0:interface=127.0.0.1").listen(
        PlainHTTPFactory(proxy.proxy.site)
    )
    try:
        number = port.getHost().port
        wrong = basic("alice", "guess")
        right = basic("alice", PASSWORDS["alice"])
        for expected in (401, 401, 429):
            status = await deferToThread(proxied_get, number, "203.0.113.7", "/token", wrong)
            assert status == expected
        assert await deferToThread(proxied_get, number, "203.0.113.7", "/token", right) == 429
        # another client behind the same balancer logs in
        assert await deferToThread(proxied_get, number, "203.0.113.8", "/token", right) == 200
    finally:
        await port.stopListening()
    logins = proxy.proxy.metrics.logins
    assert logins.labels("failed")._value.get() == 2
    assert logins.labels("limited")._value.get() == 2
    assert logins.labels("ok")._value.get() == 1


@pytest_twisted.ensureDeferred
async def test_the_access_log_names_the_user(fake_registry, make_proxy, users, tmp_path):
    fake_registry.add_image("library/alpine", "1", [b"layer"])
    access = tmp_path / "access.log"
    clock = ProxyClock()
    proxy = await make_proxy(
        fake_registry.url,
        top={"proxy": {"auth": {"htpasswd": str(users)}, "access_log": str(access)}},
        clock=clock,
    )
    await proxy.request(
        "GET",
        "/v2/library/alpine/manifests/1",
        {"Authorization": [basic("alice", PASSWORDS["alice"])]},
    )
    await proxy.request("GET", "/v2/library/alpine/manifests/1")
    await token_for(proxy, "bob")
    # written buffered, flushed every second
    assert not access.exists() or access.read_text() == ""
    clock.advance(1)
    await until(lambda: len(access.read_text().splitlines()) == 3)
    lines = access.read_text().splitlines()
    assert [line.split(" ")[2] for line in lines] == ["alice", "-", "bob"]
    assert '"GET /v2/library/alpine/manifests/1 HTTP/1.1" 200' in lines[0]


def test_an_ipv6_client_is_counted_by_its_slash_64() -> None:
    """Else one machine, with a /64 to pick addresses from, guesses unlimited."""
    failures = FailedLogins(2, 60.0, Clock())
    failures.failed("2001:db8:1:2::1")
    failures.failed("2001:db8:1:2:ffff::9")
    assert failures.retry_after("2001:db8:1:2::77") is not None
    assert failures.retry_after("2001:db8:1:3::1") is None
    failures.failed("::ffff:192.0.2.1")
    failures.failed("192.0.2.1")
    assert failures.retry_after("192.0.2.1") is not None
    assert failures.retry_after("192.0.2.2") is None


@pytest_twisted.ensureDeferred
async def test_a_malformed_name_puts_no_scope_in_the_challenge(fake_registry, make_proxy, users):
    proxy = await proxy_with_auth(make_proxy, fake_registry, users)
    # the credentials are checked first, so the 401 comes before the name's 400
    wrong = {"Authorization": [basic("alice", "wrong")]}
    reply = await proxy.request("GET", '/v2/a",error="x/manifests/1', wrong)
    assert reply.code == 401
    assert reply.header("WWW-Authenticate").count('"') == 4  # realm and service only


@pytest.mark.parametrize(
    "uri, agent, referrer, host",
    [
        (b"/v2/library/app/manifests/1", b"containerd/1.7", None, "127.0.0.1"),
        (b'/v2/x/"quoted"\\back', b"curl/8 \xff\x01", b"http://a/?b=c", "::1"),
        (b"/v2/", b"", b"", None),
        (b"/v2/caf\xc3\xa9/tags/list?n=1", None, b"'single'", "10.0.0.1"),
    ],
)
def test_the_access_line_is_twisteds_combined_format(uri, agent, referrer, host) -> None:
    """regproxy makes the line itself (for its cost), the same as Twisted's."""
    from twisted.internet.address import IPv4Address, UNIXAddress
    from twisted.web.http import combinedLogFormatter

    request = DummyRequest([b"x"])
    request.uri, request.method, request.code, request.sentLength = uri, b"GET", 200, 1234
    request.clientproto = b"HTTP/1.1"
    for name, value in ((b"user-agent", agent), (b"referer", referrer)):
        if value is not None:
            request.requestHeaders.setRawHeaders(name, [value])
    address = IPv4Address("TCP", host, 1) if host else UNIXAddress(b"/tmp/s")
    request.getClientAddress = lambda: address
    timestamp = "[29/Nov/2026:00:00:00 +0000]"
    assert access_line(timestamp, request) == combinedLogFormatter(timestamp, request)
