"""The users' files: an htpasswd file of bcrypt entries, and static tokens.

Both are read again when they change (looked at no more than once a
second), so an operator adds or removes a user without a restart.  A file
that cannot be read or parsed after a change keeps the entries it had, and
says why in the log once per change.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from typing import Generic, TypeVar

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

log = Logger()

T = TypeVar("T")

#: the prefixes of bcrypt hashes (htpasswd -B writes $2y$)
BCRYPT = ("$2a$", "$2b$", "$2y$")
#: the largest users' file read (it is read on the reactor thread: about
#: 100,000 bcrypt lines)
MAX_FILE = 8 * 1024 * 1024
#: the shortest static token accepted: guessable tokens are refused at start
MIN_TOKEN = 16


class FileError(ValueError):
    """A users' file that cannot be used, with the line that is wrong."""


def parse_htpasswd(text: str, path: str) -> dict[str, bytes]:
    """user -> bcrypt hash, from htpasswd lines ``user:$2y$...``."""
    users: dict[str, bytes] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, colon, hashed = line.partition(":")
        if not colon or not user:
            raise FileError(f"{path}:{number}: expected user:hash")
        if not hashed.startswith(BCRYPT) or len(hashed) != 60:
            raise FileError(
                f"{path}:{number}: the entry of {user!r} is not bcrypt: "
                "write it with htpasswd -B (MD5, SHA1 and crypt are refused)"
            )
        users[user] = hashed.encode("ascii", "replace")
    return users


def token_key(token: str) -> bytes:
    """What a static token is looked up by: its hash, never the token."""
    return hashlib.sha256(token.encode("utf-8", "replace")).digest()


def parse_tokens(text: str, path: str) -> dict[bytes, str]:
    """hash of a token -> its user's name, from lines ``NAME TOKEN``."""
    tokens: dict[bytes, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 2:
            raise FileError(f"{path}:{number}: expected NAME TOKEN")
        name, token = parts
        if len(token) < MIN_TOKEN:
            raise FileError(f"{path}:{number}: the token of {name!r} is shorter than {MIN_TOKEN}")
        tokens[token_key(token)] = name
    return tokens


class WatchedFile(Generic[T]):
    """A small file's parsed content, parsed again when the file changes."""

    #: seconds between two looks at the file's modification time
    LOOK_EVERY = 1.0

    def __init__(self, path: str, parse: Callable[[str, str], T], clock: IReactorTime) -> None:
        """Read and parse *path* now: FileError or OSError if it cannot be."""
        self._path = path
        self._parse = parse
        self._clock = clock
        self._seen = self._stamp()
        self._looked = clock.seconds()
        self.content = self._read()
        #: bumped on each change: what was learnt from the old content is stale
        self.generation = 0

    def _stamp(self) -> tuple[int, int, int]:
        st = os.stat(self._path)
        return st.st_mtime_ns, st.st_size, st.st_ino

    def _read(self) -> T:
        with open(self._path, encoding="utf-8") as f:
            text = f.read(MAX_FILE + 1)
        if len(text) > MAX_FILE:
            raise FileError(f"{self._path}: over {MAX_FILE} characters, not a users' file?")
        return self._parse(text, self._path)

    def current(self) -> T:
        """The content, read again first if the file changed."""
        now = self._clock.seconds()
        if now - self._looked < self.LOOK_EVERY:
            return self.content
        self._looked = now
        try:
            stamp = self._stamp()
            if stamp == self._seen:
                return self.content
            self._seen = stamp
            self.content = self._read()
            self.generation += 1
            log.info("read {path} again: it changed", path=self._path)
        except (OSError, UnicodeDecodeError, FileError) as e:
            log.error(
                "cannot use {path} as changed, keeping what it had: {why}",
                path=self._path,
                why=str(e),
            )
        return self.content
