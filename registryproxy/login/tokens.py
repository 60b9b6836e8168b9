"""The short-lived tokens of regproxy's token endpoint (JWTs, HS256).

A token names its user (``sub``; empty for an anonymous one) and lists
the pull scopes asked for.  It grants nothing by itself: every request is
checked against ``proxy.auth.rules`` for the token's user, so a token is
never worth more than its user, and a rule changed by a restart applies to
tokens issued before.  The signing key is the node's (a file in the cache
directory, kept across restarts) or, in a cluster, derived from the
cluster's shared secret, so any node accepts any node's tokens.
"""

from __future__ import annotations

import collections
import contextlib
import datetime
import hashlib
import hmac
import os
import re
import secrets
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

import attrs
import jwt
from twisted.internet.interfaces import IReactorTime

ISSUER = "regproxy"
#: seconds of clock difference between nodes that a token's times allow
LEEWAY = 30
#: the longest token looked at: more is no token of ours
MAX_TOKEN = 4096
#: scopes one token may list
MAX_SCOPES = 64
#: tokens whose check is remembered (PyJWT takes ~0.3 ms a check, more
#: than a cached manifest's whole answer; a client sends its token with
#: every request)
REMEMBERED = 10_000
#: the longest scope looked at
MAX_SCOPE = 512
_TYPE = re.compile(r"[a-z]{1,32}(?:\([a-z0-9]{1,32}\))?")


@attrs.frozen
class Scope:
    type: str
    name: str
    actions: tuple[str, ...]

    def claim(self) -> dict[str, Any]:
        return {"type": self.type, "name": self.name, "actions": list(self.actions)}


def parse_scopes(values: Sequence[str]) -> list[Scope]:
    """The scopes of a token request's ``scope`` parameters (each may hold
    several, space-separated); ValueError naming a malformed one.  Only
    pull on repositories is ever granted: regproxy is read-only."""
    scopes = []
    for value in values:
        for item in value.split():
            parts = item.split(":")
            kind, name, actions = parts[0], ":".join(parts[1:-1]), parts[-1]
            if len(item) > MAX_SCOPE or not name or not _TYPE.fullmatch(kind):
                raise ValueError(f"scope {item[:100]!r} is not TYPE:NAME:ACTIONS")
            asked = actions.split(",")
            pull = kind.startswith("repository") and ("pull" in asked or "*" in asked)
            scopes.append(Scope(kind, name, ("pull",) if pull else ()))
            if len(scopes) > MAX_SCOPES:
                raise ValueError(f"more than {MAX_SCOPES} scopes in one token request")
    return scopes


class Invalid(Exception):
    """A bearer token that is none of ours, or expired."""


class Tokens:
    def __init__(
        self, key: Callable[[], bytes], service: str, ttl: float, clock: IReactorTime
    ) -> None:
        self._key = key
        self._service = service
        self._ttl = int(ttl)
        self._clock = clock
        #: token -> (its user, when it expires), oldest first
        self._checked: collections.OrderedDict[str, tuple[str | None, int]] = (
            collections.OrderedDict()
        )

    def issue(self, user: str | None, scopes: Sequence[Scope]) -> dict[str, Any]:
        """The token endpoint's answer for *user* (None: anonymous)."""
        now = int(self._clock.seconds())
        claims = {
            "iss": ISSUER,
            "sub": user or "",
            "aud": self._service,
            "iat": now,
            "nbf": now - LEEWAY,
            "exp": now + self._ttl,
            "jti": secrets.token_urlsafe(12),
            "access": [scope.claim() for scope in scopes],
        }
        token = jwt.encode(claims, self._key(), algorithm="HS256")
        issued = _rfc3339(now)
        return {"token": token, "access_token": token, "expires_in": self._ttl, "issued_at": issued}

    def user(self, token: str) -> str | None:
        """The user a token of ours names (None: anonymous); Invalid if it
        is not ours or has expired."""
        known = self._checked.get(token)
        if known is not None:
            if self._clock.seconds() <= known[1] + LEEWAY:
                return known[0]
            del self._checked[token]
            raise Invalid("expired")
        if len(token) > MAX_TOKEN:
            raise Invalid("too long")
        try:
            claims = jwt.decode(
                token,
                self._key(),
                algorithms=["HS256"],
                audience=self._service,
                issuer=ISSUER,
                leeway=LEEWAY,
                # times are checked below by the reactor's clock (tests move it)
                options={
                    "require": ["exp", "iat", "sub", "aud", "iss"],
                    "verify_exp": False,
                    "verify_iat": False,
                    "verify_nbf": False,
                },
            )
        except jwt.PyJWTError as e:
            raise Invalid(str(e)) from None
        issued, expires = claims["iat"], claims["exp"]
        if not (isinstance(issued, int) and isinstance(expires, int)):
            raise Invalid("no times")
        if not issued - LEEWAY <= self._clock.seconds() <= expires + LEEWAY:
            raise Invalid("expired")
        sub = claims["sub"]
        if not isinstance(sub, str):
            raise Invalid("no subject")
        self._checked[token] = (sub or None, expires)
        if len(self._checked) > REMEMBERED:
            self._checked.popitem(last=False)
        return sub or None


def _rfc3339(seconds: int) -> str:
    return datetime.datetime.fromtimestamp(seconds, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def node_key(directory: str) -> Callable[[], bytes]:
    """A single node's signing key: 32 random bytes in *directory*'s
    ``login.key`` (mode 0600), made on first use and kept across restarts."""
    path = os.path.join(directory, "login.key")
    if not os.path.exists(path):
        # written whole, then linked into place: never a half-written key
        fd, temporary = tempfile.mkstemp(dir=directory, prefix=".login.key.")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(secrets.token_bytes(32))
                f.flush()
                os.fsync(f.fileno())
            with contextlib.suppress(FileExistsError):  # another made it first
                os.link(temporary, path)
        finally:
            os.unlink(temporary)
    with open(path, "rb") as f:
        key = f.read()
    if len(key) < 32:
        raise OSError(f"{path} holds no key: remove it, and a new one is made")
    return lambda: key


def cluster_key(secret: Callable[[], str]) -> Callable[[], bytes]:
    """A cluster's signing key, the same on every node: derived from the
    cluster's shared secret (known once the node has joined)."""

    def key() -> bytes:
        shared = secret()
        if not shared:
            raise RuntimeError("the node has not joined its cluster yet")
        return hmac.new(shared.encode(), b"regproxy client tokens", hashlib.sha256).digest()

    return key
