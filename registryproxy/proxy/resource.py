"""The ``/v2/`` registry API that clients pull through.

Routing, validation and HTTP responses only: what to serve comes from the
manifest and blob caches, which go upstream when they must.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Awaitable, Callable
from urllib.parse import parse_qsl, urlencode, urlsplit

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from ..cache.blobs import BlobCache, BlobFetch
from ..cache.manifests import CachedManifest, ManifestCache
from ..errors import RegistryError, digest_invalid, name_invalid, unsupported
from ..login.gate import Gate, Identity
from ..mediatypes import parse_accept
from ..metrics import Metrics
from ..names import Digest, is_valid_digest, is_valid_name, is_valid_registry_host, is_valid_tag
from ..upstream.client import RegistryClient
from ..upstream.registry import Upstreams
from ..upstream.rules import oversize, refused_by
from .connections import Wire
from .ranges import parse_range
from .ready import LIFETIME, Key, Ready, ReadyAnswers, key_of, wire_key
from .sender import BlobSender
from .sendfile import SendfileSender, socket_transport

log = Logger()

_API_VERSION = (b"Docker-Distribution-API-Version", b"registry/2.0")
_ROUTES = [
    (re.compile(r"/v2/?"), "base"),
    (re.compile(r"/token"), "token"),
    (re.compile(r"/v2/(?P<name>.+)/manifests/(?P<reference>[^/]*)"), "manifest"),
    (re.compile(r"/v2/(?P<name>.+)/blobs/uploads(?:/.*)?"), "upload"),
    (re.compile(r"/v2/(?P<name>.+)/blobs/(?P<digest>[^/]*)"), "blob"),
    (re.compile(r"/v2/(?P<name>.+)/tags/list"), "tags"),
    (re.compile(r"/v2/(?P<name>.+)/referrers/(?P<digest>[^/]*)"), "referrers"),
]


def _route(path: str) -> tuple[str, re.Match[str]]:
    for pattern, kind in _ROUTES:
        match = pattern.fullmatch(path)
        if match:
            return kind, match
    raise RegistryError(404, "NOT_FOUND", f"no registry API route for {path!r}")


def route(upstreams: Upstreams, request: Request, name: str) -> tuple[RegistryClient, str]:
    """The upstream and repository a request means, by the first rule that applies:

    1. a registry host as the first path component (``/v2/ghcr.io/owner/image/...``,
       Docker's rule: it has a dot or a port, or is ``localhost``);
    2. containerd's ``?ns=ghcr.io`` for a mirror;
    3. the Host header, when it is an upstream's name or alias;
    4. the default upstream.
    Then Docker Hub's rule: a one-part name is an official image, ``library/<name>``.
    """
    first, slash, rest = name.partition("/")
    if slash and ("." in first or ":" in first or first == "localhost"):
        client, name = _named(upstreams, first, "path"), rest
    elif ns := request.args.get(b"ns"):
        client = _named(upstreams, ns[-1].decode("latin-1"), "ns=")
    else:
        host = (request.getHeader(b"Host") or b"").decode("latin-1")
        client = upstreams.by_virtual_host(host) or upstreams.default_client()
    if not is_valid_name(name):
        raise name_invalid(name)
    if client.config.library_prefix and "/" not in name:
        name = "library/" + name
    return client, name


def _named(upstreams: Upstreams, host: str, how: str) -> RegistryClient:
    client = upstreams.get(host) if is_valid_registry_host(host) else None
    if client is None:
        raise RegistryError(
            404,
            "NAME_UNKNOWN",
            f"registry {host!r} (from the {how}) is not served by this regproxy: "
            "add it under upstreams: in its config",
        )
    return client


_LINK = re.compile(r"<([^>]*)>([^<]*)")
_REL_NEXT = re.compile(r'\brel\s*=\s*"?next"?(?:[\s;,]|$)', re.IGNORECASE)
_OCI_INDEX = "application/vnd.oci.image.index.v1+json"
#: the spec's codes for a 404, and the one each route answers with when an
#: upstream gave another
_NOT_FOUND = frozenset({"NAME_UNKNOWN", "MANIFEST_UNKNOWN", "BLOB_UNKNOWN"})
_UNKNOWN = {
    "manifest": "MANIFEST_UNKNOWN",
    "blob": "BLOB_UNKNOWN",
    "tags": "NAME_UNKNOWN",
    "referrers": "MANIFEST_UNKNOWN",
}


def _relink(links: str, prefix: str, name: str, ns: str | None) -> str | None:
    """The next page of an upstream's pagination ``Link``, made to lead back
    through regproxy the way the client came: its name for the repository
    (a registry prefix, no ``library/``) and its ``ns=``.  None if there is
    none, or it leads somewhere else than *prefix* (``/v2/<repo>/``)."""
    for url, params in _LINK.findall(links):
        if not _REL_NEXT.search(params):
            continue
        target = urlsplit(url)
        if not target.path.startswith(prefix):
            return None
        query = [(k, v) for k, v in parse_qsl(target.query, keep_blank_values=True) if k != "ns"]
        if ns is not None:
            query.append(("ns", ns))
        path = f"/v2/{name}/{target.path[len(prefix) :]}"
        return f'<{path}{"?" + urlencode(query) if query else ""}>; rel="next"'
    return None


_MEDIA_TYPE = re.compile(r"[A-Za-z0-9][\w!#$&^.+-]{0,126}/[A-Za-z0-9][\w!#$&^.+-]{0,126}")


def _query(request: Request, keys: tuple[str, ...]) -> dict[str, str]:
    """The last value of each of *keys* in the query string, checked."""
    query = {}
    for key in keys:
        values = request.args.get(key.encode())
        if values:
            query[key] = values[-1].decode("utf-8", "replace")
    if not re.fullmatch(r"[0-9]{1,9}", query.get("n", "0")):
        raise RegistryError(
            400, "PAGINATION_NUMBER_INVALID", f"n must be a number, not {query['n']!r}"
        )
    if not _MEDIA_TYPE.fullmatch(query.get("artifactType", "a/b")):
        raise RegistryError(
            400, "UNSUPPORTED", f"artifactType must be a media type, not {query['artifactType']!r}"
        )
    return query


def _admit(client: RegistryClient, repo: str, tag: str | None) -> None:
    """Raise the 403 DENIED of the upstream's allow and deny lists, if any."""
    config = client.config
    why = refused_by(client.name, config.allow, config.deny, repo, tag, config.library_prefix)
    if why is not None:
        raise RegistryError(403, "DENIED", f"{why} on this regproxy: ask its operator")


def _check_size(client: RegistryClient, digest: Digest | str, size: int | None) -> None:
    """Raise the 403 DENIED for a blob over the upstream's max_blob_size."""
    config = client.config
    error = oversize(client.name, config.max_blob_bytes, config.max_blob_size, str(digest), size)
    if error is not None:
        raise error


def _check_layers(client: RegistryClient, manifest: CachedManifest) -> None:
    """Refuse an image manifest that lists a blob over max_blob_size: its
    image could not be pulled whole, so the client learns it before any
    download."""
    if client.config.max_blob_size is None:
        return
    try:
        body = json.loads(manifest.body)
        listed = [body.get("config"), *body.get("layers", ())]
    except (ValueError, TypeError, AttributeError):
        return  # an index, or none of ours to judge: its blobs are checked when asked for
    for descriptor in listed:
        if isinstance(descriptor, dict) and isinstance(descriptor.get("size"), int):
            _check_size(client, str(descriptor.get("digest")), descriptor["size"])


def _unchecked(failure: Failure, digest: Digest) -> bool:
    """A stored blob could not be hashed again: not trusted (its reader is cut off)."""
    log.failure("cannot hash {digest} again", failure, digest=str(digest))
    return False


class RegistryResource(Resource):
    isLeaf = True

    def __init__(
        self,
        upstreams: Upstreams,
        manifests: ManifestCache,
        blobs: BlobCache,
        metrics: Metrics,
        clock: IReactorTime,
        sendfile: bool = True,
        forward: bool = True,
        gate: Gate | None = None,
    ) -> None:
        """*forward*: false for a cluster's internal port, whose requests come
        from other nodes and are never passed on to another.  *gate*: who
        may pull what (``proxy.auth``); None: anyone who reaches the port.
        *clock*: what times answers used again (:mod:`.ready`)."""
        super().__init__()
        #: cached manifests' answers, used again for a moment
        self._ready = ReadyAnswers()
        self._clock = clock

        self._gate = gate
        self._forward = forward
        self._upstreams = upstreams
        self._manifests = manifests
        self._blobs = blobs
        self._metrics = metrics
        self._sendfile = sendfile

    def render(self, request: Request) -> int:  # type: ignore[override]
        request.setHeader(*_API_VERSION)
        # only manifests' answers are kept (a push to one's URI is refused)
        if request.method in (b"GET", b"HEAD") and b"/manifests/" in request.path:
            ready = self._still_kept(key_of(request))
            if ready is not None:
                request.login_user = ready.user  # type: ignore[attr-defined]
                self._manifest(request, ready.manifest, ready.image)
                self._note_wire(request, ready)
                return NOT_DONE_YET
        gone: list[bool] = []
        request.notifyFinish().addErrback(lambda _: gone.append(True))
        # the upstream the request is routed to, once it is (its metrics label)
        routed: list[str] = []
        d = Deferred.fromCoroutine(self._handle(request, gone, routed))
        d.addErrback(self._failed, request, gone, routed)
        return NOT_DONE_YET

    def _failed(
        self, failure: Failure, request: Request, gone: list[bool], routed: list[str]
    ) -> None:
        if isinstance(failure.value, RegistryError):
            error = failure.value
        else:
            log.failure(
                "error handling {method} {uri}",
                failure,
                method=request.method.decode("latin-1"),
                uri=request.uri.decode("latin-1"),
            )
            error = RegistryError(500, "UNKNOWN", "internal error in regproxy; see its log")
        self._metrics.error(
            error.status,
            getattr(request.getClientAddress(), "host", "?"),
            request.method.decode("latin-1"),
            request.path.decode("utf-8", "replace"),
            routed[0] if routed else None,
        )
        if gone or request.finished:
            return
        if request.startedWriting:
            request.channel.transport.abortConnection()  # type: ignore[union-attr]
            return
        request.setResponseCode(error.status)
        for key, value in error.headers.items():
            request.setHeader(key, value)
        body = error.body()
        request.setHeader(b"Content-Type", b"application/json; charset=utf-8")
        request.setHeader(b"Content-Length", b"%d" % len(body))
        request.write(body)
        request.finish()

    async def _handle(self, request: Request, gone: list[bool], routed: list[str]) -> None:
        path = request.path.decode("latin-1")
        kind, match = _route(path)
        method = request.method
        gate = self._gate
        if kind == "token":
            if gate is None:
                raise RegistryError(
                    404, "NOT_FOUND", "this regproxy takes no logins (no proxy.auth)"
                )
            if method not in (b"GET", b"POST"):
                raise unsupported(f"{method.decode('latin-1')} {path}")
            self._json(request, await gate.token(request))
            return
        if method not in (b"GET", b"HEAD"):
            raise unsupported(f"{method.decode('latin-1')} {path}")
        name = match.groupdict().get("name")
        identity = await gate.identify(request, name) if gate is not None else None
        if identity is not None:
            request.login_user = identity.user  # type: ignore[attr-defined]
        if kind in ("base", "tags", "referrers"):
            self._metrics.request(kind, "none").inc()
        if kind == "base":
            if gate is not None:
                gate.check_base(identity, request)  # type: ignore[arg-type]
            self._json(request, b"{}")
            return
        if kind == "upload":
            raise unsupported("pushing")
        try:
            await self._serve(request, kind, match, gone, routed, identity)
        except RegistryError as e:
            if e.status == 404 and e.code not in _NOT_FOUND:
                # an upstream's own code (NOT_FOUND, ...) means nothing to a client
                raise attrs.evolve(e, code=_UNKNOWN[kind]) from None
            raise

    async def _serve(
        self,
        request: Request,
        kind: str,
        match: re.Match[str],
        gone: list[bool],
        routed: list[str],
        identity: Identity | None,
    ) -> None:
        # before any await: an answer made across a change is not used again
        generation = self._generation()
        client, repo = route(self._upstreams, request, match.group("name"))
        routed.append(client.label)
        # before any upstream request and any cached answer
        tag = match.group("reference") if kind == "manifest" else None
        _admit(client, repo, tag if tag is not None and is_valid_tag(tag) else None)
        named = False  # whether a rule names the user: private repositories too
        if self._gate is not None and identity is not None:
            named = self._gate.admit(
                identity,
                request,
                client.name,
                repo,
                client.config.library_prefix,
                match.group("name"),
            )

        async def shareable(what: str) -> None:
            if not named:
                await client.check_shareable(repo, what)

        if kind == "manifest":
            reference = match.group("reference")
            if not (is_valid_tag(reference) or is_valid_digest(reference)):
                # a reference no tag or digest can be names no manifest (as Distribution)
                raise RegistryError(
                    404, "MANIFEST_UNKNOWN", f"{reference!r} is neither a tag nor a digest"
                )
            await shareable(f"manifests/{reference}")
            accept = parse_accept(request.requestHeaders.getRawHeaders(b"Accept", []))
            manifest = await self._manifests.get(client, repo, reference, accept, self._forward)
            _check_layers(client, manifest)
            at = "@" if is_valid_digest(reference) else ":"
            image = f"{client.name}/{repo}{at}{reference}"
            if not gone:
                self._manifest(request, manifest, image)
            if self._manifests.kept(client.name, repo, reference) is manifest:
                user = identity.user if identity is not None else None
                until = self._clock.seconds() + LIFETIME
                ready = Ready(
                    manifest, client.name, repo, reference, image, user, until, generation
                )
                self._ready.put(key_of(request), ready)
        elif kind == "blob":
            digest = match.group("digest")
            if not is_valid_digest(digest):
                raise digest_invalid(digest)
            await shareable(f"blobs/{digest}")
            await self._blob(request, client, repo, Digest.parse(digest), gone)
        else:
            await self._listing(request, kind, match, client, repo, gone, shareable)

    async def _listing(
        self,
        request: Request,
        kind: str,
        match: re.Match[str],
        client: RegistryClient,
        repo: str,
        gone: list[bool],
        shareable: Callable[[str], Awaitable[None]],
    ) -> None:
        """The tag list, or the referrers of a manifest (OCI 1.1): passed
        through, not cached.  An upstream without the referrers API answers
        404, and so does regproxy: clients then look for referrers by tag."""
        keys: tuple[str, ...]
        if kind == "tags":
            path, unknown, keys, media_type = "tags/list", "NAME_UNKNOWN", ("n", "last"), None
        else:
            digest = match.group("digest")
            if not is_valid_digest(digest):
                raise digest_invalid(digest)
            path, unknown, keys = f"referrers/{digest}", "MANIFEST_UNKNOWN", ("artifactType",)
            media_type = _OCI_INDEX
        query = _query(request, keys)
        await shareable("tags/list")
        body, headers = await client.get_listing(repo, path, query, unknown)
        # no HTML or script from upstream served under our name; a look at
        # its ends, not a parse: a listing may run to 32 MiB, and parsing
        # it on the reactor thread held up every client
        if not (body[:64].lstrip().startswith(b"{") and body[-64:].rstrip().endswith(b"}")):
            raise RegistryError(
                502, "UNAVAILABLE", f"upstream {client.name} answered {path} with no JSON object"
            )
        if gone:
            return
        if "Link" in headers:
            ns = request.args.get(b"ns")
            base = urlsplit(client.config.url).path.rstrip("/")
            link = _relink(
                headers["Link"],
                f"{base}/v2/{repo}/",
                match.group("name"),
                ns[-1].decode("latin-1") if ns else None,
            )
            if link is not None:
                request.setHeader(b"Link", link.encode())
            else:
                log.warn(
                    "upstream {upstream} gave a Link regproxy cannot follow: {link}",
                    upstream=client.name,
                    link=headers["Link"],
                )
        if headers.get("OCI-Filters-Applied") == "artifactType" and "artifactType" in query:
            request.setHeader(b"OCI-Filters-Applied", b"artifactType")
        self._json(request, body, media_type)

    def _json(self, request: Request, body: bytes, media_type: str | None = None) -> None:
        request.setHeader(b"Content-Type", (media_type or "application/json").encode())
        request.setHeader(b"X-Content-Type-Options", b"nosniff")
        request.setHeader(b"Content-Length", b"%d" % len(body))
        request.write(body)
        request.finish()

    def _generation(self) -> tuple[int, tuple[int, int] | None]:
        """Moves when the upstreams change, or who may log in."""
        gate = self._gate
        return self._upstreams.generation, gate.generation() if gate is not None else None

    def _manifest(self, request: Request, manifest: CachedManifest, image: str) -> None:
        """Answer with *manifest*; a GET is a pull of *image*."""
        request.setHeader(b"Content-Type", manifest.media_type.encode())
        request.setHeader(b"Docker-Content-Digest", manifest.digest.encode())
        request.setHeader(b"ETag", f'"{manifest.digest}"'.encode())
        request.setHeader(b"Content-Length", b"%d" % len(manifest.body))
        request.setHeader(b"X-Cache", manifest.cache.encode())
        pull = request.method != b"HEAD"
        self._count(manifest, pull, image)
        if pull:
            request.write(manifest.body)
        request.finish()

    def _count(self, manifest: CachedManifest, pull: bool, image: str) -> None:
        """Count an answer with *manifest*, a GET's (*pull*) or a HEAD's."""
        metrics = self._metrics
        metrics.request("manifest", manifest.cache.lower()).inc()
        if pull:
            source = "upstream" if manifest.cache == "MISS" else "cache"
            metrics.served(source).inc(len(manifest.body))
            if self._forward:
                # a client's pull (a peer's asking is counted by the node it serves)
                metrics.pulls.pulled(image)

    def _note_wire(self, request: Request, ready: Ready) -> None:
        """Note the answer *ready* just sent under the request's bytes, if
        it may be sent again to them as it went (:mod:`.ready`): at its
        second asking, so that bytes never sent again (a header that changes
        at each request) push out few answers that would be."""
        head = getattr(request, "head", None)
        if head is not None:
            body = ready.manifest.body if request.method != b"HEAD" else b""
            wire = Wire.of(request, body)  # type: ignore[arg-type]
            if wire is not None:
                self._ready.put(wire_key(head), attrs.evolve(ready, wire=wire))

    def answer_again(self, head: bytes) -> tuple[Wire, str | None] | None:
        """The answer to the request bytes *head*, as the same bytes were
        answered from a kept manifest a moment ago, and who they logged in
        as; counted as every answer is.  None: they take the whole path."""
        ready = self._still_kept(wire_key(head))
        if ready is None or ready.wire is None:
            return None
        self._count(ready.manifest, ready.wire.pull, ready.image)
        self._metrics.sent_again.inc()
        return ready.wire, ready.user

    def _still_kept(self, key: Key | bytes) -> Ready | None:
        """The answer noted under *key* if the manifest cache still keeps
        its very manifest (read now: touched for eviction), else None."""
        ready = self._ready.get(key, self._clock.seconds(), self._generation())
        if ready is None:
            return None
        manifest = ready.manifest
        if self._manifests.kept(ready.upstream, ready.repo, ready.reference) is not manifest:
            self._ready.drop(key)
            return None
        self._manifests.touch(ready.upstream, ready.repo, manifest.digest)
        return ready

    async def _blob(
        self, request: Request, client: RegistryClient, repo: str, digest: Digest, gone: list[bool]
    ) -> None:
        stored = await self._blobs.stored_size(digest)
        _check_size(client, digest, stored)
        if stored is not None:
            # cached: may this repository read it? (a HEAD upstream unless it
            # lists it; a download if only other upstreams sent the bytes)
            if not await self._blobs.confirm(client, repo, digest):
                stored = None
            if gone:
                return
        # after the awaits: it may have been purged meanwhile
        fd = self._blobs.open_stored(digest) if stored is not None else None
        check = None
        if fd is not None and self._blobs.due(digest):
            # hashed again while it is sent, as a download is: its last byte
            # waits for the verdict, and a rotten file's reader is cut off
            # (the file quarantined: the next try fetches it again)
            check = Deferred.fromCoroutine(self._blobs.sound(digest, fd))
            check.addErrback(_unchecked, digest)
        if gone:
            if fd is not None:
                self._blobs.close_stored(fd)
            return
        fetch = None
        size: int | None
        # in a cluster, a blob stored but not on this node's disk is a HIT
        # streamed from the cluster's store
        shared = stored is not None and self._blobs.shared
        if fd is not None:
            cache, size = "HIT", os.fstat(fd).st_size
            self._blobs.served(digest)
        elif request.method == b"HEAD":
            if shared:
                cache, size = "HIT", stored
            else:
                cache, size = "MISS", await client.head_blob(repo, str(digest))
                _check_size(client, digest, size)
            if gone:
                return
        elif shared and self._blobs.redirects and self._forward:
            # the bucket serves it (cache.storage.redirect)
            location = await self._blobs.presigned(digest)
            if gone:
                return
            request.setResponseCode(307)
            request.setHeader(b"Location", location.encode("ascii"))
            request.setHeader(b"Docker-Content-Digest", str(digest).encode())
            request.setHeader(b"X-Cache", b"HIT")
            request.setHeader(b"Content-Length", b"0")
            self._metrics.request("blob", "hit").inc()
            self._blobs.served(digest)
            request.finish()
            return
        else:
            cache = "HIT" if shared else "MISS"
            fetch = await self._blobs.fetch(client, repo, digest, self._forward, shared)
            size = fetch.size
        try:
            # a download of the same bytes another upstream started, without the limit
            _check_size(client, digest, size)
            if gone:
                return
            if fetch is not None and fetch.error is not None:
                raise RegistryError(
                    502,
                    "UNAVAILABLE",
                    f"download from upstream {fetch.source} failed: {fetch.error}",
                )
            start, end = 0, size
            if size is not None:
                span = parse_range(request.getHeader(b"Range"), size)
                if span is not None:
                    start, end = span
                    request.setResponseCode(206)
                    request.setHeader(b"Content-Range", f"bytes {start}-{end - 1}/{size}".encode())
                request.setHeader(b"Content-Length", b"%d" % (end - start))  # type: ignore[operator]
            request.setHeader(b"Content-Type", b"application/octet-stream")
            request.setHeader(b"Docker-Content-Digest", str(digest).encode())
            request.setHeader(b"Accept-Ranges", b"bytes")
            request.setHeader(b"X-Cache", cache.encode())
            self._metrics.request("blob", cache.lower()).inc()
            if request.method == b"HEAD":
                request.finish()
                return
            self._send(request, fd, fetch, start, end, check)
            fd = None  # the sender owns it now
        finally:
            if fd is not None:
                self._blobs.close_stored(fd)
            if fetch is not None:
                fetch.release()  # the sender (if any) listens now

    def _send(
        self,
        request: Request,
        fd: int | None,
        fetch: BlobFetch | None,
        start: int,
        end: int | None,
        check: Deferred[bool] | None = None,
    ) -> None:
        """*check*: a stored blob's hash under way (see :meth:`_blob`)."""
        source = "upstream" if fetch is not None and fetch.origin != "shared" else "cache"
        counted = self._metrics.served(source).inc
        transport = socket_transport(request) if self._sendfile else None
        if fetch is not None:
            fd = fetch.fileno()
            if transport is not None and fd is not None and end is not None:
                SendfileSender(request, transport, fd, start, end, counted, fetch).start()
            else:
                BlobSender(request, start, end, fetch=fetch, counted=counted).start()
        elif transport is not None and end is not None:
            assert fd is not None
            close = self._blobs.close_stored
            SendfileSender(
                request, transport, fd, start, end, counted, close_fd=close, check=check
            ).start()
        else:
            close = self._blobs.close_stored
            BlobSender(
                request, start, end, fd=fd, counted=counted, close_fd=close, check=check
            ).start()
