"""Checking a user's password (or static token) without stalling the proxy.

bcrypt is slow on purpose (tens of milliseconds a check), so checks run in
a small thread pool of their own, a bounded number wait for it, and a
password that checked out is remembered for a while as an HMAC under a
key of this process: ``docker pull`` logs in once per repository, and a
client sending Basic on every request costs one bcrypt check, not one each.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

import attrs
import bcrypt
from twisted.internet.interfaces import IReactorTime

from ..errors import RegistryError
from ..runtime import Threads
from .files import WatchedFile, token_key

#: bcrypt reads no more than 72 bytes of a password (as htpasswd does)
BCRYPT_MAX = 72
#: seconds a password that checked out is trusted without bcrypt
REMEMBER = 300.0
#: checks that may wait for the pool at once; more answer 429
MAX_WAITING = 32


@attrs.frozen
class _Known:
    mac: bytes
    generation: int
    until: float


def _checkpw(password: bytes, hashed: bytes) -> bool:
    try:
        return bcrypt.checkpw(password[:BCRYPT_MAX], hashed)
    except ValueError:  # a hash bcrypt cannot read: no password matches it
        return False


class Passwords:
    """Whether a user's password is right, by the htpasswd file or, for a
    robot, by its static token given as the password."""

    def __init__(
        self,
        users: WatchedFile[dict[str, bytes]] | None,
        tokens: WatchedFile[dict[bytes, str]] | None,
        clock: IReactorTime,
        threads: Threads,
        max_waiting: int = MAX_WAITING,
    ) -> None:
        self._users = users
        self._tokens = tokens
        self._clock = clock
        self._threads = threads
        self._max_waiting = max_waiting
        self._waiting = 0
        self._key = secrets.token_bytes(32)
        #: user -> the password that last checked out (as an HMAC); bounded
        #: by the users in the file
        self._known: dict[str, _Known] = {}
        #: the tokens file's content last seen, and the users it names
        self._robots: tuple[dict[bytes, str] | None, frozenset[str]] = (None, frozenset())

    def close(self) -> None:
        self._threads.stop()

    def generation(self) -> tuple[int, int]:
        """Moves when the users' or the tokens' file is read again (looked
        at now, as every login does): what was let in before is asked again."""
        seen = []
        for watched in (self._users, self._tokens):
            if watched is not None:
                watched.current()
            seen.append(watched.generation if watched is not None else 0)
        return seen[0], seen[1]

    def token_user(self, token: str) -> str | None:
        """The user a static token belongs to, or None."""
        if self._tokens is None:
            return None
        return self._tokens.current().get(token_key(token))

    def exists(self, user: str) -> bool:
        """Whether *user* is in the htpasswd or the tokens file now: the
        tokens of a user since removed let nobody in."""
        if self._users is not None and user in self._users.current():
            return True
        if self._tokens is None:
            return False
        tokens = self._tokens.current()
        if self._robots[0] is not tokens:  # read again: its users, once per change
            self._robots = (tokens, frozenset(tokens.values()))
        return user in self._robots[1]

    async def check(self, user: str, password: str) -> bool:
        if self.token_user(password) == user:
            return True
        if self._users is None:
            return False
        users = self._users.current()
        hashed = users.get(user)
        secret = password.encode("utf-8", "replace")
        mac = hmac.new(self._key, user.encode() + b"\0" + secret, hashlib.sha256).digest()
        now = self._clock.seconds()
        known = self._known.get(user)
        if (
            known is not None
            and known.until > now
            and known.generation == self._users.generation
            and hmac.compare_digest(known.mac, mac)
        ):
            return True
        if hashed is None:
            # an unknown user costs what a known one does: no telling them apart
            hashed = next(iter(users.values()), None)
            if hashed is None:
                return False
            await self._bcrypt(secret, hashed)
            return False
        if not await self._bcrypt(secret, hashed):
            return False
        self._known[user] = _Known(mac, self._users.generation, now + REMEMBER)
        return True

    async def _bcrypt(self, secret: bytes, hashed: bytes) -> bool:
        if self._waiting >= self._max_waiting:
            raise RegistryError(
                429,
                "TOOMANYREQUESTS",
                "too many logins at once: try again in a moment",
                headers={"Retry-After": "1"},
            )
        self._waiting += 1
        try:
            return await self._threads.run(_checkpw, secret, hashed)
        finally:
            self._waiting -= 1
