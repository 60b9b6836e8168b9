"""Manifest answers ready to write again: a mirror's hot path.

Every pull starts with a manifest by tag, and a busy mirror answers the same
few thousand again and again.  For a manifest kept in memory
(:class:`~registryproxy.cache.manifests.HotAnswers`), routing, the
upstream's rules, privacy and content negotiation come out the same each
time and cost more than the answer itself.  So which kept manifest a request
got is noted here under what decided it (its URI, its ``Host`` and
``Accept`` headers, and with ``proxy.auth`` its credentials, kept only as a
hash), and a request asking the same is answered with it without that work,
as long as

* the manifest cache still keeps that very manifest for the reference (a
  tag's TTL, a purge, an eviction end that at once),
* the upstreams have not changed since, nor the users' and tokens' files
  (their *generation*: a user taken out is refused as soon as the file's
  change is seen, at most a second later, as before), and
* at most :data:`LIFETIME` seconds have passed: then the next request takes
  the whole path again, so what is checked on a time scale of its own is
  checked at least that often: privacy verdicts, and a token's expiry (a
  token is used at most that much past it).

Only answers that are the kept manifest itself are noted (not a platform's
manifest picked for a client that takes no lists), and only answers, never
a refusal: wrong credentials never find one.

An answer is also noted as it went on the wire, under the request's very
bytes (their SHA-256: credentials are among them), when they came whole in
one read (:class:`~.connections.Wire`), at their second asking.  A client
asks again with the same bytes (its pulls of the same tag), and those are
answered before twisted.web parses them, by the same rules; an answer that
ended its connection (``Connection: close``, HTTP/1.0) ends it again.
"""

from __future__ import annotations

import hashlib

import attrs
from twisted.web.server import Request

from ..bounded import Bounded
from ..cache.manifests import CachedManifest
from .connections import Wire

#: seconds an answer is used again, at most
LIFETIME = 1.0
#: answers kept at most, and their bytes (keys too): the least recently used go
MAX_ENTRIES = 4096
MAX_BYTES = 16 * 1024 * 1024

#: (URI, Host, Accept, credentials' SHA-256): what decides a manifest request's answer
Key = tuple[bytes, bytes | None, tuple[bytes, ...], bytes | None]


def key_of(request: Request) -> Key:
    headers = request.requestHeaders
    host = headers.getRawHeaders(b"host")
    accept = tuple(headers.getRawHeaders(b"accept", ()))
    credentials = headers.getRawHeaders(b"authorization")
    return (
        request.uri,
        host[-1] if host else None,
        accept,
        # the one the gate reads (the last), never kept as it is
        hashlib.sha256(credentials[-1]).digest() if credentials else None,
    )


@attrs.frozen
class Ready:
    #: the manifest cache's own object, compared by identity
    manifest: CachedManifest
    upstream: str
    repo: str
    reference: str
    #: what the dashboard counts a GET as a pull of (``upstream/repo:tag``)
    image: str
    #: who the request logged in as (proxy.auth), for the access log
    user: str | None
    until: float
    #: the upstreams' and the logins' (:meth:`RegistryResource._generation`)
    generation: object
    #: the answer as sent, for an answer noted under its request's bytes
    wire: Wire | None = None


class ReadyAnswers:
    def __init__(self, max_entries: int = MAX_ENTRIES, max_bytes: int = MAX_BYTES) -> None:
        #: by Key, or by the SHA-256 of a request's bytes (with its wire)
        self._kept: Bounded[Key | bytes, Ready] = Bounded(max_bytes, max_entries)

    def get(self, key: Key | bytes, now: float, generation: object) -> Ready | None:
        ready = self._kept.get(key, now)
        if ready is not None and ready.generation != generation:
            self._kept.drop(key)
            return None
        return ready

    def put(self, key: Key | bytes, ready: Ready) -> None:
        self._kept.put(key, ready, _size(key, ready), ready.until)

    def drop(self, key: Key | bytes) -> None:
        self._kept.drop(key)

    def __len__(self) -> int:
        return len(self._kept)


def wire_key(head: bytes) -> bytes:
    """The key of an answer noted under the request bytes *head*."""
    return hashlib.sha256(head).digest()


def _size(key: Key | bytes, ready: Ready) -> int:
    """What an answer holds in memory, near enough: a client chooses its keys."""
    if isinstance(key, bytes):
        assert ready.wire is not None
        return len(key) + ready.wire.size()
    uri, host, accept, credentials = key
    return (
        len(ready.manifest.body)
        + len(uri)
        + len(host or b"")
        + sum(map(len, accept))
        + len(credentials or b"")
    )
