"""An in-process fake upstream registry for regproxy's unit tests.

:class:`FakeRegistry` serves the OCI distribution-spec *pull* API the way
Docker Hub does, on a real listening port on 127.0.0.1 in the test's reactor,
plus a second listener that plays the blob CDN Docker Hub redirects to.
Knobs inject the edge cases the proxy must survive (token auth, redirects,
broken bodies, throttling) and every request is recorded for assertions::

    registry = await FakeRegistry.start(auth="bearer")
    digest, manifest = registry.add_image("library/alpine", "3.20", [b"layer"])
    registry.blob_faults["*"] = Fault.truncate(after=2, times=1)
    ...
    assert registry.count("GET", "/token") == 1
    await registry.stop()

Behaviour worth knowing:

- Blobs are global (content-addressed), not per repository; manifests and
  tags are per repository.
- ``status_override`` is consulted before auth and routing, on both listeners.
- A manifest fetched by digest ignores ``Accept``; by tag, the first variant
  the ``Accept`` header allows wins (no ``Accept``: the first variant).
- The CDN sends no ``Docker-Content-Digest``, like real CDNs.
"""

from __future__ import annotations

import base64
import datetime
import gzip
import hashlib
import hmac
import json
import re
import secrets
import weakref
import zlib
from collections.abc import Callable, Sequence
from typing import Any, Literal
from urllib.parse import parse_qs, quote, urlsplit

import attrs
from memorynet import NETWORK
from twisted.internet import endpoints
from twisted.internet.interfaces import IDelayedCall, IListeningPort
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.web.http import HTTPChannel
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

AuthMode = Literal["bearer", "basic"] | None
Host = Literal["registry", "cdn"]
FaultKind = Literal["wrong_bytes", "truncate", "extra_bytes", "stall", "slow", "unsized"]
ImageMedia = Literal["docker", "oci"]

SERVICE = "fake-registry"

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"

_MEDIA = {
    "docker": (DOCKER_MANIFEST, DOCKER_CONFIG, DOCKER_LAYER, DOCKER_MANIFEST_LIST),
    "oci": (OCI_MANIFEST, OCI_CONFIG, OCI_LAYER, OCI_INDEX),
}

_V2_BASE = re.compile(r"/v2/?")
_MANIFEST = re.compile(r"/v2/(?P<name>.+)/manifests/(?P<ref>[^/]+)")
_BLOB = re.compile(r"/v2/(?P<name>.+)/blobs/(?P<digest>[^/]+)")
_TAGS = re.compile(r"/v2/(?P<name>.+)/tags/list")
_REFERRERS = re.compile(r"/v2/(?P<name>.+)/referrers/(?P<digest>[^/]+)")
_CDN_BLOB = re.compile(r"/blobs/(?P<digest>[^/]+)")
_RANGE = re.compile(r"bytes=(\d*)-(\d*)")

_DEFAULT_CODES = {
    400: "BAD_REQUEST",
    401: "UNAUTHORIZED",
    403: "DENIED",
    404: "NOT_FOUND",
    405: "UNSUPPORTED",
    429: "TOOMANYREQUESTS",
}


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def error_body(code: str, message: str, detail: Any = None) -> bytes:
    """The distribution-spec error document."""
    error: dict[str, Any] = {"code": code, "message": message}
    if detail is not None:
        error["detail"] = detail
    return json.dumps({"errors": [error]}).encode()


@attrs.define
class Fault:
    """A broken response body, for :attr:`FakeRegistry.blob_faults` (or
    ``manifest_faults``). Build one with the class methods.

    ``times`` is how many more GET responses it breaks (``None``: all of them);
    ``used`` counts the responses it broke. HEAD responses are never broken.
    A trickle (``slow``, ``unsized``) takes its ``chunk`` and ``delay`` from
    the fault at each step: a test may hurry one along that has served its
    purpose (``fault.delay = 0``).
    """

    kind: FaultKind
    after: int = 0
    count: int = 16
    declared: bool = True
    reset: bool = True
    chunk: int = 1024
    delay: float = 0.01
    times: int | None = None
    used: int = 0

    @classmethod
    def wrong_bytes(cls, *, times: int | None = None) -> Fault:
        """Other bytes of the same length, correct ``Content-Length``."""
        return cls("wrong_bytes", times=times)

    @classmethod
    def truncate(cls, after: int, *, reset: bool = True, times: int | None = None) -> Fault:
        """Full ``Content-Length``, ``after`` bytes, then the connection dies:
        a TCP reset (``reset=True``) or an early clean close (``reset=False``)."""
        return cls("truncate", after=after, reset=reset, times=times)

    @classmethod
    def extra_bytes(
        cls, count: int = 16, *, declared: bool = True, times: int | None = None
    ) -> Fault:
        """``count`` bytes more than the content. ``declared=True``: counted in
        ``Content-Length`` (a longer body); ``False``: ``Content-Length`` is
        right and the surplus follows the body on the connection."""
        return cls("extra_bytes", count=count, declared=declared, times=times)

    @classmethod
    def stall(cls, after: int = 0, *, times: int | None = None) -> Fault:
        """``after`` bytes, then silence with the connection open until the
        client gives up or :meth:`FakeRegistry.stop`."""
        return cls("stall", after=after, times=times)

    @classmethod
    def slow(cls, chunk: int = 1024, delay: float = 0.01, *, times: int | None = None) -> Fault:
        """The right bytes, ``chunk`` at a time, ``delay`` seconds apart."""
        return cls("slow", chunk=chunk, delay=delay, times=times)

    @classmethod
    def unsized(cls, chunk: int = 1024, delay: float = 0.0, *, times: int | None = None) -> Fault:
        """The right bytes with no ``Content-Length`` (chunked), ``chunk``
        at a time, ``delay`` seconds apart."""
        return cls("unsized", chunk=chunk, delay=delay, times=times)

    def _take(self) -> bool:
        if self.times is not None:
            if self.times <= 0:
                return False
            self.times -= 1
        self.used += 1
        return True


@attrs.define
class Override:
    """A canned answer, for :attr:`FakeRegistry.status_override`.

    ``body=None`` makes a spec error document from the status (429 gives
    ``TOOMANYREQUESTS``). ``times`` limits how many requests it answers.
    """

    status: int
    headers: dict[str, str] = attrs.field(factory=dict)
    body: bytes | None = None
    times: int | None = None
    used: int = 0


@attrs.define
class RecordedRequest:
    method: str
    path: str
    query: dict[str, list[str]]
    #: Every header line, names lower-cased.
    headers: dict[str, list[str]]
    authorization: str | None
    host: Host
    time: float
    #: The status the fake answered with (None until it answered).
    status: int | None = None

    def header(self, name: str) -> list[str]:
        return self.headers.get(name.lower(), [])


@attrs.define
class _Token:
    repositories: frozenset[str]
    expires_at: float


class _Site(Site):
    """A quiet Site that remembers its connections so stop() can cut them."""

    # Plain HTTP/1.1 channels (no HTTP/2 negotiation wrapper): they expose .transport.
    protocol = HTTPChannel  # type: ignore[assignment]

    def __init__(self, resource: Resource) -> None:
        super().__init__(resource)
        self.channels: weakref.WeakSet[Any] = weakref.WeakSet()

    def buildProtocol(self, addr: Any) -> Any:
        channel = super().buildProtocol(addr)
        self.channels.add(channel)
        return channel

    def log(self, request: Any) -> None:
        pass


class _Listener(Resource):
    isLeaf = True

    def __init__(self, handle: Callable[[Request], bytes | int]) -> None:
        super().__init__()
        self._handle = handle

    def render(self, request: Request) -> bytes | int:
        return self._handle(request)


def _pending_bytes(transport: Any) -> int:
    # FileDescriptor's write buffers; no public API tells when they drained.
    buffered = len(getattr(transport, "dataBuffer", b"")) - getattr(transport, "offset", 0)
    return buffered + getattr(transport, "_tempDataLen", 0)


@attrs.define(eq=False)
class FakeRegistry:
    """A fake Docker-Hub-like registry. Create with :meth:`start`."""

    log = Logger()

    reactor: Any
    #: Token and signed-URL expiry and record times; defaults to the reactor.
    clock: Any
    auth: AuthMode = None
    username: str = "user"
    password: str = "pass"
    token_expires_in: int = 300

    # --- behaviours; change them at any time -------------------------------
    #: Blob GETs answer ``redirect_status`` to a signed CDN URL.
    redirect_blobs: bool = False
    #: Blob HEADs redirect too (Docker Hub answers them directly).
    redirect_head: bool = False
    redirect_status: int = 307
    #: Lifetime of a signed CDN URL; after it the CDN answers 403.
    redirect_expires_in: float = 600.0
    #: Blobs carry ``Content-Encoding: gzip`` while the bytes stay the blob.
    gzip_encoding_header: bool = False
    #: Blob responses honour a single ``Range: bytes=a-b`` with 206.
    honour_ranges: bool = True
    #: Bearer mode: /token issues tokens without credentials (public repos).
    anonymous_tokens: bool = True
    #: Bearer mode: repositories an anonymous token grants no pull of.
    private_repos: set[str] = attrs.field(factory=set)
    #: Serves the OCI 1.1 referrers API (else 404, as registries before it do).
    referrers_api: bool = True
    #: Per digest, or ``"*"`` for every blob.
    blob_faults: dict[str, Fault] = attrs.field(factory=dict)
    #: Seconds blob responses wait before their headers, by method ("GET", "HEAD").
    blob_delay: dict[str, float] = attrs.field(factory=dict)
    #: Seconds a tag list waits before its answer.
    tags_delay: float = 0.0
    #: Per manifest digest, or ``"*"``; applies to tag fetches too.
    manifest_faults: dict[str, Fault] = attrs.field(factory=dict)
    #: Regex (``re.search`` on the path) -> Override or (status, headers, body).
    status_override: dict[str, Override | tuple[int, dict[str, str], bytes | None]] = attrs.field(
        factory=dict
    )

    # --- observation ---------------------------------------------------------
    requests: list[RecordedRequest] = attrs.field(factory=list)

    # --- state ---------------------------------------------------------------
    url: str = ""
    cdn_url: str = ""
    _blobs: dict[str, bytes] = attrs.field(factory=dict, init=False)
    _manifests: dict[str, dict[str, tuple[bytes, str]]] = attrs.field(factory=dict, init=False)
    _tags: dict[str, dict[str, list[str]]] = attrs.field(factory=dict, init=False)
    _platforms: dict[str, dict[str, str]] = attrs.field(factory=dict, init=False)
    _tokens: dict[str, _Token] = attrs.field(factory=dict, init=False)
    _sign_key: bytes = attrs.field(factory=lambda: secrets.token_bytes(16), init=False)
    _ports: list[IListeningPort] = attrs.field(factory=list, init=False)
    _sites: list[_Site] = attrs.field(factory=list, init=False)
    _calls: set[IDelayedCall] = attrs.field(factory=set, init=False)
    _stopped: bool = attrs.field(default=False, init=False)

    # ------------------------------------------------------------------------
    # lifecycle

    @classmethod
    async def start(
        cls,
        reactor: Any = None,
        auth: AuthMode = None,
        username: str = "user",
        password: str = "pass",
        token_expires_in: int = 300,
        *,
        clock: Any = None,
        tls: Any = None,
    ) -> FakeRegistry:
        """Listen on two ephemeral ports on 127.0.0.1: the registry and its CDN.

        With *tls* (server ``CertificateOptions``, for the name ``localhost``)
        the registry speaks https at ``https://localhost:PORT``."""
        if auth not in (None, "bearer", "basic"):
            raise ValueError(f"auth must be None, 'bearer' or 'basic', not {auth!r}")
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self = cls(
            reactor=reactor,
            clock=clock if clock is not None else reactor,
            auth=auth,
            username=username,
            password=password,
            token_expires_in=token_expires_in,
        )
        self.url = await self._listen(self._handle_registry, tls)
        self.cdn_url = await self._listen(self._handle_cdn)
        return self

    async def _listen(self, handle: Callable[[Request], bytes | int], tls: Any = None) -> str:
        site = _Site(_Listener(handle))
        if tls is None:
            endpoint = endpoints.serverFromString(self.reactor, "tcp:0:interface=127.0.0.1")
        else:
            endpoint = endpoints.SSL4ServerEndpoint(self.reactor, 0, tls, interface="127.0.0.1")
        port = await endpoint.listen(site)
        self._ports.append(port)
        self._sites.append(site)
        if tls is None:
            NETWORK.serve("127.0.0.1", port.getHost().port, site)
            return f"http://127.0.0.1:{port.getHost().port}"
        return f"https://localhost:{port.getHost().port}"

    async def stop(self) -> None:
        """Stop listening and cut every open connection (stalled ones too)."""
        if self._stopped:
            return
        self._stopped = True
        for call in self._calls:
            if call.active():
                call.cancel()
        self._calls.clear()
        for port in self._ports:
            NETWORK.forget("127.0.0.1", port.getHost().port)
            stopped = port.stopListening()
            if stopped is not None:
                await stopped
        transports = []
        for site in self._sites:
            for channel in list(site.channels):
                transport = getattr(channel, "transport", None)
                if transport is not None and getattr(transport, "connected", False):
                    transport.abortConnection()
                    transports.append(transport)
        for _ in range(50):
            if not any(getattr(t, "connected", False) for t in transports):
                break
            await deferLater(self.reactor, 0.001, lambda: None)

    # ------------------------------------------------------------------------
    # content

    def add_blob(self, data: bytes) -> str:
        digest = sha256(data)
        self._blobs[digest] = data
        return digest

    def remove_blob(self, digest: str) -> None:
        self._blobs.pop(digest, None)

    def add_manifest(
        self, repo: str, body: bytes, media_type: str, tags: Sequence[str] = ()
    ) -> str:
        """Store a manifest; each tag gets it as its variant for ``media_type``
        (replacing an earlier variant of that type, else appended)."""
        digest = sha256(body)
        self._manifests.setdefault(repo, {})[digest] = (body, media_type)
        repo_tags = self._tags.setdefault(repo, {})
        for tag in tags:
            variants = repo_tags.setdefault(tag, [])
            variants[:] = [d for d in variants if self._manifests[repo][d][1] != media_type]
            variants.append(digest)
        return digest

    def untag(self, repo: str, tag: str) -> None:
        self._tags.get(repo, {}).pop(tag, None)

    def add_image(
        self,
        repo: str,
        tag: str | None,
        layers: Sequence[bytes],
        media: ImageMedia = "docker",
        *,
        architecture: str = "amd64",
        os: str = "linux",
    ) -> tuple[str, bytes]:
        """A config blob, the layer blobs and a manifest; returns its digest and bytes."""
        manifest_type, config_type, layer_type, _ = _MEDIA[media]
        config = json.dumps(
            {
                "architecture": architecture,
                "os": os,
                "rootfs": {"type": "layers", "diff_ids": [_diff_id(layer) for layer in layers]},
                "config": {},
            },
            sort_keys=True,
        ).encode()
        manifest = {
            "schemaVersion": 2,
            "mediaType": manifest_type,
            "config": {
                "mediaType": config_type,
                "size": len(config),
                "digest": self.add_blob(config),
            },
            "layers": [
                {"mediaType": layer_type, "size": len(layer), "digest": self.add_blob(layer)}
                for layer in layers
            ],
        }
        body = json.dumps(manifest, indent=3).encode()
        digest = self.add_manifest(repo, body, manifest_type, [tag] if tag else [])
        self._platforms[digest] = {"architecture": architecture, "os": os}
        return digest, body

    def add_index(
        self, repo: str, tag: str | None, manifests: Sequence[str], media: ImageMedia = "docker"
    ) -> str:
        """A manifest list / OCI index over manifests already in ``repo``."""
        index_type = _MEDIA[media][3]
        stored = self._manifests.get(repo, {})
        descriptors = []
        for digest in manifests:
            if digest not in stored:
                raise KeyError(f"{digest} is not a manifest of {repo}: add it first")
            body, media_type = stored[digest]
            descriptors.append(
                {
                    "mediaType": media_type,
                    "size": len(body),
                    "digest": digest,
                    "platform": self._platforms.get(
                        digest, {"architecture": "amd64", "os": "linux"}
                    ),
                }
            )
        index = {"schemaVersion": 2, "mediaType": index_type, "manifests": descriptors}
        body = json.dumps(index, indent=3).encode()
        return self.add_manifest(repo, body, index_type, [tag] if tag else [])

    # ------------------------------------------------------------------------
    # behaviours and observation

    def expire_tokens(self) -> None:
        """Every token issued so far stops working now."""
        self._tokens.clear()

    def count(
        self, method: str | None, path_contains: str = "", *, host: Host | None = None
    ) -> int:
        """Requests with this method (None: any) whose path contains the text."""
        return sum(
            1
            for r in self.requests
            if (method is None or r.method == method.upper())
            and path_contains in r.path
            and (host is None or r.host == host)
        )

    @property
    def cdn_rejections(self) -> list[RecordedRequest]:
        """CDN requests refused because they carried ``Authorization``."""
        return [r for r in self.requests if r.host == "cdn" and r.authorization is not None]

    # ------------------------------------------------------------------------
    # HTTP plumbing

    def _record(self, request: Request, host: Host) -> RecordedRequest:
        headers = {
            name.decode("latin-1").lower(): [v.decode("latin-1") for v in values]
            for name, values in request.requestHeaders.getAllRawHeaders()
        }
        record = RecordedRequest(
            method=request.method.decode("ascii"),
            path=request.path.decode("latin-1"),
            query=parse_qs(urlsplit(request.uri.decode("latin-1")).query, keep_blank_values=True),
            headers=headers,
            authorization=headers.get("authorization", [None])[0],
            host=host,
            time=self.clock.seconds(),
        )
        self.requests.append(record)
        return record

    def _handle_registry(self, request: Request) -> bytes | int:
        record = self._record(request, "registry")
        result = self._override(request, record) or self._route_registry(request, record)
        record.status = request.code
        self.log.debug(
            "fake registry {method} {path} -> {status}",
            method=record.method,
            path=record.path,
            status=record.status,
        )
        return result

    def _handle_cdn(self, request: Request) -> bytes | int:
        record = self._record(request, "cdn")
        result = self._override(request, record) or self._route_cdn(request, record)
        record.status = request.code
        return result

    def _override(self, request: Request, record: RecordedRequest) -> bytes | int | None:
        for pattern, value in self.status_override.items():
            if not re.search(pattern, record.path):
                continue
            override = value if isinstance(value, Override) else Override(*value)
            if override.times is not None:
                if override.times <= 0:
                    continue
                override.times -= 1
            override.used += 1
            body = override.body
            if body is None:
                code = _DEFAULT_CODES.get(override.status, "UNKNOWN")
                body = error_body(code, f"status_override {pattern!r}: {override.status}")
                request.setHeader(b"Content-Type", b"application/json")
            request.setResponseCode(override.status)
            for name, header in override.headers.items():
                request.setHeader(name.encode(), header.encode())
            return self._send(request, body)
        return None

    def _send(self, request: Request, body: bytes, length: int | None = None) -> int:
        """Write the whole body with an exact Content-Length (HEAD: headers only)."""
        request.setHeader(b"Content-Length", b"%d" % (len(body) if length is None else length))
        if request.method != b"HEAD":
            request.write(body)
        else:
            request.write(b"")
        request.finish()
        return NOT_DONE_YET

    def _error(
        self,
        request: Request,
        status: int,
        code: str,
        message: str,
        headers: dict[str, str] | None = None,
    ) -> int:
        request.setResponseCode(status)
        request.setHeader(b"Content-Type", b"application/json")
        for name, value in (headers or {}).items():
            request.setHeader(name.encode(), value.encode())
        return self._send(request, error_body(code, message))

    # ------------------------------------------------------------------------
    # registry routes

    def _route_registry(self, request: Request, record: RecordedRequest) -> bytes | int:
        request.setHeader(b"Docker-Distribution-API-Version", b"registry/2.0")
        path = record.path
        if path == "/token":
            if request.method != b"GET":
                return self._error(request, 405, "UNSUPPORTED", "the token endpoint takes GET")
            return self._token(request, record)
        if request.method not in (b"GET", b"HEAD"):
            return self._error(
                request, 405, "UNSUPPORTED", "the fake registry only serves pulls (GET, HEAD)"
            )
        if _V2_BASE.fullmatch(path):
            if not self._authorized(request, record, None):
                return NOT_DONE_YET
            request.setHeader(b"Content-Type", b"application/json")
            return self._send(request, b"{}")
        for pattern, handler in (
            (_MANIFEST, self._manifest),
            (_BLOB, self._blob),
            (_TAGS, self._tags_list),
            (_REFERRERS, self._referrers),
        ):
            match = pattern.fullmatch(path)
            if match:
                name = match.group("name")
                if not self._authorized(request, record, name):
                    return NOT_DONE_YET
                return handler(request, record, *match.groups())
        return self._error(request, 404, "NOT_FOUND", f"no route for {path}")

    def _authorized(self, request: Request, record: RecordedRequest, repo: str | None) -> bool:
        """True if the request may proceed; else a 401 has been sent."""
        if self.auth is None:
            return True
        credentials = record.authorization or ""
        if self.auth == "basic":
            if credentials == _basic(self.username, self.password):
                return True
            self._error(
                request,
                401,
                "UNAUTHORIZED",
                "authentication required",
                {"WWW-Authenticate": 'Basic realm="fake"'},
            )
            return False
        challenge = f'Bearer realm="{self.url}/token",service="{SERVICE}"'
        if repo is not None:
            challenge += f',scope="repository:{repo}:pull"'
        error = None
        scheme, _, value = credentials.partition(" ")
        if scheme.lower() == "bearer":
            token = self._tokens.get(value.strip())
            if token is None or token.expires_at <= self.clock.seconds():
                error = "invalid_token"
            elif repo is None or repo in token.repositories:
                return True
            else:
                error = "insufficient_scope"
        if error is not None:
            challenge += f',error="{error}"'
        detail = None
        if repo is not None:
            detail = [{"Type": "repository", "Class": "", "Name": repo, "Action": "pull"}]
        request.setResponseCode(401)
        request.setHeader(b"Content-Type", b"application/json")
        request.setHeader(b"WWW-Authenticate", challenge.encode())
        self._send(request, error_body("UNAUTHORIZED", "authentication required", detail))
        return False

    def _token(self, request: Request, record: RecordedRequest) -> int:
        credentials = record.authorization
        if credentials is not None and credentials != _basic(self.username, self.password):
            return self._token_refused(request, "incorrect username or password")
        if credentials is None and not self.anonymous_tokens:
            return self._token_refused(request, "this repository needs a login")
        repositories = set()
        for scope in record.query.get("scope", []):
            for one in scope.split(" "):
                kind, _, rest = one.partition(":")
                name, _, actions = rest.rpartition(":")
                if kind == "repository" and name and "pull" in actions.split(","):
                    if credentials is not None or name not in self.private_repos:
                        repositories.add(name)
        token = secrets.token_urlsafe(24)
        now = self.clock.seconds()
        self._tokens[token] = _Token(frozenset(repositories), now + self.token_expires_in)
        issued_at = datetime.datetime.fromtimestamp(now, datetime.UTC)
        body = {
            "token": token,
            "access_token": token,
            "expires_in": self.token_expires_in,
            "issued_at": issued_at.isoformat().replace("+00:00", "Z"),
        }
        request.setHeader(b"Content-Type", b"application/json")
        return self._send(request, json.dumps(body).encode())

    def _token_refused(self, request: Request, details: str) -> int:
        request.setResponseCode(401)
        request.setHeader(b"Content-Type", b"application/json")
        request.setHeader(b"WWW-Authenticate", b'Basic realm="fake-token"')
        return self._send(request, json.dumps({"details": details}).encode())

    def _manifest(self, request: Request, record: RecordedRequest, name: str, ref: str) -> int:
        stored = self._manifests.get(name)
        if stored is None:
            return self._error(
                request, 404, "NAME_UNKNOWN", f"repository name {name!r} not known to registry"
            )
        if ":" in ref:
            if ref not in stored:
                return self._error(request, 404, "MANIFEST_UNKNOWN", f"manifest {ref} unknown")
            digest = ref
        else:
            variants = self._tags.get(name, {}).get(ref, [])
            if not variants:
                return self._error(
                    request, 404, "MANIFEST_UNKNOWN", f"manifest tagged by {ref!r} is not found"
                )
            accepted = _accepted(record)
            found = _negotiate(accepted, [(d, stored[d][1]) for d in variants])
            if found is None:
                # as Distribution and Docker Hub: a client that takes no
                # list gets the list's linux/amd64 manifest
                found = self._platform_fallback(accepted, [stored[d] for d in variants], stored)
            if found is None:
                media_type = stored[variants[0]][1]
                return self._error(
                    request,
                    404,
                    "MANIFEST_UNKNOWN",
                    f"{media_type} found, but accept header does not support it",
                )
            digest = found
        body, media_type = stored[digest]
        request.setHeader(b"Content-Type", media_type.encode())
        request.setHeader(b"Docker-Content-Digest", digest.encode())
        request.setHeader(b"ETag", f'"{digest}"'.encode())
        return self._serve(request, body, self._fault(self.manifest_faults, digest, request))

    @staticmethod
    def _platform_fallback(
        accepted: set[str] | None,
        variants: list[tuple[bytes, str]],
        stored: dict[str, tuple[bytes, str]],
    ) -> str | None:
        for body, media_type in variants:
            if media_type not in _LIST_TYPES:
                continue
            for d in json.loads(body)["manifests"]:
                platform = d.get("platform", {})
                if (platform.get("os"), platform.get("architecture")) != ("linux", "amd64"):
                    continue
                if d["digest"] in stored and _negotiate(
                    accepted, [(d["digest"], stored[d["digest"]][1])]
                ):
                    return str(d["digest"])
        return None

    def _blob(self, request: Request, record: RecordedRequest, name: str, digest: str) -> int:
        delay = self.blob_delay.get(request.method.decode("ascii"))
        if delay:

            def answer() -> None:
                if not request._disconnected and not self._stopped:  # type: ignore[attr-defined]
                    self._blob_now(request, record, name, digest)

            self._later(delay, answer)
            return NOT_DONE_YET
        return self._blob_now(request, record, name, digest)

    def _blob_now(self, request: Request, record: RecordedRequest, name: str, digest: str) -> int:
        data = self._blobs.get(digest)
        if data is None:
            return self._error(request, 404, "BLOB_UNKNOWN", f"blob {digest} unknown to registry")
        if self.redirect_blobs and (request.method == b"GET" or self.redirect_head):
            request.setResponseCode(self.redirect_status)
            request.setHeader(b"Location", self._signed_url(digest).encode())
            return self._send(request, b"")
        request.setHeader(b"Docker-Content-Digest", digest.encode())
        return self._serve_blob(request, record, digest, data)

    def _referrers(self, request: Request, record: RecordedRequest, name: str, digest: str) -> int:
        """The manifests of *name* whose ``subject`` is *digest*, as an OCI index."""
        if not self.referrers_api:
            return self._error(request, 404, "NOT_FOUND", f"no route for {request.path!r}")
        wanted = record.query.get("artifactType", [None])[0]
        found = []
        for child, (body, media_type) in self._manifests.get(name, {}).items():
            document = json.loads(body)
            if document.get("subject", {}).get("digest") != digest:
                continue
            kind = document.get("artifactType") or document.get("config", {}).get("mediaType")
            if wanted is not None and kind != wanted:
                continue
            descriptor = {"mediaType": media_type, "digest": child, "size": len(body)}
            descriptor["artifactType"] = kind
            if "annotations" in document:
                descriptor["annotations"] = document["annotations"]
            found.append(descriptor)
        if wanted is not None:
            request.setHeader(b"OCI-Filters-Applied", b"artifactType")
        request.setHeader(b"Content-Type", OCI_INDEX.encode())
        index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": found}
        return self._send(request, json.dumps(index).encode())

    def _tags_list(self, request: Request, record: RecordedRequest, name: str) -> int:
        if self.tags_delay:

            def answer() -> None:
                if not request._disconnected and not self._stopped:  # type: ignore[attr-defined]
                    self._tags_list_now(request, record, name)

            self._later(self.tags_delay, answer)
            return NOT_DONE_YET
        return self._tags_list_now(request, record, name)

    def _tags_list_now(self, request: Request, record: RecordedRequest, name: str) -> int:
        if name not in self._tags and name not in self._manifests:
            return self._error(
                request, 404, "NAME_UNKNOWN", f"repository name {name!r} not known to registry"
            )
        tags = sorted(t for t, v in self._tags.get(name, {}).items() if v)
        last = record.query.get("last", [None])[0]
        if last:
            tags = [t for t in tags if t > last]
        n_text = record.query.get("n", [None])[0]
        if n_text is not None:
            if not n_text.isdigit():
                return self._error(
                    request, 400, "PAGINATION_NUMBER_INVALID", f"invalid n={n_text!r}"
                )
            n = int(n_text)
            if len(tags) > n:
                tags = tags[:n]
                if tags:
                    next_page = f"/v2/{name}/tags/list?n={n}&last={quote(tags[-1])}"
                    request.setHeader(b"Link", f'<{next_page}>; rel="next"'.encode())
        request.setHeader(b"Content-Type", b"application/json")
        return self._send(request, json.dumps({"name": name, "tags": tags}).encode())

    # ------------------------------------------------------------------------
    # the CDN

    def _signed_url(self, digest: str) -> str:
        expires = int(self.clock.seconds() + self.redirect_expires_in)
        return f"{self.cdn_url}/blobs/{digest}?expires={expires}&sig={self._sign(digest, expires)}"

    def _sign(self, digest: str, expires: int) -> str:
        message = f"{digest}\n{expires}".encode()
        return hmac.new(self._sign_key, message, hashlib.sha256).hexdigest()[:32]

    def _route_cdn(self, request: Request, record: RecordedRequest) -> int:
        if record.authorization is not None:
            request.setResponseCode(400)
            request.setHeader(b"Content-Type", b"application/xml")
            return self._send(
                request,
                b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>InvalidArgument</Code>"
                b"<Message>Only one auth mechanism allowed; only the X-Amz-Algorithm query "
                b"parameter, Signature query string parameter or the Authorization header "
                b"should be specified</Message></Error>",
            )
        match = _CDN_BLOB.fullmatch(record.path)
        if request.method not in (b"GET", b"HEAD") or match is None:
            request.setResponseCode(404 if match is None else 405)
            return self._send(request, b"")
        digest = match.group("digest")
        expires_text = record.query.get("expires", [""])[0]
        sig = record.query.get("sig", [""])[0]
        if not expires_text.isdigit() or not hmac.compare_digest(
            sig, self._sign(digest, int(expires_text))
        ):
            request.setResponseCode(403)
            return self._send(request, b"signature does not match")
        if int(expires_text) <= self.clock.seconds():
            request.setResponseCode(403)
            return self._send(request, b"request has expired")
        data = self._blobs.get(digest)
        if data is None:
            request.setResponseCode(404)
            return self._send(request, b"not found")
        return self._serve_blob(request, record, digest, data)

    # ------------------------------------------------------------------------
    # bodies

    def _serve_blob(
        self, request: Request, record: RecordedRequest, digest: str, data: bytes
    ) -> int:
        request.setHeader(b"Content-Type", b"application/octet-stream")
        request.setHeader(b"ETag", f'"{digest}"'.encode())
        if self.gzip_encoding_header:
            request.setHeader(b"Content-Encoding", b"gzip")
        if self.honour_ranges:
            request.setHeader(b"Accept-Ranges", b"bytes")
            ranges = record.header("range")
            if len(ranges) == 1:
                span = _parse_range(ranges[0], len(data))
                if span == "unsatisfiable":
                    request.setResponseCode(416)
                    request.setHeader(b"Content-Range", f"bytes */{len(data)}".encode())
                    return self._send(request, b"")
                if span is not None:
                    start, end = span
                    request.setResponseCode(206)
                    request.setHeader(b"Content-Range", f"bytes {start}-{end}/{len(data)}".encode())
                    data = data[start : end + 1]
        return self._serve(request, data, self._fault(self.blob_faults, digest, request))

    def _fault(self, faults: dict[str, Fault], digest: str, request: Request) -> Fault | None:
        if request.method != b"GET":
            return None
        for key in (digest, "*"):
            fault = faults.get(key)
            if fault is not None and fault._take():
                return fault
        return None

    def _serve(self, request: Request, body: bytes, fault: Fault | None) -> int:
        if fault is None:
            return self._send(request, body)
        if fault.kind == "wrong_bytes":
            return self._send(request, bytes(b ^ 0x5A for b in body))
        if fault.kind == "extra_bytes":
            surplus = b"#" * fault.count
            length = len(body) + fault.count if fault.declared else len(body)
            return self._send(request, body + surplus, length)
        if fault.kind == "unsized":
            self._trickle(request, body, fault)
            return NOT_DONE_YET
        request.setHeader(b"Content-Length", b"%d" % len(body))
        if fault.kind == "truncate":
            request.write(body[: fault.after])
            self._when_flushed(request, fault.reset)
        elif fault.kind == "stall":
            request.write(body[: fault.after])
        elif fault.kind == "slow":
            self._trickle(request, body, fault)
        return NOT_DONE_YET

    def _when_flushed(self, request: Request, reset: bool) -> None:
        transport: Any = request.channel.transport

        def check() -> None:
            if getattr(transport, "connected", False) and _pending_bytes(transport) > 0:
                self._later(0.001, check, network=True)
            elif reset:
                transport.abortConnection()
            else:
                transport.loseConnection()

        self._later(0, check, network=True)

    def _trickle(self, request: Request, body: bytes, fault: Fault) -> None:
        gone: list[bool] = []
        request.notifyFinish().addBoth(lambda _: gone.append(True))

        def send(offset: int) -> None:
            if gone:
                return
            end = offset + fault.chunk
            request.write(body[offset:end])
            if end >= len(body):
                request.finish()
            else:
                self._later(fault.delay, send, end)

        send(0)

    def _later(
        self, delay: float, f: Callable[..., None], *args: Any, network: bool = False
    ) -> None:
        """*f(*args)* in *delay* seconds of the registry's clock (its delays
        and trickles: a test's Clock moves them on), or with *network*, of
        the reactor (a poll of its connections)."""
        self._calls = {c for c in self._calls if c.active()}
        timer = self.reactor if network else self.clock
        self._calls.add(timer.callLater(delay, f, *args))


def _basic(username: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()


def _diff_id(layer: bytes) -> str:
    try:
        return sha256(gzip.decompress(layer))
    except (OSError, EOFError, zlib.error):
        return sha256(layer)


_LIST_TYPES = (
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.oci.image.index.v1+json",
)


def _accepted(record: RecordedRequest) -> set[str] | None:
    """Every media type of every Accept line, parameters dropped; None if no Accept."""
    lines = record.header("accept")
    if not lines:
        return None
    return {
        part.split(";", 1)[0].strip().lower()
        for line in lines
        for part in line.split(",")
        if part.strip()
    }


def _negotiate(accepted: set[str] | None, variants: list[tuple[str, str]]) -> str | None:
    for digest, media_type in variants:
        if accepted is None or "*/*" in accepted or media_type.lower() in accepted:
            return digest
    return None


def _parse_range(header: str, size: int) -> tuple[int, int] | Literal["unsatisfiable"] | None:
    """One ``bytes=a-b`` range as inclusive (start, end); None to ignore it."""
    match = _RANGE.fullmatch(header.strip())
    if match is None or match.group(1) == match.group(2) == "":
        return None
    first, last = match.group(1), match.group(2)
    if first == "":
        start, end = max(size - int(last), 0), size - 1
    else:
        start = int(first)
        end = min(int(last), size - 1) if last else size - 1
    if start >= size or start > end:
        return "unsatisfiable"
    return start, end
