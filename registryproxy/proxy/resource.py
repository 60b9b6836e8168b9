"""The ``/v2/`` registry API that clients pull through.

Routing, validation and HTTP responses only: what to serve comes from the
manifest and blob caches, which go upstream when they must.
"""

from __future__ import annotations

import os
import re
from urllib.parse import parse_qsl, urlencode, urlsplit

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from ..cache.blobs import BlobCache, BlobFetch
from ..cache.manifests import CachedManifest, ManifestCache
from ..errors import RegistryError, digest_invalid, name_invalid, unsupported
from ..mediatypes import parse_accept
from ..metrics import Metrics
from ..names import Digest, is_valid_digest, is_valid_name, is_valid_registry_host, is_valid_tag
from ..upstream.client import RegistryClient
from ..upstream.registry import Upstreams
from .ranges import parse_range
from .sender import BlobSender
from .sendfile import SendfileSender, socket_transport

log = Logger()

_API_VERSION = (b"Docker-Distribution-API-Version", b"registry/2.0")
_ROUTES = [
    (re.compile(r"/v2/?"), "base"),
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
        host = request.getHeader("Host") or ""
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


_LINK = re.compile(r"\s*<([^>]*)>(.*)", re.DOTALL)


def _relink(link: str, repo: str, name: str, request: Request) -> str | None:
    """An upstream's pagination ``Link``, made to lead back through regproxy
    the way the client came: its name for the repository (a registry prefix,
    no ``library/``), and its ``ns=``.  None if it points elsewhere."""
    match = _LINK.fullmatch(link)
    if match is None:
        return None
    target = urlsplit(match.group(1))
    prefix = f"/v2/{repo}/"
    if not target.path.startswith(prefix):
        return None
    query = parse_qsl(target.query, keep_blank_values=True)
    if ns := request.args.get(b"ns"):
        query.append(("ns", ns[-1].decode("latin-1")))
    path = f"/v2/{name}/{target.path[len(prefix) :]}"
    return f"<{path}{'?' + urlencode(query) if query else ''}>{match.group(2)}"


class RegistryResource(Resource):
    isLeaf = True

    def __init__(
        self,
        upstreams: Upstreams,
        manifests: ManifestCache,
        blobs: BlobCache,
        metrics: Metrics,
        sendfile: bool = True,
    ) -> None:
        super().__init__()
        self._upstreams = upstreams
        self._manifests = manifests
        self._blobs = blobs
        self._metrics = metrics
        self._sendfile = sendfile

    def render(self, request: Request) -> int:  # type: ignore[override]
        request.setHeader(*_API_VERSION)
        gone: list[bool] = []
        request.notifyFinish().addErrback(lambda _: gone.append(True))
        d = Deferred.fromCoroutine(self._handle(request, gone))
        d.addErrback(self._failed, request, gone)
        return NOT_DONE_YET

    def _failed(self, failure: Failure, request: Request, gone: list[bool]) -> None:
        if isinstance(failure.value, RegistryError):
            error = failure.value
        else:
            log.failure(
                "error handling {method} {uri}",
                failure,
                method=request.method.decode(),
                uri=request.uri.decode("latin-1"),
            )
            error = RegistryError(500, "UNKNOWN", "internal error in regproxy; see its log")
        self._metrics.errors.labels(str(error.status)).inc()
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

    async def _handle(self, request: Request, gone: list[bool]) -> None:
        path = request.path.decode("latin-1")
        kind, match = _route(path)
        method = request.method
        if method not in (b"GET", b"HEAD"):
            raise unsupported(f"{method.decode('latin-1')} {path}")
        if kind in ("base", "tags", "referrers"):
            self._metrics.requests.labels(kind, "none").inc()
        if kind == "base":
            self._json(request, b"{}")
            return
        if kind == "upload":
            raise unsupported("pushing")
        client, repo = route(self._upstreams, request, match.group("name"))
        if kind == "manifest":
            reference = match.group("reference")
            if not (is_valid_tag(reference) or is_valid_digest(reference)):
                if ":" in reference:
                    raise digest_invalid(reference)
                raise RegistryError(400, "TAG_INVALID", f"invalid tag {reference!r}")
            accept = parse_accept(request.requestHeaders.getRawHeaders(b"Accept", []))
            manifest = await self._manifests.get(client, repo, reference, accept)
            if not gone:
                self._manifest(request, manifest)
        elif kind == "blob":
            digest = match.group("digest")
            if not is_valid_digest(digest):
                raise digest_invalid(digest)
            await self._blob(request, client, repo, Digest.parse(digest), gone)
        else:
            await self._listing(request, kind, match, client, repo, gone)

    async def _listing(
        self,
        request: Request,
        kind: str,
        match: re.Match[str],
        client: RegistryClient,
        repo: str,
        gone: list[bool],
    ) -> None:
        """The tag list, or the referrers of a manifest (OCI 1.1): passed
        through, not cached.  An upstream without the referrers API answers
        404, and so does regproxy: clients then look for referrers by tag."""
        keys: tuple[bytes, ...]
        if kind == "tags":
            path, unknown, keys = "tags/list", "NAME_UNKNOWN", (b"n", b"last")
        else:
            digest = match.group("digest")
            if not is_valid_digest(digest):
                raise digest_invalid(digest)
            path, unknown, keys = f"referrers/{digest}", "MANIFEST_UNKNOWN", (b"artifactType",)
        query = {
            key.decode(): values[-1].decode("latin-1")
            for key, values in request.args.items()
            if key in keys
        }
        if not query.get("n", "0").isdigit():
            raise RegistryError(
                400, "PAGINATION_NUMBER_INVALID", f"n must be a number, not {query['n']!r}"
            )
        body, headers = await client.get_listing(repo, path, query, unknown)
        if gone:
            return
        link = headers.pop("Link", None)
        if link and (link := _relink(link, repo, match.group("name"), request)):
            request.setHeader(b"Link", link.encode("latin-1"))
        for name, value in headers.items():
            request.setHeader(name.encode(), value.encode("latin-1"))
        self._json(request, body, headers.get("Content-Type", "application/json"))

    def _json(self, request: Request, body: bytes, content_type: str = "application/json") -> None:
        request.setHeader(b"Content-Type", content_type.encode("latin-1"))
        request.setHeader(b"Content-Length", b"%d" % len(body))
        request.write(body)
        request.finish()

    def _manifest(self, request: Request, manifest: CachedManifest) -> None:
        request.setHeader(b"Content-Type", manifest.media_type.encode())
        request.setHeader(b"Docker-Content-Digest", manifest.digest.encode())
        request.setHeader(b"ETag", f'"{manifest.digest}"'.encode())
        request.setHeader(b"Content-Length", b"%d" % len(manifest.body))
        request.setHeader(b"X-Cache", manifest.cache.encode())
        self._metrics.requests.labels("manifest", manifest.cache.lower()).inc()
        if request.method != b"HEAD":
            source = "upstream" if manifest.cache == "MISS" else "cache"
            self._metrics.served_bytes.labels(source).inc(len(manifest.body))
            request.write(manifest.body)
        request.finish()

    async def _blob(
        self, request: Request, client: RegistryClient, repo: str, digest: Digest, gone: list[bool]
    ) -> None:
        if self._blobs.store.stat(digest) is not None:
            # cached: may this repository read it? (a HEAD upstream unless it lists it)
            await self._blobs.confirm(client, repo, digest)
            if gone:
                return
        fd = self._blobs.open_stored(digest)  # after the await: it may have been purged meanwhile
        fetch = None
        size: int | None
        if fd is not None:
            cache, size = "HIT", os.fstat(fd).st_size
            self._blobs.served(digest)
        elif request.method == b"HEAD":
            cache, size = "MISS", await client.head_blob(repo, str(digest))
            if gone:
                return
        else:
            cache = "MISS"
            fetch = await self._blobs.fetch(client, repo, digest)
            size = fetch.size
        try:
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
                span = parse_range(request.getHeader("Range"), size)
                if span is not None:
                    start, end = span
                    request.setResponseCode(206)
                    request.setHeader(b"Content-Range", f"bytes {start}-{end - 1}/{size}".encode())
                request.setHeader(b"Content-Length", b"%d" % (end - start))  # type: ignore[operator]
            request.setHeader(b"Content-Type", b"application/octet-stream")
            request.setHeader(b"Docker-Content-Digest", str(digest).encode())
            request.setHeader(b"Accept-Ranges", b"bytes")
            request.setHeader(b"X-Cache", cache.encode())
            self._metrics.requests.labels("blob", cache.lower()).inc()
            if request.method == b"HEAD":
                request.finish()
                return
            self._send(request, fd, fetch, start, end)
            fd = None  # the sender owns it now
        finally:
            if fd is not None:
                self._blobs.close_stored(fd)
            if fetch is not None:
                fetch.release()  # the sender (if any) listens now

    def _send(
        self, request: Request, fd: int | None, fetch: BlobFetch | None, start: int, end: int | None
    ) -> None:
        counted = self._metrics.served_bytes.labels("upstream" if fetch else "cache").inc
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
            SendfileSender(request, transport, fd, start, end, counted, close_fd=close).start()
        else:
            close = self._blobs.close_stored
            BlobSender(request, start, end, fd=fd, counted=counted, close_fd=close).start()
