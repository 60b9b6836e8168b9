"""The /v2/ port's door: who a request comes from, whether they may pull
what they ask for, and the token endpoint clients log in at.

The registry token flow that docker, podman, skopeo and containerd speak:
a request without credentials gets ``401`` and a ``Bearer`` challenge
naming regproxy's own token endpoint (``/token``); the client asks it for a
token with Basic credentials (GET) or an OAuth2 password grant (POST, as
containerd does), then sends the token.  Basic credentials and static
tokens are also taken on /v2/ requests directly (curl, robots).
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs, urlsplit

import attrs
from twisted.internet.defer import TimeoutError
from twisted.logger import Logger
from twisted.web.server import Request

from ..config import AuthConfig
from ..errors import RegistryError
from ..runtime import IReactor, Threads
from .failures import FailedLogins
from .files import WatchedFile, parse_htpasswd, parse_tokens
from .passwords import Passwords
from .policy import Decision, Policy
from .tokens import Invalid, Tokens, parse_scopes

log = Logger()

#: the longest Authorization header looked at
MAX_AUTHORIZATION = 8192
#: the longest user name or password taken
MAX_CREDENTIAL = 1024
_SCOPE_NAME = re.compile(r"[a-z0-9][a-z0-9._/:-]{0,254}")
_HOST = re.compile(r"[A-Za-z0-9.\-]{1,253}(?::[0-9]{1,5})?|\[[0-9A-Fa-f:.]{2,45}\](?::[0-9]{1,5})?")


@attrs.frozen
class Identity:
    #: the user; None: anonymous
    user: str | None
    #: whether the request carried credentials or a token (an anonymous
    #: token counts: the client has been through the token flow)
    presented: bool


ANONYMOUS = Identity(None, False)


class Gate:
    def __init__(
        self,
        config: AuthConfig,
        passwords: Passwords,
        tokens: Tokens,
        failures: FailedLogins,
        counted: Callable[[str], None] = lambda result: None,
    ) -> None:
        """*counted* is told each password login's result: ok, failed, limited."""
        self._counted = counted
        self._config = config
        self._passwords = passwords
        self._tokens = tokens
        self._failures = failures
        self._policy = Policy(config)

    def close(self) -> None:
        self._passwords.close()

    def generation(self) -> tuple[int, int]:
        """Moves when who may log in changes (a users' or tokens' file read
        again): answers made for the logins before are not used again."""
        return self._passwords.generation()

    # -- who

    async def identify(self, request: Request, name: str | None = None) -> Identity:
        """Who *request* (for repository *name*, if any) comes from; a 401
        (with the challenge, naming the scope to ask for) for credentials or
        a token that are wrong, 429 past too many failures."""
        header = request.getHeader(b"Authorization")
        if header is None:
            return ANONYMOUS
        scheme, value = _split(header, request)
        if scheme == "bearer":
            user = self._passwords.token_user(value)
            if user is not None:
                return Identity(user, True)
            try:
                named = self._tokens.user(value)
                if named is not None and not self._passwords.exists(named):
                    raise Invalid(f"{named} is no longer a user")
                return Identity(named, True)
            except Invalid:
                raise self.challenge(
                    request,
                    "your token is not valid here (expired?): log in again",
                    scope=name,
                    error="invalid_token",
                ) from None
        if scheme == "basic":
            user, password = _basic(value, request, self)
            if await self._login(request, user, password):
                return Identity(user, True)
            raise self.challenge(request, "wrong user name or password", scope=name)
        raise self.challenge(
            request, f"{scheme!r} is not an authentication scheme regproxy takes: log in", name
        )

    async def _login(self, request: Request, user: str, password: str) -> bool:
        address = _address(request)
        try:
            wait = await self._failures.turn(address)
        except TimeoutError:
            wait = 1.0  # its logins at once wait for each other: a moment
        if wait is not None:
            self._counted("limited")
            seconds = str(max(1, math.ceil(wait)))
            raise RegistryError(
                429,
                "TOOMANYREQUESTS",
                f"too many failed logins from {address}: try again in {seconds} s",
                headers={"Retry-After": seconds},
            )
        try:
            right = await self._passwords.check(user, password)
            if not right:  # counted before the next one's turn
                self._counted("failed")
                self._failures.failed(address)
        finally:
            self._failures.done(address)
        if right:
            self._counted("ok")
            return True
        log.info("failed login as {user!r} from {address}", user=user[:64], address=address)
        return False

    # -- what

    def check_base(self, identity: Identity, request: Request) -> None:
        """``GET /v2/``: 200 only for a client that logged in (or holds an
        anonymous token where anonymous pulls are allowed), so ``docker
        login`` learns whether its password is right."""
        if not identity.presented or (identity.user is None and not self._config.anonymous):
            raise self.challenge(request, "log in to use this regproxy")

    def admit(
        self,
        identity: Identity,
        request: Request,
        upstream: str,
        repository: str,
        library_prefix: bool,
        name: str,
    ) -> bool:
        """Raise the 401 or 403 for a refused pull of *repository* (the
        client's *name* for it); True if a rule names the user for it, so
        that even a private upstream repository is theirs to pull."""
        decision = self._policy.decide(identity.user, upstream, repository, library_prefix)
        if decision is Decision.REFUSED:
            if identity.user is None:
                raise self.challenge(request, f"log in to pull {name}", scope=name)
            raise RegistryError(
                403,
                "DENIED",
                f"{identity.user} may not pull {upstream}/{repository} on this regproxy "
                "(proxy.auth.rules): ask its operator",
            )
        return decision is Decision.NAMED

    def challenge(
        self, request: Request, message: str, scope: str | None = None, error: str | None = None
    ) -> RegistryError:
        """The 401 that sends a client to the token endpoint."""
        value = f'Bearer realm="{self._realm(request)}",service="{self._config.service}"'
        # a name as the client wrote it in the path: only a well-formed one
        # goes into the header
        if scope is not None and _SCOPE_NAME.fullmatch(scope):
            value += f',scope="repository:{scope}:pull"'
        if error is not None:
            value += f',error="{error}"'
        return RegistryError(401, "UNAUTHORIZED", message, headers={"WWW-Authenticate": value})

    def _realm(self, request: Request) -> str:
        if self._config.realm is not None:
            return self._config.realm
        host = (request.getHeader(b"Host") or b"").decode("latin-1")
        if not _HOST.fullmatch(host):
            address = request.getHost()
            host = f"{getattr(address, 'host', '127.0.0.1')}:{getattr(address, 'port', 80)}"
        return f"{'https' if request.isSecure() else 'http'}://{host}/token"

    # -- the token endpoint

    async def token(self, request: Request) -> bytes:
        """The body of the token endpoint's answer (GET: Basic credentials,
        or none for an anonymous token; POST: an OAuth2 password grant)."""
        scopes_given = _args(request, "scope")
        if request.method == b"POST":
            form = _form(request)
            grant = (form.get("grant_type") or [""])[-1]
            if grant != "password":
                raise RegistryError(
                    400,
                    "UNSUPPORTED",
                    f"grant_type {grant[:40]!r}: regproxy takes grant_type=password only "
                    "(it issues no refresh tokens)",
                )
            user = (form.get("username") or [""])[-1]
            password = (form.get("password") or [""])[-1]
            identity = await self._password_grant(request, user, password)
        else:
            identity = await self.identify(request)
        request.login_user = identity.user  # type: ignore[attr-defined]
        if identity.user is None and not self._config.anonymous:
            raise RegistryError(
                401,
                "UNAUTHORIZED",
                "log in: this regproxy serves no anonymous pulls",
                headers={"WWW-Authenticate": f'Basic realm="{self._config.service}"'},
            )
        try:
            scopes = parse_scopes(scopes_given)
        except ValueError as e:
            raise RegistryError(400, "UNSUPPORTED", str(e)) from None
        answer: dict[str, Any] = self._tokens.issue(identity.user, scopes)
        if request.method == b"POST":
            del answer["token"]
            answer["scope"] = " ".join(f"{s.type}:{s.name}:{','.join(s.actions)}" for s in scopes)
        request.setHeader(b"Cache-Control", b"no-store")
        return json.dumps(answer).encode()

    async def _password_grant(self, request: Request, user: str, password: str) -> Identity:
        if not user or len(user) > MAX_CREDENTIAL or len(password) > MAX_CREDENTIAL:
            raise RegistryError(
                400, "UNSUPPORTED", "grant_type=password needs a username and password"
            )
        if await self._login(request, user, password):
            return Identity(user, True)
        raise RegistryError(401, "UNAUTHORIZED", "wrong user name or password")


def _split(header: bytes, request: Request) -> tuple[str, str]:
    if len(header) > MAX_AUTHORIZATION:
        raise RegistryError(
            400, "UNAUTHORIZED", f"Authorization header over {MAX_AUTHORIZATION} bytes"
        )
    text = header.decode("latin-1").strip()
    scheme, _, value = text.partition(" ")
    return scheme.lower(), value.strip()


def _basic(value: str, request: Request, gate: Gate) -> tuple[str, str]:
    try:
        decoded = base64.b64decode(value.encode("latin-1"), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise gate.challenge(
            request, "malformed Basic credentials (not base64 of user:password)"
        ) from None
    user, colon, password = decoded.partition(":")
    if not colon or not user or len(user) > MAX_CREDENTIAL or len(password) > MAX_CREDENTIAL:
        raise gate.challenge(request, "malformed Basic credentials (not user:password)")
    return user, password


def _form(request: Request) -> dict[str, list[str]]:
    """A POST's form fields from its body alone (bounded by the proxy's
    body limits); a password in the URL is refused: URLs end up in logs."""
    query = urlsplit(request.uri.decode("latin-1")).query
    if "password" in parse_qs(query, keep_blank_values=True):
        raise RegistryError(
            400,
            "UNSUPPORTED",
            "send the password grant in the POST body, not in the URL (URLs end up in logs)",
        )
    if request.content is None:
        return {}
    request.content.seek(0)
    return parse_qs(request.content.read().decode("utf-8", "replace"), keep_blank_values=True)


def _args(request: Request, key: str) -> list[str]:
    return [v.decode("utf-8", "replace") for v in (request.args or {}).get(key.encode(), [])]


def _address(request: Request) -> str:
    return str(getattr(request.getClientAddress(), "host", "unknown"))


def make_gate(
    config: AuthConfig,
    reactor: IReactor,
    key: Callable[[], bytes],
    counted: Callable[[str], None] = lambda result: None,
) -> Gate:
    """The gate *config* describes, its files read now (OSError or
    FileError if one cannot be), its tokens signed with *key*; *counted*:
    see :class:`Gate`."""
    users = WatchedFile(config.htpasswd, parse_htpasswd, reactor) if config.htpasswd else None
    tokens = WatchedFile(config.tokens, parse_tokens, reactor) if config.tokens else None
    threads = Threads(reactor, "regproxy-login")
    return Gate(
        config,
        Passwords(users, tokens, reactor, threads),
        Tokens(key, config.service, config.token_ttl, reactor),
        FailedLogins(config.max_failures, config.failure_window, reactor),
        counted,
    )
