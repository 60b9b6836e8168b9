"""registryproxy.upstream.auth: challenge parsing, token fetch, cache, single flight."""

from __future__ import annotations

import base64
import json
import random
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import pytest
import pytest_twisted
from treq.testing import StubTreq
from twisted.internet.defer import CancelledError, Deferred, fail
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.logger import LogEvent, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from registryproxy.upstream import auth
from registryproxy.upstream.auth import (
    DEFAULT_TOKEN_LIFETIME,
    EXPIRY_MARGIN,
    Authenticator,
    AuthError,
    Challenge,
    _same_site,
    parse_www_authenticate,
)

# -- parse_www_authenticate ----------------------------------------------------

HUB = (
    'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
    'scope="repository:library/alpine:pull"'
)


def one(line: str) -> list[Challenge]:
    return parse_www_authenticate([line])


def test_docker_hub() -> None:
    assert one(HUB) == [
        Challenge(
            "bearer",
            {
                "realm": "https://auth.docker.io/token",
                "service": "registry.docker.io",
                "scope": "repository:library/alpine:pull",
            },
        )
    ]


def test_docker_hub_insufficient_scope_has_comma_inside_quotes() -> None:
    # The distribution spec's own example: the scope's actions are comma-separated.
    line = (
        'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
        'scope="repository:samalba/my-app:pull,push",error="insufficient_scope"'
    )
    (challenge,) = one(line)
    assert challenge.params["scope"] == "repository:samalba/my-app:pull,push"
    assert challenge.params["error"] == "insufficient_scope"
    assert len(challenge.params) == 4


def test_ghcr() -> None:
    line = (
        'Bearer realm="https://ghcr.io/token",service="ghcr.io",scope="repository:user/image:pull"'
    )
    assert one(line) == [
        Challenge(
            "bearer",
            {
                "realm": "https://ghcr.io/token",
                "service": "ghcr.io",
                "scope": "repository:user/image:pull",
            },
        )
    ]


def test_quay_without_scope() -> None:
    line = 'Bearer realm="https://quay.io/v2/auth",service="quay.io"'
    assert one(line) == [
        Challenge("bearer", {"realm": "https://quay.io/v2/auth", "service": "quay.io"})
    ]


@pytest.mark.parametrize(
    ("line", "params"),
    [
        ('Basic realm="Registry Realm"', {"realm": "Registry Realm"}),
        ('Basic realm="harbor", charset="UTF-8"', {"realm": "harbor", "charset": "UTF-8"}),
        ("Basic", {}),
        ("basic realm=simple", {"realm": "simple"}),
    ],
)
def test_basic(line: str, params: dict[str, str]) -> None:
    assert one(line) == [Challenge("basic", params)]


def test_several_challenges_on_one_line() -> None:
    # RFC 7235 section 4.1's example, with an escaped quote in a value.
    line = (
        'Newauth realm="apps", type=1, title="Login to \\"apps\\"", '
        'Basic realm="simple", Bearer realm="https://r.example/t",service="r.example"'
    )
    assert one(line) == [
        Challenge("newauth", {"realm": "apps", "type": "1", "title": 'Login to "apps"'}),
        Challenge("basic", {"realm": "simple"}),
        Challenge("bearer", {"realm": "https://r.example/t", "service": "r.example"}),
    ]


def test_several_header_lines_keep_order() -> None:
    assert parse_www_authenticate(['Basic realm="a"', HUB, "Negotiate"]) == [
        Challenge("basic", {"realm": "a"}),
        one(HUB)[0],
        Challenge("negotiate", {}),
    ]


def test_escapes_and_commas_inside_quotes() -> None:
    (challenge,) = one(r'Bearer realm="a,b", x="say \"hi\", ok", y="back\\slash", z="\q"')
    assert challenge.params == {"realm": "a,b", "x": 'say "hi", ok', "y": "back\\slash", "z": "q"}


def test_case_and_odd_spacing() -> None:
    line = 'BEARER   Realm = "https://a.example/t" ,\tSERVICE=svc ,scope= "s:1"  , '
    assert one(line) == [
        Challenge("bearer", {"realm": "https://a.example/t", "service": "svc", "scope": "s:1"})
    ]


def test_unquoted_url_value() -> None:
    (challenge,) = one("Bearer realm=https://auth.example/token?x=1,service=auth.example")
    assert challenge.params == {
        "realm": "https://auth.example/token?x=1",
        "service": "auth.example",
    }


def test_token68_is_accepted_and_does_not_eat_the_next_challenge() -> None:
    assert one('Negotiate YIIabc+/==, Basic realm="x"') == [
        Challenge("negotiate", {}),
        Challenge("basic", {"realm": "x"}),
    ]


def test_empty_list_elements() -> None:
    assert one(' , ,Bearer realm="x",, service="y",') == [
        Challenge("bearer", {"realm": "x", "service": "y"})
    ]


def test_first_duplicate_param_wins() -> None:
    (challenge,) = one('Bearer realm="first", REALM="second"')
    assert challenge.params == {"realm": "first"}


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("", []),
        ("   ", []),
        ('"', []),
        ("=", []),
        (",,,", []),
        ('realm="orphan param with no scheme"', []),
        # An unterminated quote loses the param, not the challenge.
        ('Bearer service="s", realm="https://x', [Challenge("bearer", {"service": "s"})]),
        # Garbage between challenges is skipped up to the next comma.
        ('@@@ junk, Basic realm="b"', [Challenge("basic", {"realm": "b"})]),
        (
            'Bearer realm="a" trailing junk, service="s"',
            [Challenge("bearer", {"realm": "a", "service": "s"})],
        ),
        # "token BWS = BWS value" is a param, whatever the token: no scheme here
        ("Bearer =x, Basic", [Challenge("basic", {})]),
        ('Bearer realm=, service="s"', [Challenge("bearer", {"service": "s"})]),
        ('Bearer"glued", Basic', [Challenge("bearer", {}), Challenge("basic", {})]),
    ],
)
def test_garbage_is_skipped(line: str, expected: list[Challenge]) -> None:
    assert one(line) == expected


def test_never_raises_on_random_input() -> None:
    rng = random.Random(7235)
    alphabet = 'Bb aer,=" \\\t\x00é\n;rlm'
    for _ in range(3000):
        line = "".join(rng.choice(alphabet) for _ in range(rng.randrange(40)))
        for challenge in one(line):
            assert challenge.scheme == challenge.scheme.lower() and challenge.scheme
            assert all(name == name.lower() for name in challenge.params)


def test_non_string_values_are_skipped() -> None:
    assert parse_www_authenticate([None, 'Basic realm="x"']) == [  # type: ignore[list-item]
        Challenge("basic", {"realm": "x"})
    ]


# -- a token server -----------------------------------------------------------

USER, PASSWORD = "alice", "s3cr3t-pa55"
BASIC = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()


class TokenServer(Resource):
    """Answers every request with the next configured (status, body); records requests."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[Request] = []
        self.answers: list[tuple[int, bytes]] = []
        self.hold = False
        self.held: list[Request] = []
        self.issued = 0

    def query(self, index: int = -1) -> dict[str, list[str]]:
        args = self.requests[index].args or {}
        return {k.decode(): [v.decode() for v in vs] for k, vs in args.items()}

    def authorization(self, index: int = -1) -> str | None:
        value = self.requests[index].getHeader("authorization")
        return value

    def url(self, index: int = -1) -> str:
        return self.requests[index].uri.decode()

    def next_answer(self) -> tuple[int, bytes]:
        if self.answers:
            return self.answers.pop(0)
        self.issued += 1
        return 200, json.dumps({"token": f"tok{self.issued}", "expires_in": 300}).encode()

    def render_GET(self, request: Request) -> bytes | int:
        self.requests.append(request)
        if self.hold:
            self.held.append(request)
            return NOT_DONE_YET
        code, body = self.next_answer()
        request.setResponseCode(code)
        return body

    def release(self, stub: StubTreq) -> None:
        for request in self.held:
            code, body = self.next_answer()
            request.setResponseCode(code)
            request.write(body)
            request.finish()
        self.held = []
        stub.flush()


class Harness:
    def __init__(
        self,
        upstream: str = "https://registry-1.docker.io",
        creds: bool = False,
        timeout: float = 30.0,
    ) -> None:
        self.server = TokenServer()
        self.stub = StubTreq(self.server)
        self.clock = Clock()
        self.clock.advance(1_000_000)  # a clock that does not start at 0
        self.auth = Authenticator(
            upstream,
            USER if creds else None,
            PASSWORD if creds else None,
            self.stub,
            self.clock,
            timeout=timeout,
        )

    def start(
        self, challenges: list[Challenge], scope: str = "repository:library/alpine:pull"
    ) -> Deferred[str | None]:
        return Deferred.fromCoroutine(self.auth.authorize(challenges, scope))


def bearer(realm: str = "https://auth.docker.io/token", **params: str) -> Challenge:
    return Challenge("bearer", {"realm": realm, **params})


def result(d: Deferred[Any]) -> Any:
    """The result of a Deferred that must already have fired (raises its error)."""
    box: list[Any] = []
    d.addBoth(box.append)
    assert box, "the Deferred has not fired"
    if isinstance(box[0], Failure):
        box[0].raiseException()
    return box[0]


def auth_error(d: Deferred[Any]) -> AuthError:
    with pytest.raises(AuthError) as info:
        result(d)
    return info.value


# -- fetching tokens ------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_anonymous_token_fetch_sends_service_and_scope() -> None:
    h = Harness()
    header = await h.auth.authorize(
        [bearer(service="registry.docker.io")], "repository:library/alpine:pull"
    )
    assert header == "Bearer tok1"
    assert len(h.server.requests) == 1
    assert h.server.url().startswith("/token?")
    assert h.server.query() == {
        "service": ["registry.docker.io"],
        "scope": ["repository:library/alpine:pull"],
    }
    assert h.server.authorization() is None
    assert h.server.requests[0].getHeader("accept") == "application/json"


def test_challenge_scope_is_preferred_and_may_list_several() -> None:
    h = Harness()
    challenge = bearer(service="s", scope="repository:a:pull repository:b:pull,push")
    assert result(h.start([challenge], scope="repository:mine:pull")) == "Bearer tok1"
    assert h.server.query()["scope"] == ["repository:a:pull", "repository:b:pull,push"]


def test_no_service_no_scope_sends_no_query() -> None:
    h = Harness()
    assert result(h.start([bearer()], scope="")) == "Bearer tok1"
    assert h.server.query() == {}


def test_realm_query_is_kept() -> None:
    h = Harness()
    result(h.start([bearer("https://auth.docker.io/token?client=x", service="s")]))
    assert h.server.query() == {
        "client": ["x"],
        "service": ["s"],
        "scope": ["repository:library/alpine:pull"],
    }


@pytest.mark.parametrize(
    ("upstream", "realm"),
    [
        ("https://registry-1.docker.io", "https://auth.docker.io/token"),
        ("https://ghcr.io", "https://ghcr.io/token"),
        ("https://REGISTRY.example.com:5000", "https://auth.example.com/token"),
        ("http://127.0.0.1:5000", "http://127.0.0.1:5001/auth"),
        ("http://localhost:5000", "https://localhost:5001/auth"),
    ],
)
def test_credentials_go_to_a_realm_on_the_same_site(upstream: str, realm: str) -> None:
    h = Harness(upstream, creds=True)
    assert result(h.start([bearer(realm, service="s")])) == "Bearer tok1"
    assert h.server.authorization() == BASIC
    assert h.server.query()["account"] == [USER]


@pytest.mark.parametrize(
    ("upstream", "realm"),
    [
        ("https://registry-1.docker.io", "https://evil.example/token"),
        ("https://registry-1.docker.io", "https://docker.io.evil.example/token"),
        # downgrade: never send credentials in clear text
        ("https://registry-1.docker.io", "http://auth.docker.io/token"),
        # github.io is a public suffix: two users' sites are two sites
        ("https://alice.github.io", "https://mallory.github.io/token"),
        ("http://127.0.0.1:5000", "http://127.0.0.2:5000/token"),
        # IP addresses have no registrable domain, however alike their tails
        ("http://10.0.0.1:5000", "http://10.1.0.1:5000/token"),
        ("http://localhost:5000", "http://otherhost:5000/token"),
    ],
)
def test_credentials_never_go_to_another_site(upstream: str, realm: str) -> None:
    h = Harness(upstream, creds=True)
    assert result(h.start([bearer(realm, service="s")])) == "Bearer tok1"
    assert h.server.authorization() is None
    assert "account" not in h.server.query()
    assert urlsplit(realm).path in h.server.url()


@pytest.mark.parametrize(
    ("host", "other", "same"),
    [
        ("::1", "::1", True),
        ("::1", "fe80::1", False),  # (treq cannot request IPv6 literals: tested here)
        ("10.0.0.1", "10.1.0.1", False),
        ("auth.docker.io", "registry-1.docker.io", True),
        ("", "", False),
    ],
)
def test_same_site(host: str, other: str, same: bool) -> None:
    assert _same_site(host, other) is same


@pytest.mark.parametrize(
    "realm", ["ftp://auth.docker.io/token", "/token", "", "file:///etc/passwd", "https://"]
)
def test_realm_that_is_not_http_is_refused(realm: str) -> None:
    h = Harness(creds=True)
    assert result(h.start([bearer(realm, service="s")])) is None
    assert result(h.start([Challenge("bearer", {"service": "s"})])) is None
    assert h.server.requests == []


def test_bearer_with_a_bad_realm_falls_back_to_basic() -> None:
    h = Harness(creds=True)
    challenges = [bearer("ftp://x/token"), Challenge("basic", {"realm": "r"})]
    assert result(h.start(challenges)) == BASIC
    assert h.server.requests == []


def test_bearer_is_preferred_to_basic() -> None:
    h = Harness(creds=True)
    challenges = parse_www_authenticate([f'Basic realm="r", {HUB}'])
    assert result(h.start(challenges)) == "Bearer tok1"
    assert h.auth.cached("other-scope") is None  # Basic was not chosen, so not remembered


def test_basic_with_credentials_is_remembered_for_every_scope() -> None:
    h = Harness(creds=True)
    assert h.auth.cached("any") is None
    assert result(h.start([Challenge("basic", {"realm": "Registry Realm"})])) == BASIC
    assert BASIC == "Basic YWxpY2U6czNjcjN0LXBhNTU="  # base64("alice:s3cr3t-pa55")
    assert h.auth.cached("repository:x:pull") == BASIC
    assert h.auth.cached("") == BASIC
    assert h.server.requests == []


def test_basic_without_credentials_is_not_usable() -> None:
    h = Harness()
    assert result(h.start([Challenge("basic", {"realm": "r"})])) is None
    assert h.auth.cached("repository:library/alpine:pull") is None


def test_no_usable_challenge() -> None:
    h = Harness(creds=True)
    assert result(h.start([])) is None
    assert result(h.start([Challenge("negotiate", {})])) is None
    assert h.server.requests == []


# -- token responses -----------------------------------------------------------


def test_access_token_field() -> None:
    h = Harness()
    h.server.answers = [(200, b'{"access_token": "oauth-tok", "expires_in": 300}')]
    assert result(h.start([bearer()])) == "Bearer oauth-tok"


def test_token_is_preferred_to_access_token() -> None:
    h = Harness()
    h.server.answers = [(200, b'{"token": "T", "access_token": "A"}')]
    assert result(h.start([bearer()])) == "Bearer T"


def test_issued_at_is_accepted() -> None:
    h = Harness()
    h.server.answers = [
        (200, b'{"token": "T", "expires_in": 300, "issued_at": "2009-11-10T23:00:00Z"}')
    ]
    assert result(h.start([bearer()])) == "Bearer T"
    # issued_at is the server's clock (years ago here): the token is still cached.
    assert h.auth.cached("repository:library/alpine:pull") == "Bearer T"


# -- caching --------------------------------------------------------------------

SCOPE = "repository:library/alpine:pull"


def test_token_is_cached_until_shortly_before_expiry() -> None:
    h = Harness()
    assert h.auth.cached(SCOPE) is None
    assert result(h.start([bearer()], SCOPE)) == "Bearer tok1"  # expires_in 300
    assert h.auth.cached(SCOPE) == "Bearer tok1"
    assert h.auth.cached("repository:library/busybox:pull") is None  # per scope

    h.clock.advance(300 - EXPIRY_MARGIN - 0.5)
    assert h.auth.cached(SCOPE) == "Bearer tok1"
    h.clock.advance(1)
    assert h.auth.cached(SCOPE) is None

    assert result(h.start([bearer()], SCOPE)) == "Bearer tok2"
    assert len(h.server.requests) == 2
    assert h.auth.cached(SCOPE) == "Bearer tok2"


def test_tokens_kept_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """A token per repository name a client makes up (Docker Hub gives any
    name one): the least recently used go past the bound."""
    monkeypatch.setattr(auth, "TOKENS_KEPT", 3)
    h = Harness()
    scopes = [f"repository:made-up/{n}:pull" for n in range(5)]
    for scope in scopes:
        assert result(h.start([bearer()], scope)) is not None
    assert [h.auth.cached(scope) for scope in scopes] == [
        None,
        None,
        "Bearer tok3",
        "Bearer tok4",
        "Bearer tok5",
    ]
    assert len(h.auth._tokens) == 3


def test_expires_in_missing_means_sixty_seconds() -> None:
    h = Harness()
    h.server.answers = [(200, b'{"token": "T"}')]
    result(h.start([bearer()], SCOPE))
    assert DEFAULT_TOKEN_LIFETIME == 60
    h.clock.advance(60 - EXPIRY_MARGIN - 0.5)
    assert h.auth.cached(SCOPE) == "Bearer T"
    h.clock.advance(1)
    assert h.auth.cached(SCOPE) is None


@pytest.mark.parametrize(
    ("expires_in", "cached_for"),
    [(4, 2.0), ("120", 110.0), ("soon", 50.0), (True, 50.0), (None, 50.0)],
)
def test_expires_in_odd_values(expires_in: object, cached_for: float) -> None:
    h = Harness()
    h.server.answers = [(200, json.dumps({"token": "T", "expires_in": expires_in}).encode())]
    result(h.start([bearer()], SCOPE))
    h.clock.advance(cached_for - 0.1)
    assert h.auth.cached(SCOPE) == "Bearer T"
    h.clock.advance(0.2)
    assert h.auth.cached(SCOPE) is None


def test_token_that_expires_at_once_is_used_but_not_cached() -> None:
    h = Harness()
    h.server.answers = [(200, b'{"token": "T", "expires_in": 0}')]
    assert result(h.start([bearer()], SCOPE)) == "Bearer T"
    assert h.auth.cached(SCOPE) is None


def test_invalidate_drops_the_token() -> None:
    h = Harness()
    result(h.start([bearer()], SCOPE))
    result(h.start([bearer()], "other"))
    h.auth.invalidate(SCOPE)
    assert h.auth.cached(SCOPE) is None
    assert h.auth.cached("other") == "Bearer tok2"
    h.auth.invalidate("never-cached")  # no error


def test_token_expiry_is_measured_from_the_request() -> None:
    h = Harness(timeout=200)
    h.server.hold = True
    d = h.start([bearer()], SCOPE)
    h.clock.advance(100)  # a slow token service
    h.server.release(h.stub)
    assert result(d) == "Bearer tok1"
    h.clock.advance(300 - 100 - EXPIRY_MARGIN + 0.5)
    assert h.auth.cached(SCOPE) is None


# -- single flight ----------------------------------------------------------------


def test_concurrent_authorize_share_one_request() -> None:
    h = Harness()
    h.server.hold = True
    first, second = h.start([bearer()], SCOPE), h.start([bearer()], SCOPE)
    assert len(h.server.requests) == 1
    assert not first.called and not second.called
    h.server.release(h.stub)
    assert result(first) == result(second) == "Bearer tok1"
    assert len(h.server.requests) == 1

    # The flight is over: a new request after invalidation goes out.
    h.server.hold = False
    h.auth.invalidate(SCOPE)
    assert result(h.start([bearer()], SCOPE)) == "Bearer tok2"
    assert len(h.server.requests) == 2


def test_different_scopes_do_not_share() -> None:
    h = Harness()
    h.server.hold = True
    a, b = h.start([bearer()], "repository:a:pull"), h.start([bearer()], "repository:b:pull")
    assert len(h.server.requests) == 2
    h.server.release(h.stub)
    assert {result(a), result(b)} == {"Bearer tok1", "Bearer tok2"}


def test_a_shared_failure_reaches_everyone_and_is_not_remembered() -> None:
    h = Harness()
    h.server.hold = True
    h.server.answers = [(503, b"down for maintenance")]
    first, second = h.start([bearer()], SCOPE), h.start([bearer()], SCOPE)
    h.server.release(h.stub)
    assert "503" in str(auth_error(first))
    assert "503" in str(auth_error(second))
    h.server.hold = False
    assert result(h.start([bearer()], SCOPE)) == "Bearer tok1"
    assert len(h.server.requests) == 2


def test_a_caller_that_gives_up_does_not_cancel_the_others() -> None:
    h = Harness()
    h.server.hold = True
    first, second = h.start([bearer()], SCOPE), h.start([bearer()], SCOPE)
    first.cancel()
    with pytest.raises(CancelledError):
        result(first)
    h.server.release(h.stub)
    assert result(second) == "Bearer tok1"


# -- errors ---------------------------------------------------------------------

REALM = "https://auth.docker.io/token"


@pytest.mark.parametrize(
    ("status", "body", "says"),
    [
        (500, b"oops", "500"),
        (503, b"", "503"),
        (404, b"no such page", "404"),
        (200, b"<html>not json</html>", "not JSON"),
        (200, b"[1, 2]", "not an object"),
        (200, b'{"expires_in": 300}', "without a token"),
        (200, b'{"token": ""}', "without a token"),
        (200, b'{"token": 42}', "without a token"),
        (200, b'{"token": "a\\r\\nX-Evil: 1"}', "cannot go in a header"),
        (200, b'{"token": "' + b"x" * (1024 * 1024 + 1) + b'"}', "more than"),
    ],
)
def test_token_service_failures_raise_auth_error_naming_the_realm(
    status: int, body: bytes, says: str
) -> None:
    h = Harness()
    h.server.answers = [(status, body)]
    error = auth_error(h.start([bearer(REALM)], SCOPE))
    assert REALM in str(error)
    assert says in str(error)
    assert error.realm == REALM
    assert h.auth.cached(SCOPE) is None


def test_rejected_credentials_say_what_to_check() -> None:
    h = Harness(creds=True)
    h.server.answers = [(401, b'{"details":"incorrect username or password"}')]
    message = str(auth_error(h.start([bearer(REALM)], SCOPE)))
    assert "401" in message and "incorrect username or password" in message
    assert "check the username and password" in message
    assert PASSWORD not in message


def test_anonymous_refusal_suggests_credentials() -> None:
    h = Harness()
    h.server.answers = [(401, b"")]
    message = str(auth_error(h.start([bearer(REALM)], SCOPE)))
    assert "may need a username and password" in message


class FailingHTTP:
    def __init__(self, error: Exception) -> None:
        self.error = error
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def get(self, url: str, **kwargs: Any) -> Deferred[Any]:
        self.calls.append((url, kwargs))
        return fail(self.error)


def test_connection_refused_raises_auth_error() -> None:
    http = FailingHTTP(ConnectionRefusedError("127.0.0.1:1"))
    auth = Authenticator("https://registry-1.docker.io", None, None, http, Clock())
    d = Deferred.fromCoroutine(auth.authorize([bearer(REALM)], SCOPE))
    message = str(auth_error(d))
    assert REALM in message and "ConnectionRefused" in message
    assert len(http.calls) == 1


def test_timeout_raises_auth_error() -> None:
    h = Harness(timeout=7)
    h.server.hold = True
    d = h.start([bearer(REALM)], SCOPE)
    h.clock.advance(6.9)
    assert not d.called
    h.clock.advance(0.2)
    message = str(auth_error(d))
    assert REALM in message and "within 7 s" in message
    # and the next attempt starts afresh
    h.server.hold = False
    assert result(h.start([bearer(REALM)], SCOPE)) == "Bearer tok1"


@pytest.fixture
def log_events() -> Any:
    events: list[LogEvent] = []
    observer: Callable[[LogEvent], None] = events.append
    globalLogPublisher.addObserver(observer)
    yield events
    globalLogPublisher.removeObserver(observer)


def test_credentials_are_never_logged(log_events: list[LogEvent]) -> None:
    h = Harness(creds=True)
    result(h.start([bearer(REALM, service="s")], SCOPE))
    h.server.answers = [(401, b"bad credentials")]
    auth_error(h.start([bearer(REALM, service="s")], "other"))
    result(h.start([bearer("https://evil.example/t")], "third"))
    result(h.start([Challenge("basic", {})], "fourth"))
    text = "\n".join(formatEvent(e) + repr(e) for e in log_events)
    assert REALM in text and SCOPE in text  # it did log, with realm and scope
    assert PASSWORD not in text
    assert BASIC.split()[1] not in text
    assert PASSWORD not in repr(h.auth)
