"""Authorization against one upstream registry: Basic and the bearer-token dance.

A registry that wants a token answers ``401`` with a challenge such as::

    WWW-Authenticate: Bearer realm="https://auth.docker.io/token",
        service="registry.docker.io",scope="repository:library/alpine:pull"

:class:`Authenticator` turns such challenges into an ``Authorization`` header
value: it asks the realm (the token service) for a token, caches it per scope
until shortly before it expires, and lets concurrent requests for the same
token share one round trip. The upstream's username and password go to the
token service only if it is on the upstream's own site (same host or same
registrable domain) and the request does not downgrade from https to http.

Credentials never reach the log; messages name the realm and the scope only.
"""

from __future__ import annotations

import base64
import functools
import ipaddress
import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, cast
from urllib.parse import urlsplit

import attrs
from publicsuffixlist import PublicSuffixList
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from ..bounded import Bounded
from ..errors import describe_failure
from ..singleflight import SingleFlight
from .body import BodyTooLarge, read_body

log = Logger()

#: The distribution token spec's default lifetime for a token without ``expires_in``.
DEFAULT_TOKEN_LIFETIME = 60.0
#: A cached token is dropped this many seconds before it expires (at most half its life).
EXPIRY_MARGIN = 10.0
#: A token response larger than this is refused (real ones are a few KiB).
MAX_TOKEN_RESPONSE = 1024 * 1024


@attrs.frozen
class Challenge:
    """One challenge of a ``WWW-Authenticate`` header."""

    #: lower-cased: ``"bearer"``, ``"basic"``, ...
    scheme: str
    #: names lower-cased, values unquoted and unescaped
    params: Mapping[str, str] = attrs.field(factory=dict)


# RFC 7230 token characters, and RFC 7235 token68.
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_TOKEN68 = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
_OWS = re.compile(r"[ \t]*")
_RWS = re.compile(r"[ \t]+")
# A param value that is not a quoted-string: stricter than a token would
# reject real-world unquoted URLs (realm=https://...), so take anything
# up to whitespace, a comma or a quote.
_BARE_VALUE = re.compile(r"[^\s,\"]+")


def parse_www_authenticate(values: Sequence[str]) -> list[Challenge]:
    """All challenges in all ``WWW-Authenticate`` header lines, in order.

    Follows RFC 7235 (several challenges per line, comma-separated params,
    quoted-strings with backslash escapes, token68, optional whitespace,
    case-insensitive names) and is lenient beyond it: never raises, and skips
    whatever it cannot parse up to the next comma. The first of duplicate
    params wins; a token68 (``Negotiate abc==``) is accepted and dropped.
    """
    challenges: list[Challenge] = []
    for value in values:
        if isinstance(value, bytes):
            value = value.decode("latin-1")
        if isinstance(value, str):
            challenges.extend(_parse_line(value))
    return challenges


def _parse_line(line: str) -> list[Challenge]:
    found: list[tuple[str, dict[str, str]]] = []
    pos, end = 0, len(line)
    while pos < end:
        # Skip list separators (and empty list elements).
        while pos < end and line[pos] in " \t,":
            pos += 1
        if pos >= end:
            break
        param = _parse_param(line, pos)
        if param is not None:
            name, value, pos = param
            if found:
                found[-1][1].setdefault(name, value)
        else:
            scheme = _TOKEN.match(line, pos)
            if scheme is None or _is_param_start(line, scheme.end()):
                # garbage, or a param with a broken value: not a scheme
                pos = _skip_element(line, pos)
                continue
            pos = scheme.end()
            found.append((scheme.group().lower(), {}))
            space = _RWS.match(line, pos)
            if space is None:
                # "Bearer," or "Bearer" at the end: no params. Anything else
                # glued to the scheme is garbage.
                if pos < end and line[pos] != ",":
                    pos = _skip_element(line, pos)
                continue
            pos = space.end()
            token68 = _TOKEN68.match(line, pos)
            if token68 is not None and _at_element_end(line, token68.end()):
                pos = token68.end()
                continue
            param = _parse_param(line, pos)
            if param is None:
                pos = _skip_element(line, pos)
                continue
            name, value, pos = param
            found[-1][1].setdefault(name, value)
        if not _at_element_end(line, pos):
            pos = _skip_element(line, pos)
    return [Challenge(scheme, params) for scheme, params in found]


def _at_element_end(line: str, pos: int) -> bool:
    pos = _OWS.match(line, pos).end()  # type: ignore[union-attr]  # always matches
    return pos >= len(line) or line[pos] == ","


def _is_param_start(line: str, pos: int) -> bool:
    """Whether a token ending at *pos* is followed by ``BWS =``, making it a param name."""
    pos = _OWS.match(line, pos).end()  # type: ignore[union-attr]
    return pos < len(line) and line[pos] == "="


def _parse_param(line: str, pos: int) -> tuple[str, str, int] | None:
    """``name BWS = BWS (token / quoted-string)`` at *pos*: (name, value, end) or None."""
    name = _TOKEN.match(line, pos)
    if name is None:
        return None
    if not _is_param_start(line, name.end()):
        return None
    pos = _OWS.match(line, name.end()).end()  # type: ignore[union-attr]
    pos = _OWS.match(line, pos + 1).end()  # type: ignore[union-attr]
    if pos < len(line) and line[pos] == '"':
        quoted = _parse_quoted(line, pos)
        if quoted is None:
            return None
        value, pos = quoted
    else:
        bare = _BARE_VALUE.match(line, pos)
        if bare is None:
            return None
        value, pos = bare.group(), bare.end()
    return name.group().lower(), value, pos


def _parse_quoted(line: str, pos: int) -> tuple[str, int] | None:
    """The quoted-string starting at ``line[pos] == '"'``: (unescaped, end) or None."""
    out: list[str] = []
    pos += 1
    while pos < len(line):
        char = line[pos]
        if char == '"':
            return "".join(out), pos + 1
        if char == "\\" and pos + 1 < len(line):
            pos += 1
            char = line[pos]
        out.append(char)
        pos += 1
    return None  # unterminated


def _skip_element(line: str, pos: int) -> int:
    """Past the garbage at *pos*: to the next comma outside quotes, or the end."""
    in_quotes = False
    while pos < len(line):
        char = line[pos]
        if in_quotes and char == "\\":
            pos += 1
        elif char == '"':
            in_quotes = not in_quotes
        elif char == "," and not in_quotes:
            return pos
        pos += 1
    return pos


class AuthError(Exception):
    """The token service failed; ``str()`` names the realm and what happened."""

    def __init__(self, realm: str, problem: str, status: int | None = None) -> None:
        super().__init__(f"token service {realm}: {problem}")
        self.realm = realm
        self.problem = problem
        #: the status it answered, if it answered and that is the problem
        self.status = status


class HTTPClient(Protocol):
    """What :class:`Authenticator` needs of an HTTP client: ``treq.client.HTTPClient``."""

    @property
    def get(self) -> Callable[..., Deferred[Any]]: ...


class _Seconds(Protocol):
    def seconds(self) -> float: ...


@attrs.frozen
class _Token:
    header: str
    expires_at: float


#: an upstream's tokens kept at most: entries, and bytes of scope and header
TOKENS_KEPT = 1000
TOKENS_BYTES = 2 * 1024 * 1024


@attrs.frozen
class _TokenRequest:
    realm: str
    params: tuple[tuple[str, str], ...]
    with_credentials: bool


@functools.cache
def _public_suffixes() -> PublicSuffixList:
    return PublicSuffixList()


def _host(url: str) -> str:
    return (urlsplit(url).hostname or "").rstrip(".").lower()


def _same_site(host: str, other: str) -> bool:
    """Same host, or both under one registrable domain.

    ``auth.docker.io`` ~ ``registry-1.docker.io``; an IP address only matches itself.
    """
    if not host or not other:
        return False
    if host == other:
        return True
    for name in (host, other):
        try:
            ipaddress.ip_address(name.strip("[]"))
        except ValueError:
            continue
        return False  # an IP address is only ever the same as itself
    site = _public_suffixes().privatesuffix(host)
    return site is not None and site == _public_suffixes().privatesuffix(other)


def _lifetime(data: Mapping[str, Any]) -> float:
    value = data.get("expires_in")
    if isinstance(value, bool):
        return DEFAULT_TOKEN_LIFETIME
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return DEFAULT_TOKEN_LIFETIME
    if isinstance(value, (int, float)) and math.isfinite(value):
        return max(0.0, float(value))
    return DEFAULT_TOKEN_LIFETIME


class Authenticator:
    """Authorization header values for one upstream, with a token cache."""

    def __init__(
        self,
        upstream_url: str,
        username: str | None,
        password: str | None,
        http: HTTPClient,
        clock: IReactorTime,
        timeout: float = 30.0,
    ) -> None:
        self._upstream = upstream_url
        self._upstream_scheme = urlsplit(upstream_url).scheme.lower()
        self._upstream_host = _host(upstream_url)
        self._username = username
        self._basic: str | None = None
        if username is not None and password is not None:
            pair = f"{username}:{password}".encode()
            self._basic = "Basic " + base64.b64encode(pair).decode("ascii")
        self._http = http
        self._clock = clock
        # The zope interface's methods lack `self` for plain mypy (no mypy-zope).
        self._now = cast(_Seconds, clock).seconds
        self._timeout = timeout
        self._wants_basic = False
        # one per repository scope asked for: clients choose the names, and
        # Docker Hub gives any name a token, so they are bounded
        self._tokens: Bounded[str, _Token] = Bounded(TOKENS_BYTES, TOKENS_KEPT)
        self._flights: SingleFlight[_TokenRequest, _Token] = SingleFlight()

    def __repr__(self) -> str:
        return f"<Authenticator for {self._upstream}>"

    def cached(self, scope: str) -> str | None:
        """The header to send proactively for *scope*, or ``None``.

        An unexpired cached token, else Basic if this upstream was seen to want it.
        """
        token = self._tokens.get(scope, self._now())
        if token is not None:
            return token.header
        if self._wants_basic:
            return self._basic
        return None

    def invalidate(self, scope: str) -> None:
        """Forget the token for *scope* (the upstream still answered 401 to it)."""
        self._tokens.drop(scope)

    async def authorize(self, challenges: Sequence[Challenge], scope: str) -> str | None:
        """After a 401: the header to retry with, or ``None`` if no challenge is usable.

        Bearer is preferred to Basic. Raises :class:`AuthError` if the token
        service fails.
        """
        for challenge in challenges:
            if challenge.scheme == "bearer":
                request = self._token_request(challenge, scope)
                if request is not None:
                    token = await self._flights.run(
                        request, functools.partial(self._timed_fetch, request)
                    )
                    if token.expires_at > self._now():
                        size = len(scope) + len(token.header)
                        self._tokens.put(scope, token, size, token.expires_at)
                    return token.header
        for challenge in challenges:
            if challenge.scheme == "basic":
                if self._basic is None:
                    log.warn(
                        "{upstream} asks for Basic auth but has no username and password "
                        "configured",
                        upstream=self._upstream,
                    )
                    return None
                self._wants_basic = True
                return self._basic
        return None

    def _token_request(self, challenge: Challenge, scope: str) -> _TokenRequest | None:
        realm = challenge.params.get("realm", "")
        parts = urlsplit(realm)
        if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
            log.warn(
                "ignoring a bearer challenge from {upstream}: realm {realm!r} is not an "
                "http(s) URL",
                upstream=self._upstream,
                realm=realm,
            )
            return None
        params: list[tuple[str, str]] = []
        if challenge.params.get("service"):
            params.append(("service", challenge.params["service"]))
        # A challenge's scope may list several, space-separated; the spec
        # sends each as its own scope parameter.
        for one in (challenge.params.get("scope") or scope).split():
            params.append(("scope", one))
        with_credentials = self._basic is not None and self._may_send_credentials(realm)
        if with_credentials and self._username:
            params.append(("account", self._username))
        return _TokenRequest(realm, tuple(params), with_credentials)

    def _may_send_credentials(self, realm: str) -> bool:
        parts = urlsplit(realm)
        if self._upstream_scheme == "https" and parts.scheme.lower() != "https":
            log.warn(
                "not sending the credentials for {upstream} to {realm}: it is not https",
                upstream=self._upstream,
                realm=realm,
            )
            return False
        if not _same_site(_host(realm), self._upstream_host):
            log.warn(
                "not sending the credentials for {upstream} to {realm}: it is another site; "
                "asking for an anonymous token",
                upstream=self._upstream,
                realm=realm,
            )
            return False
        return True

    async def _timed_fetch(self, request: _TokenRequest) -> _Token:
        """:meth:`_fetch`, given up after the timeout; run once for every
        concurrent caller by :class:`SingleFlight`, so a caller that gives up
        (is cancelled) does not cancel it for the others."""

        def timed_out(result: Any, timeout: float) -> Any:
            # Called only if the timeout fired; cancelling shows up as some
            # failure (CancelledError, ResponseNeverReceived, ...).
            if isinstance(result, Failure):
                raise AuthError(request.realm, f"no answer within {timeout:g} s")
            return result

        fetch = Deferred.fromCoroutine(self._fetch(request))
        fetch.addTimeout(self._timeout, self._clock, onTimeoutCancel=timed_out)
        return await fetch

    async def _fetch(self, request: _TokenRequest) -> _Token:
        realm = request.realm
        scopes = " ".join(value for name, value in request.params if name == "scope")
        log.info(
            "asking {realm} for a token for {scope} ({how})",
            realm=realm,
            scope=scopes,
            how="with credentials" if request.with_credentials else "anonymously",
        )
        started = self._now()
        headers = {"Accept": ["application/json"]}
        if request.with_credentials and self._basic is not None:
            headers["Authorization"] = [self._basic]
        try:
            # a redirect is not followed: it could lead anywhere, unchecked
            response = await self._http.get(
                realm, params=list(request.params), headers=headers, allow_redirects=False
            )
            body = await read_body(response, MAX_TOKEN_RESPONSE, self._timeout, self._clock)
        except CancelledError:
            raise
        except BodyTooLarge:
            raise AuthError(realm, f"answered with more than {MAX_TOKEN_RESPONSE} bytes") from None
        except Exception as e:  # any connection-level failure
            raise AuthError(realm, f"could not fetch a token: {describe_failure(e)}") from None

        if 300 <= response.code < 400:
            location = response.headers.getRawHeaders("Location", [""])[-1]
            raise AuthError(
                realm,
                f"answered {response.code}, a redirect to {location!r}, which regproxy does "
                "not follow for a token; give the upstream's real token service",
                response.code,
            )
        if not 200 <= response.code < 300:
            raise AuthError(realm, self._status_problem(response, body, request), response.code)
        try:
            data = json.loads(body)
        except ValueError:
            raise AuthError(
                realm, f"answered {response.code} with a body that is not JSON"
            ) from None
        if not isinstance(data, dict):
            raise AuthError(realm, "answered with JSON that is not an object")
        token = data.get("token") or data.get("access_token")
        if not isinstance(token, str) or not token:
            raise AuthError(realm, "answered without a token (no 'token' or 'access_token')")
        if any(not "\x21" <= char <= "\x7e" for char in token):
            raise AuthError(realm, "answered with a token that cannot go in a header")
        # Measured from when we asked, on our own clock: issued_at is the
        # token service's clock, which need not agree with ours.
        lifetime = _lifetime(data)
        expires_at = started + lifetime - min(EXPIRY_MARGIN, lifetime / 2)
        log.info(
            "got a token from {realm} for {scope}, valid {lifetime:g} s",
            realm=realm,
            scope=scopes,
            lifetime=lifetime,
        )
        return _Token(f"Bearer {token}", expires_at)

    def _status_problem(self, response: Any, body: bytes, request: _TokenRequest) -> str:
        phrase = response.phrase.decode("latin-1", "replace") if response.phrase else ""
        status = f"{response.code} {phrase}".strip()
        detail = body[:200].decode("utf-8", "replace").strip()
        detail = re.sub(r"\s+", " ", detail)
        problem = f"refused a token ({status})"
        if detail:
            problem += f": {detail}"
        if response.code in (401, 403):
            if request.with_credentials:
                problem += "; check the username and password configured for " + self._upstream
            elif self._basic is None:
                problem += (
                    "; this upstream may need a username and password in the config for "
                    + self._upstream
                )
            else:
                problem += (
                    "; the credentials for " + self._upstream + " were not sent to it because "
                    "it is not on the upstream's own site (same domain, https)"
                )
        return problem
