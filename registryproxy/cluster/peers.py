"""One upstream download per blob for the whole cluster.

Each digest has an owner: the live node that rendezvous hashing picks for it
(:mod:`.membership`).  The owner downloads the blob from the upstream once;
every other node asked for it while it is not stored fetches it from the
owner's internal port instead, as it arrives, and serves its own clients
from that stream with the machinery it uses for an upstream download (the
bytes checked against the digest, the last byte held back until they are,
the clients' connections aborted if the stream fails).  The owner's
internal port serves the same registry API as the proxy port, without
passing anything on again, to the holders of the cluster's secret only.

Why an owner per digest and not a lease in the database: the other nodes
need the bytes while they arrive, so they must know where the download runs,
and hashing tells every node that without a round trip to the database.  A
node that cannot reach the owner (it just died, and the others have not yet
seen its heartbeat stop) downloads from the upstream itself.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.internet.defer import TimeoutError as NoAnswer
from twisted.internet.error import (
    ConnectError,
    ConnectingCancelledError,
    DNSLookupError,
)
from twisted.internet.error import TimeoutError as ConnectTimeout
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.client import ResponseNeverReceived
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IResponse
from twisted.web.resource import IResource, Resource
from twisted.web.server import NOT_DONE_YET, Request

from ..errors import RegistryError
from ..mediatypes import MODERN
from ..names import Digest
from ..upstream.body import read_body
from ..upstream.client import MAX_MANIFEST, Manifest, RegistryClient

if TYPE_CHECKING:  # membership brings psycopg, which a single node does not need
    from .membership import Membership

log = Logger()

#: the largest error answer read from a peer
_MAX_ERROR = 64 * 1024
#: where a node tells another that it purged
FORGET = b"/_regproxy/forget"


class Peers:
    """The blob source of a cluster node (see ``cache.blobs.PeerSource``)."""

    def __init__(
        self, membership: Membership, agent: IAgent, clock: IReactorTime, timeout: float = 10.0
    ) -> None:
        self._membership = membership
        self._agent = agent
        self._clock = clock
        self._timeout = timeout

    def owner_of(self, digest: Digest) -> str | None:
        return self.owner(str(digest))

    def owner(self, key: str) -> str | None:
        owner = self._membership.owner(key)
        if owner is None or owner.name == self._membership.name:
            return None
        return owner.advertise

    async def forget_everywhere(self, generation: int | None = None) -> None:
        """Tell every other live node that this one purged (each drops the
        answers it keeps in memory, and knows its removals up to the
        cluster's *generation* handled), waiting for them at most the peer
        timeout; a node that does not answer learns it at its next
        refresh of the cluster's generation."""
        others = [
            node.advertise for node in self._membership.live if node.name != self._membership.name
        ]
        headers = Headers({"Authorization": [f"Bearer {self._membership.secret}"]})

        async def tell(peer: str) -> None:
            query = "" if generation is None else f"?generation={generation}"
            url = f"{peer.rstrip('/')}{FORGET.decode()}{query}".encode("ascii")
            d = self._agent.request(b"POST", url, headers)
            d.addTimeout(self._timeout, self._clock)
            try:
                response = await d
                await read_body(response, _MAX_ERROR, self._timeout, self._clock)
            except Exception as e:
                log.warn("could not tell {peer} of a purge: {why}", peer=peer, why=e)

        await gatherResults([Deferred.fromCoroutine(tell(p)) for p in others])

    async def get_manifest(
        self, peer: str, client: RegistryClient, repo: str, reference: str
    ) -> Manifest | None:
        url = f"{peer.rstrip('/')}/v2/{client.name}/{repo}/manifests/{reference}"
        headers = Headers(
            {
                "Authorization": [f"Bearer {self._membership.secret}"],
                "Accept": [", ".join(MODERN)],  # what the registry stores
            }
        )
        response = await self._ask(peer, url, headers, reference)
        if response is None:
            return None
        if response.code != 200:
            raise await self._error(response, peer)
        try:
            body = await read_body(response, MAX_MANIFEST, self._timeout, self._clock)
        except Exception as e:  # cut off (the peer died): this node asks itself
            log.warn("peer {peer} failed mid-manifest: {why}", peer=peer, why=e)
            return None
        types = response.headers.getRawHeaders(b"Content-Type") or [b""]
        digests = response.headers.getRawHeaders(b"Docker-Content-Digest") or [None]
        cached = (response.headers.getRawHeaders(b"X-Cache") or [b"MISS"])[0]
        return Manifest(
            body,
            types[0].decode("latin-1"),
            digests[0].decode("latin-1") if digests[0] is not None else None,
            "HIT" if cached in (b"HIT", b"STALE") else "MISS",
        )

    async def get_blob(
        self, peer: str, client: RegistryClient, repo: str, digest: Digest
    ) -> IResponse | None:
        url = f"{peer.rstrip('/')}/v2/{client.name}/{repo}/blobs/{digest}"
        headers = Headers({"Authorization": [f"Bearer {self._membership.secret}"]})
        response = await self._ask(peer, url, headers, str(digest))
        if response is None or response.code == 200:
            return response
        raise await self._error(response, peer)

    async def _ask(self, peer: str, url: str, headers: Headers, what: str) -> IResponse | None:
        """The peer's response; None if it does not answer in time."""
        d: Deferred[IResponse] = self._agent.request(b"GET", url.encode("ascii"), headers)
        d.addTimeout(self._timeout, self._clock)
        try:
            response = await d
        except (
            ConnectError,
            ConnectingCancelledError,
            DNSLookupError,
            ResponseNeverReceived,
            NoAnswer,
            ConnectTimeout,
        ) as e:
            log.warn(
                "peer {peer} does not answer ({why}); fetching {what} here",
                peer=peer,
                why=type(e).__name__,
                what=what,
            )
            return None
        return response

    async def _error(self, response: IResponse, peer: str) -> RegistryError:
        try:
            body = await read_body(response, _MAX_ERROR, self._timeout, self._clock)
        except Exception:
            body = b""
        return _peer_error(response.code, body, peer)


def _peer_error(status: int, body: bytes, peer: str) -> RegistryError:
    """The peer's answer, which is the registry's (or the upstream's) error."""
    try:
        error = json.loads(body)["errors"][0]
        return RegistryError(status, str(error["code"]), str(error["message"]))
    except (ValueError, KeyError, IndexError, TypeError):
        return RegistryError(502, "UNAVAILABLE", f"cluster peer {peer} answered HTTP {status}")


class PeersOnly(Resource):
    """The internal port: *inner* for the holders of the cluster's secret,
    a 401 for anyone else."""

    isLeaf = True

    def __init__(
        self,
        inner: IResource,
        secret: str | Callable[[], str],
        forget: Callable[[int | None], Deferred[None]] = lambda generation: succeed(None),
    ) -> None:
        """*secret*, or where to find it (a node learns it when it joins);
        *forget*: what ``POST /_regproxy/forget[?generation=N]`` does
        (another node purges: land what is being cached, drop the answers
        kept in memory, and know the removals up to N handled)."""
        super().__init__()
        self._inner = inner
        self._secret = secret if callable(secret) else lambda: secret
        self._forget = forget

    def render(self, request: Request) -> Any:  # type: ignore[override]
        given = request.getHeader(b"Authorization") or b""
        if isinstance(given, str):
            given = given.encode("latin-1")
        secret = self._secret()
        if not secret or not hmac.compare_digest(given, f"Bearer {secret}".encode()):
            body = RegistryError(
                401, "UNAUTHORIZED", "this port is for the nodes of a regproxy cluster"
            ).body()
            request.setResponseCode(401)
            request.setHeader(b"Content-Type", b"application/json")
            request.setHeader(b"Content-Length", b"%d" % len(body))
            return body
        if request.path == FORGET:
            if request.method != b"POST":
                request.setResponseCode(405)
                request.setHeader(b"Allow", b"POST")
                return b""
            given = (request.args or {}).get(b"generation", [b""])[-1]
            generation = int(given) if given.isdigit() and len(given) < 19 else None
            request.setResponseCode(204)
            self._forget(generation).addBoth(lambda _: request.finish())
            return NOT_DONE_YET
        return self._inner.render(request)
