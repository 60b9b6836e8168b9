"""The admin API: a Klein app that parses, validates and renders, over an
:class:`~registryproxy.admin.backend.AdminBackend` that does the work.

Every answer is JSON (``/metrics`` aside) and every error is
``{"error": {"code": ..., "message": ...}}``.  The routes are described by
:mod:`registryproxy.admin.openapi`, served at ``/api/v1/openapi.json``.
"""

from __future__ import annotations

import hmac
import json
import math
import re
from datetime import UTC, datetime
from http import HTTPStatus
from typing import Any, TypeVar
from urllib.parse import parse_qs, quote, urlencode, urlsplit

import attrs
from klein import Klein
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource, Resource
from werkzeug.exceptions import HTTPException, MethodNotAllowed, NotFound

from ..cache.index import Page
from ..errors import RegistryError
from ..names import is_valid_digest, is_valid_name, is_valid_registry_host, is_valid_tag
from ..proxy.connections import Refusal
from ..reference import parse_image
from ..runtime import Threads
from ..structuring import matches
from . import bodies, openapi
from .backend import AdminBackend, AdminError, FsckResult, PurgeSelector, RepositorySummary
from .dashboard import Dashboard

log = Logger()
T = TypeVar("T")

#: the largest request body taken; an upstream's settings are a few hundred bytes
MAX_BODY = 64 * 1024
#: the listing's query parameters
_PAGING = ("n", "last", "sort", "q")
#: the only API route answered without the token (the dashboard's files are too)
OPEN_PATH = b"/healthz"


def _show(value: str, limit: int = 80) -> str:
    """*value* quoted for a message, cut short if long."""
    return repr(value if len(value) <= limit else value[:limit] + "...")


def _error(request: IRequest, status: int, message: str) -> bytes:
    return _json_bytes(request, _error_body(status, message), status)


def _error_body(status: int, message: str) -> bytes:
    try:
        code = HTTPStatus(status).name
    except ValueError:
        code = "ERROR"
    return json.dumps({"error": {"code": code, "message": message}}).encode() + b"\n"


def _json(request: IRequest, value: Any, status: int = 200) -> bytes:
    return _json_bytes(request, json.dumps(value, allow_nan=False).encode() + b"\n", status)


def _json_bytes(request: IRequest, body: bytes, status: int = 200) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", b"application/json")
    request.setHeader(b"Cache-Control", b"no-store")
    return body


def _query(request: IRequest, *known: str) -> dict[str, str]:
    """The query parameters, each given at most once and all of them *known*.

    Read from the URI rather than ``request.args``, which Twisted also fills
    from a form-encoded POST body (what ``curl -d`` sends)."""
    try:
        query = urlsplit(request.uri).query.decode("utf-8")
    except UnicodeDecodeError:
        raise AdminError(400, "the query string is not UTF-8") from None
    args: dict[str, str] = {}
    for name, values in parse_qs(query, keep_blank_values=True).items():
        if name not in known:
            takes = f"known here: {', '.join(known)}" if known else "this route takes none"
            raise AdminError(400, f"unknown query parameter {_show(name)} ({takes})")
        if len(values) > 1:
            raise AdminError(400, f"query parameter {name!r} is given {len(values)} times")
        args[name] = values[0]
    return args


def _flag(args: dict[str, str], name: str) -> bool:
    value = args.get(name, "false")
    if value not in ("true", "false"):
        raise AdminError(400, f"{name}: expected true or false, got {_show(value)}")
    return value == "true"


def parse_time(name: str, text: str) -> float:
    """Epoch seconds from epoch seconds or ISO 8601 (UTC when it names no zone)."""
    if matches(openapi.TIME_PATTERN, text):
        if re.fullmatch(r"[0-9]+(\.[0-9]+)?", text):
            return float(text)
        try:
            when = datetime.fromisoformat(text)
        except ValueError:
            pass
        else:
            return (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()
    raise AdminError(
        400,
        f"{name}: expected epoch seconds or an ISO 8601 time such as "
        f"2024-05-01T12:00:00Z, got {_show(text)}",
    )


def _times(args: dict[str, str]) -> tuple[float | None, float | None]:
    """``older_than`` and ``unused_since``, if given."""
    older, unused = args.get("older_than"), args.get("unused_since")
    return (
        parse_time("older_than", older) if older is not None else None,
        parse_time("unused_since", unused) if unused is not None else None,
    )


def _upstream(name: str) -> str:
    if not is_valid_registry_host(name):
        raise AdminError(
            400,
            f"{_show(name)} is not an upstream name: give a registry host such as "
            "docker.io, ghcr.io or localhost:5000",
        )
    return name


def _repository(name: str) -> str:
    if not is_valid_name(name):
        raise AdminError(
            400,
            f"{_show(name)} is not a repository name: use lowercase path components of "
            "letters, digits and single separators (. _ __ -), e.g. library/alpine",
        )
    return name


def _page(args: dict[str, str]) -> Page:
    """The page of the listing the query parameters ask for."""
    size = args.get("n", str(openapi.MAX_PAGE))
    if not re.fullmatch(r"[0-9]{1,9}", size) or not 1 <= int(size) <= openapi.MAX_PAGE:
        raise AdminError(
            400, f"n: expected a page size from 1 to {openapi.MAX_PAGE}, got {_show(size)}"
        )
    order = args.get("sort", "name")
    if order not in ("name", "size"):
        raise AdminError(
            400, f"sort: expected name (the default) or size (largest first), got {_show(order)}"
        )
    contains = args.get("q") or None
    if contains is not None:
        if len(contains) > openapi.MAX_SEARCH:
            raise AdminError(400, f"q: longer than {openapi.MAX_SEARCH} characters")
        if any(not c.isprintable() for c in contains):
            raise AdminError(400, f"q: {_show(contains)} has control characters; no name has")
    last = args.get("last")
    if last is None:
        return Page(contains, None, order == "size", int(size))
    if order == "size":
        raise AdminError(
            400,
            "last pages in name order only: sort=size answers the n largest repositories "
            "(leave last out)",
        )
    upstream, _, repository = last.partition("/")
    if not is_valid_registry_host(upstream) or not is_valid_name(repository):
        raise AdminError(
            400,
            f"last: expected upstream/repository as listed (the last row seen), e.g. "
            f"docker.io/library/alpine, got {_show(last)}",
        )
    return Page(contains, (upstream, repository), False, int(size))


def _next_link(request: IRequest, args: dict[str, str], last: RepositorySummary) -> bytes:
    """The ``Link`` header to the page after *last*, as the registry's
    catalog API gives it: the same path and parameters, ``last`` moved on."""
    following = {**args, "last": f"{last.upstream}/{last.repository}"}
    return f'<{quote(request.path, safe="/%:")}?{urlencode(following)}>; rel="next"'.encode()


def _image(text: str, where: str) -> str:
    """*text* if it names an image as ``docker pull`` takes it (AdminError 400 if not)."""
    if len(text) > bodies.IMAGE_MAX_LENGTH:
        raise AdminError(400, f"{where}: longer than {bodies.IMAGE_MAX_LENGTH} characters")
    try:
        parse_image(text)
    except ValueError as e:
        raise AdminError(400, f"{where}: {e}") from None
    return text


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"field {_show(key)} is given twice")
        result[key] = value
    return result


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{_show(text)} is too large a number")
    return value


def _body(request: IRequest, cls: type[T], limit: int) -> T:
    """The JSON body as a *cls* (:mod:`.bodies`)."""
    data = request.content.read(limit + 1) if request.content is not None else b""
    if len(data) > limit:
        raise AdminError(413, _too_large(limit))
    if not data.strip():
        raise AdminError(400, "send a JSON object as the request body")
    try:
        value = json.loads(
            data,
            parse_constant=_no_constant,
            parse_float=_finite,
            object_pairs_hook=_no_duplicates,
        )
    except (ValueError, RecursionError) as e:
        raise AdminError(400, f"the request body is not JSON: {e}") from None
    return bodies.parse(value, cls)


def _refusal(status: int, message: str, headers: dict[bytes, bytes] | None = None) -> Refusal:
    return Refusal(
        status,
        _error_body(status, message),
        {b"Content-Type": b"application/json", b"Cache-Control": b"no-store", **(headers or {})},
    )


def _record(value: Any) -> dict[str, Any]:
    """An attrs value as dicts, lists and tuples (which json writes as lists)."""
    return attrs.asdict(value)


#: a list's items encoded per call of json's encoder by :func:`_json_of`
_ITEMS_PER_DUMP = 256


def _json_of(value: Any) -> bytes:
    """:func:`_json`'s body of an attrs *value*, its lists made in pieces
    (an attrs item each, or :data:`_ITEMS_PER_DUMP` plain ones): json's
    encoder, in C, holds the GIL for a whole call (185 ms for a repository
    of 5,000 tags, 60 ms for a purge's 100,000 digests), and the reactor
    thread waits for it even when this runs in another thread."""
    parts = []
    for field in attrs.fields(type(value)):
        item = getattr(value, field.name)
        if isinstance(item, tuple) and item and attrs.has(type(item[0])):
            body = b"[" + b", ".join(_dumps(_record(each)) for each in item) + b"]"
        elif isinstance(item, tuple):
            step = _ITEMS_PER_DUMP
            pieces = (_dumps(list(item[i : i + step]))[1:-1] for i in range(0, len(item), step))
            body = b"[" + b", ".join(pieces) + b"]"
        else:
            body = _dumps(_record(item) if attrs.has(type(item)) else item)
        parts.append(_dumps(field.name) + b": " + body)
    return b"{" + b", ".join(parts) + b"}\n"


def _dumps(value: Any) -> bytes:
    return json.dumps(value, allow_nan=False).encode()


def _too_large(limit: int) -> str:
    return f"the request body is larger than {limit} bytes (admin.max_body)"


#: what a request without the right token is told
_UNAUTHORIZED = (
    "missing or wrong bearer token: send 'Authorization: Bearer <token>' with "
    "regproxy's admin.token (regproxy-admin reads REGPROXY_ADMIN_TOKEN)"
)
_CHALLENGE = (b"WWW-Authenticate", b'Bearer realm="regproxy-admin"')


def _authorized(headers: Headers, token: bytes) -> bool:
    header = headers.getRawHeaders(b"Authorization", [b""])[0]
    scheme, _, given = header.partition(b" ")
    # constant time: how long it takes says nothing of how much of the token matched
    return scheme.lower() == b"bearer" and hmac.compare_digest(given.strip(), token)


def _refused(method: bytes, path: bytes, client: str) -> None:
    log.warn(
        "admin API: refused {method} {path} from {client}: missing or wrong bearer token",
        method=method.decode("latin-1"),
        path=path.decode("latin-1"),
        client=client,
    )


class _Guard(Resource):
    """Asks for the bearer token before the Klein app sees a request."""

    isLeaf = True

    def __init__(self, app: IResource, token: str | None) -> None:
        super().__init__()
        self._app = app
        self._token = token.encode("utf-8") if token else None
        self._dashboard = Dashboard()

    def render(self, request: IRequest) -> Any:
        try:
            for part in (*request.postpath, request.getRequestHostname()):
                part.decode("utf-8")
        except UnicodeDecodeError:
            return _error(request, 400, "the URL or Host header is not UTF-8")
        if self._dashboard.serves(request):
            # the page and its files hold no data: every call they make asks for the token
            return self._dashboard.render(request)
        if (
            self._token is not None
            and request.path != OPEN_PATH
            and not _authorized(request.requestHeaders, self._token)
        ):
            client = getattr(request.getClientAddress(), "host", "?")
            _refused(request.method, request.path, client)
            request.setHeader(*_CHALLENGE)
            return _error(request, 401, _UNAUTHORIZED)
        return self._app.render(request)


class AdminAPI:
    """``AdminAPI(backend, token).resource()`` is the admin port's root resource.

    With ``token=None`` nothing is asked for: the caller makes sure the port
    listens on loopback only."""

    app = Klein()
    # /api//v1/stats is a 404, not werkzeug's redirect to /api/v1/stats
    app.url_map.merge_slashes = False

    def __init__(
        self,
        backend: AdminBackend,
        token: str | None,
        max_body: int = MAX_BODY,
        threads: Threads | None = None,
    ) -> None:
        """*threads*: where answers that grow with the cache are encoded
        (one thread: they queue there, not in the reactor's own pool, which
        resolves upstreams' host names)."""
        self._backend = backend
        self._token = token
        self._max_body = max_body
        if threads is None:
            from twisted.internet import reactor

            threads = Threads(reactor, "regproxy-admin-json", 1)  # type: ignore[arg-type]
        self._threads = threads
        self._openapi = json.dumps(openapi.document()).encode()

    def resource(self) -> IResource:
        return _Guard(self.app.resource(), self._token)

    def body_policy(
        self, method: bytes, path: bytes, headers: Headers, length: int | None
    ) -> Refusal | None:
        """Whether to read a request body: only with the token (whatever the
        route), a Content-Length, and at most max_body bytes.  Asked when
        the headers are in, before any of the body is read."""
        token = self._token.encode("utf-8") if self._token else None
        if token is not None and not _authorized(headers, token):
            _refused(method, path, "a client sending a body")
            return _refusal(401, _UNAUTHORIZED, dict([_CHALLENGE]))
        if length is None:
            return _refusal(411, "send the request body with a Content-Length")
        if length > self._max_body:
            return _refusal(413, _too_large(self._max_body))
        return None

    # -- errors ---------------------------------------------------------

    @app.handle_errors(Exception)
    def _failed(self, request: IRequest, failure: Failure) -> bytes:
        error = failure.value
        path = request.path.decode("utf-8", "replace")
        if isinstance(error, AdminError) and 400 <= error.status <= 599:
            return _error(request, error.status, error.message)
        if isinstance(error, RegistryError) and error.status == 503:
            return _error(request, 503, error.message)  # a cluster's index not answering
        if isinstance(error, MethodNotAllowed):
            allowed = sorted(error.valid_methods or ())
            request.setHeader(b"Allow", ", ".join(allowed).encode())
            method = request.method.decode("latin-1")
            return _error(request, 405, f"{method} {path} is not allowed; use {', '.join(allowed)}")
        if isinstance(error, NotFound):
            return _error(
                request, 404, f"no admin API route {path}: GET /api/v1/openapi.json lists them"
            )
        if isinstance(error, HTTPException) and error.code and 400 <= error.code < 500:
            return _error(request, error.code, error.description or "bad request")
        log.failure(
            "admin API: {method} {path} failed",
            failure,
            method=request.method.decode("latin-1"),
            path=path,
        )
        return _error(request, 500, "internal error in the regproxy admin API; see regproxy's log")

    # -- health and numbers ----------------------------------------------

    @app.route("/healthz", methods=["GET"])
    def healthz(self, request: IRequest) -> bytes:
        _query(request)
        return _json(request, {"status": "ok"})

    @app.route("/readyz", methods=["GET"])
    async def readyz(self, request: IRequest) -> bytes:
        _query(request)
        result = await self._backend.ready()
        return _json(request, result, 200 if result.get("ready") else 503)

    @app.route("/metrics", methods=["GET"])
    async def metrics(self, request: IRequest) -> bytes:
        _query(request)
        body, content_type = await self._backend.metrics()
        request.setHeader(b"Content-Type", content_type.encode())
        return body

    @app.route("/api/v1/openapi.json", methods=["GET"])
    def openapi_document(self, request: IRequest) -> bytes:
        _query(request)
        return _json_bytes(request, self._openapi)

    @app.route("/api/v1/stats", methods=["GET"])
    async def stats(self, request: IRequest) -> bytes:
        _query(request)
        return _json(request, await self._backend.stats())

    @app.route("/api/v1/history", methods=["GET"])
    def history(self, request: IRequest) -> bytes:
        _query(request)
        return _json(request, self._backend.history())

    @app.route("/api/v1/errors", methods=["GET"])
    def recent_errors(self, request: IRequest) -> bytes:
        _query(request)
        return _json(request, {"errors": self._backend.recent_errors()})

    # -- the cache -------------------------------------------------------

    async def _repositories(self, request: IRequest, upstream: str | None) -> bytes:
        args = _query(request, *_PAGING)
        page = _page(args)
        found = await self._backend.repositories(upstream, page)
        if found.more and not page.by_size:
            request.setHeader(b"Link", _next_link(request, args, found.repositories[-1]))
        return _json(request, {"repositories": [_record(r) for r in found.repositories]})

    async def _purge(self, request: IRequest, selector: PurgeSelector) -> bytes:
        result = await self._backend.purge(selector)
        log.info(
            "admin API: purged {selector}: {tags} tags, {manifests} manifests, "
            "{blobs} blobs, {bytes_freed} bytes freed",
            selector=selector,
            tags=result.tags,
            manifests=result.manifests,
            blobs=len(result.blobs),
            bytes_freed=result.bytes_freed,
        )
        # every digest deleted (100,000 in a purge of everything): made off
        # the reactor thread, as a repository's detail
        return _json_bytes(request, await self._threads.run(_json_of, result))

    @app.route("/api/v1/cache", methods=["GET"])
    async def list_repositories(self, request: IRequest) -> bytes:
        return await self._repositories(request, None)

    @app.route("/api/v1/cache", methods=["DELETE"])
    async def purge_cache(self, request: IRequest) -> bytes:
        args = _query(request, "all", "older_than", "unused_since")
        everything = _flag(args, "all")
        older_than, unused_since = _times(args)
        times = older_than is not None or unused_since is not None
        if everything and times:
            raise AdminError(
                400,
                "all=true purges everything: give it alone, or leave it out to purge "
                "by older_than / unused_since",
            )
        if not everything and not times:
            raise AdminError(
                400,
                "say what to purge: all=true for the whole cache, older_than= or "
                "unused_since= (epoch seconds or ISO 8601), or DELETE "
                "/api/v1/cache/<upstream>[/<repository>]",
            )
        selector = PurgeSelector(
            older_than=older_than, unused_since=unused_since, everything=everything
        )
        return await self._purge(request, selector)

    @app.route("/api/v1/cache/<upstream>", methods=["GET"])
    async def list_upstream_repositories(self, request: IRequest, upstream: str) -> bytes:
        return await self._repositories(request, _upstream(upstream))

    @app.route("/api/v1/cache/<upstream>", methods=["DELETE"])
    async def purge_upstream(self, request: IRequest, upstream: str) -> bytes:
        older_than, unused_since = _times(_query(request, "older_than", "unused_since"))
        selector = PurgeSelector(
            upstream=_upstream(upstream), older_than=older_than, unused_since=unused_since
        )
        return await self._purge(request, selector)

    @app.route("/api/v1/cache/<upstream>/<path:repository>", methods=["GET"])
    async def show_repository(self, request: IRequest, upstream: str, repository: str) -> bytes:
        _query(request)
        detail = await self._backend.repository(_upstream(upstream), _repository(repository))
        # off the reactor thread: 5,000 tags and manifests are 7 MB of JSON,
        # 370 ms of work that every client of the proxy would wait out
        # (and in pieces: see _json_of)
        body = await self._threads.run(_json_of, detail)
        return _json_bytes(request, body)

    @app.route("/api/v1/cache/<upstream>/<path:repository>", methods=["DELETE"])
    async def purge_repository(self, request: IRequest, upstream: str, repository: str) -> bytes:
        args = _query(request, "tag", "digest", "older_than", "unused_since")
        tag, digest = args.get("tag"), args.get("digest")
        if tag is not None and digest is not None:
            raise AdminError(400, "give tag or digest, not both")
        if tag is not None and not is_valid_tag(tag):
            raise AdminError(
                400, f"tag: {_show(tag)} is not a tag (letters, digits, _ . -; at most 128)"
            )
        if digest is not None and not is_valid_digest(digest):
            raise AdminError(
                400,
                f"digest: {_show(digest)} is not a digest (sha256:<64 hex> or sha512:<128 hex>)",
            )
        older_than, unused_since = _times(args)
        selector = PurgeSelector(
            upstream=_upstream(upstream),
            repository=_repository(repository),
            tag=tag,
            digest=digest,
            older_than=older_than,
            unused_since=unused_since,
        )
        return await self._purge(request, selector)

    # -- prefetch --------------------------------------------------------

    @app.route("/api/v1/prefetch", methods=["GET"])
    def list_prefetch(self, request: IRequest) -> bytes:
        _query(request)
        return _json(request, {"jobs": [_record(j) for j in self._backend.prefetch_jobs()]})

    @app.route("/api/v1/prefetch", methods=["POST"])
    def prefetch(self, request: IRequest) -> bytes:
        _query(request)
        body = _body(request, bodies.PrefetchRequest, self._max_body)
        try:
            image = parse_image(body.image)
        except ValueError as e:
            raise AdminError(400, f"image: {e}") from None
        job = self._backend.prefetch(
            image.upstream, image.repository, image.reference, body.platforms
        )
        log.info("admin API: prefetch {job} of {image}", job=job.id, image=str(image))
        request.setHeader(b"Location", f"/api/v1/prefetch/{quote(job.id, safe='')}".encode())
        return _json(request, _record(job), 202)

    @app.route("/api/v1/prefetch/<id>", methods=["GET"])
    def show_prefetch(self, request: IRequest, id: str) -> bytes:
        _query(request)
        for job in self._backend.prefetch_jobs():
            if job.id == id:
                return _json(request, _record(job))
        raise AdminError(404, f"no prefetch job {_show(id)}: GET /api/v1/prefetch lists them")

    # -- upstreams -------------------------------------------------------

    def _known_upstream(self, name: str) -> dict[str, Any]:
        shown = self._backend.upstreams().get(_upstream(name))
        if shown is None:
            raise AdminError(404, f"no upstream named {name!r}: GET /api/v1/upstreams lists them")
        return shown

    @app.route("/api/v1/upstreams", methods=["GET"])
    def list_upstreams(self, request: IRequest) -> bytes:
        _query(request)
        return _json(request, {"upstreams": self._backend.upstreams()})

    @app.route("/api/v1/upstreams/<name>", methods=["GET"])
    def show_upstream(self, request: IRequest, name: str) -> bytes:
        _query(request)
        return _json(request, self._known_upstream(name))

    @app.route("/api/v1/upstreams/<name>", methods=["PUT"])
    def put_upstream(self, request: IRequest, name: str) -> bytes:
        _query(request)
        settings = bodies.given(_body(request, bodies.UpstreamSettings, self._max_body))
        existed = _upstream(name) in self._backend.upstreams()
        shown = self._backend.set_upstream(name, settings, merge=False)
        log.info(
            "admin API: upstream {name} {how}", name=name, how="replaced" if existed else "added"
        )
        return _json(request, shown, 200 if existed else 201)

    @app.route("/api/v1/upstreams/<name>", methods=["PATCH"])
    def patch_upstream(self, request: IRequest, name: str) -> bytes:
        _query(request)
        settings = bodies.given(_body(request, bodies.UpstreamSettings, self._max_body))
        self._known_upstream(name)
        shown = self._backend.set_upstream(name, settings, merge=True)
        log.info("admin API: upstream {name} changed ({keys})", name=name, keys=", ".join(settings))
        return _json(request, shown)

    @app.route("/api/v1/upstreams/<name>", methods=["DELETE"])
    def delete_upstream(self, request: IRequest, name: str) -> bytes:
        _query(request)
        self._backend.remove_upstream(_upstream(name))
        log.info("admin API: upstream {name} removed", name=name)
        request.setResponseCode(204)
        return b""

    # -- the store -------------------------------------------------------

    @app.route("/api/v1/fsck", methods=["POST"])
    async def fsck(self, request: IRequest) -> bytes:
        _query(request)
        log.info("admin API: fsck started")
        result = await self._shielded_fsck()
        # (every file indexed again after --rebuild-index: tens of thousands)
        return _json_bytes(request, await self._threads.run(_json_of, result))

    def _shielded_fsck(self) -> Deferred[FsckResult]:
        """The backend's fsck, run to its end even if the client goes away.

        Klein cancels a route's Deferred when its connection is lost; passed
        on, that would abandon the fsck between hashing the store (in a
        thread that goes on regardless) and quarantining what did not match.
        The outcome is logged either way."""
        running = Deferred.fromCoroutine(self._backend.fsck())
        answer: Deferred[FsckResult] = Deferred()

        def done(result: FsckResult | Failure) -> None:
            if isinstance(result, Failure):
                if isinstance(result.value, AdminError):
                    log.info("admin API: fsck refused: {message}", message=result.value.message)
                elif answer.called:
                    log.failure("admin API: fsck failed", result)
                if not answer.called:
                    answer.errback(result)
                return
            log.info(
                "admin API: fsck done: {checked} blobs, {bytes} bytes checked, "
                "{quarantined} quarantined, {indexed} indexed, {forgotten} forgotten",
                checked=result.checked,
                bytes=result.bytes_checked,
                quarantined=len(result.quarantined),
                indexed=len(result.indexed),
                forgotten=len(result.forgotten),
            )
            if not answer.called:
                answer.callback(result)

        running.addBoth(done)
        return answer

    # -- pins ------------------------------------------------------------

    @app.route("/api/v1/pins", methods=["GET"])
    def list_pins(self, request: IRequest) -> bytes:
        _query(request)
        return _json(request, {"pins": [_record(p) for p in self._backend.pins()]})

    @app.route("/api/v1/pins", methods=["PUT"])
    def put_pin(self, request: IRequest) -> bytes:
        _query(request)
        image = _image(_body(request, bodies.PinRequest, self._max_body).image, "image")
        before = {p.image for p in self._backend.pins()}
        pin = self._backend.pin(image)
        existed = pin.image in before
        if not existed:
            log.info("admin API: pinned {image}", image=pin.image)
        return _json(request, _record(pin), 200 if existed else 201)

    @app.route("/api/v1/pins", methods=["DELETE"])
    def delete_pin(self, request: IRequest) -> bytes:
        image = _query(request, "image").get("image")
        if image is None:
            raise AdminError(
                400, "say what to unpin: DELETE /api/v1/pins?image=<image>, e.g. image=nginx:1.27"
            )
        self._backend.unpin(_image(image, "image"))
        log.info("admin API: unpinned {image}", image=image)
        request.setResponseCode(204)
        return b""
