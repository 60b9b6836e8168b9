"""The distribution-spec grammar for repository names, tags and digests.

Everything that reaches the cache or an upstream URL passes through here
first, so a name can never carry ``..``, ``%2F`` or anything else that would
escape the cache directory or reshape an upstream request.
"""

from __future__ import annotations

import hashlib
import re

import attrs

_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
_NAME = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
_TAG = re.compile(r"[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}")
_DIGEST = re.compile(r"(sha256:[a-f0-9]{64}|sha512:[a-f0-9]{128})")
_LABEL = r"[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?"
_REGISTRY_HOST = re.compile(rf"{_LABEL}(?:\.{_LABEL})*(?::[0-9]{{1,5}})?")
MAX_NAME_LENGTH = 255

#: Algorithms we can verify; a digest with any other is refused.
ALGORITHMS = {"sha256": hashlib.sha256, "sha512": hashlib.sha512}


def is_valid_name(name: str) -> bool:
    return len(name) <= MAX_NAME_LENGTH and _NAME.fullmatch(name) is not None


def is_valid_registry_host(host: str) -> bool:
    """``docker.io``, ``ghcr.io``, ``localhost:5000``: how clients name a registry."""
    if _REGISTRY_HOST.fullmatch(host) is None:
        return False
    _, colon, port = host.partition(":")
    return not colon or 0 < int(port) < 65536


def is_valid_tag(tag: str) -> bool:
    return _TAG.fullmatch(tag) is not None


def is_valid_digest(digest: str) -> bool:
    return _DIGEST.fullmatch(digest) is not None


@attrs.frozen
class Digest:
    """A verified-syntax content digest, ``algorithm:hex``."""

    algorithm: str
    hex: str

    @classmethod
    def parse(cls, text: str) -> Digest:
        if not is_valid_digest(text):
            raise ValueError(f"invalid digest {text!r}")
        algorithm, _, hexpart = text.partition(":")
        return cls(algorithm, hexpart)

    @classmethod
    def of(cls, data: bytes, algorithm: str = "sha256") -> Digest:
        return cls(algorithm, ALGORITHMS[algorithm](data).hexdigest())

    def hasher(self) -> hashlib._Hash:
        return ALGORITHMS[self.algorithm]()

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hex}"
