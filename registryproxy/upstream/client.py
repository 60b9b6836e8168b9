"""Talking to one upstream registry: auth retries, redirects, timeouts, errors.

Blobs must arrive as the exact bytes of their digest, so this uses a plain
:class:`twisted.web.client.Agent` (no content decoding) for everything the
proxy stores, and maps every upstream failure to a :class:`RegistryError`
that names the upstream.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from urllib.parse import urlencode, urljoin, urlsplit

import attrs
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import (
    ConnectError,
    ConnectingCancelledError,
    DNSLookupError,
    TimeoutError,
)
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.web.client import ResponseFailed, readBody
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IResponse

from ..config import UpstreamConfig
from ..errors import UPSTREAM_TROUBLE, RegistryError
from ..mediatypes import MODERN
from ..metrics import Metrics
from .auth import Authenticator, AuthError, parse_www_authenticate
from .breaker import CircuitBreaker, CircuitOpen
from .privacy import Privacy
from .public import Refused, is_public

log = Logger()

_REDIRECTS = (301, 302, 303, 307, 308)
#: seconds to wait before each retry of a request whose connection failed
_RETRY_DELAYS = (0.2, 0.8)
_MAX_REDIRECTS = 5


@attrs.frozen
class Manifest:
    body: bytes
    media_type: str
    #: the upstream's Docker-Content-Digest header, if any (not yet verified)
    digest: str | None


@attrs.frozen
class ManifestHead:
    digest: str | None
    media_type: str
    size: int | None


def _header(response: IResponse, name: str) -> str | None:
    """The last value of a response header, as Latin-1 (whatever its bytes)."""
    values = response.headers.getRawHeaders(name.encode("ascii"))
    return values[-1].decode("latin-1") if values else None


def content_length(response: IResponse) -> int | None:
    if response.request.method == b"HEAD":
        # no body to measure: Twisted leaves the header in place
        value = _header(response, "Content-Length")
        return int(value) if value and value.isdigit() else None
    length = response.length
    return length if isinstance(length, int) else None


class RegistryClient:
    """The pull API of one upstream registry."""

    def __init__(
        self,
        name: str,
        config: UpstreamConfig,
        agent: IAgent,
        auth: Authenticator,
        clock: IReactorTime,
        fallbacks: Callable[[], Sequence[RegistryClient]] = lambda: (),
        metrics: Metrics | None = None,
        https_only: bool = False,
        anonymous: Authenticator | None = None,
    ) -> None:
        """*https_only*: for a registry a client named (allow_any_registry),
        whose redirects must not lead to plain http services.  *anonymous*:
        an authenticator without credentials, to find out what the upstream
        serves to anyone (see :meth:`check_shareable`); None shares all."""
        self.name = name
        self._https_only = https_only
        self.config = config
        self._agent = agent
        self._auth = auth
        self._clock = clock
        self._fallbacks = fallbacks
        self._metrics = metrics or Metrics()
        self.breaker = CircuitBreaker(clock, config.breaker_threshold, config.breaker_cooldown)
        #: when this upstream last answered at all (any HTTP status), for readiness
        self.last_answer: float | None = None
        self._base = config.url.rstrip("/")
        self._origin = _origin(self._base)
        self._anonymous = anonymous
        self._privacy = Privacy(name, clock)

    # -- the registry API -------------------------------------------------

    async def get_manifest(self, repo: str, reference: str, accept: Sequence[str]) -> Manifest:
        response = await self._checked(
            b"GET", repo, f"/v2/{repo}/manifests/{reference}", _accept(accept), "MANIFEST_UNKNOWN"
        )
        body = await self._read(response)
        return Manifest(
            body=body,
            media_type=_media_type(response),
            digest=_header(response, "Docker-Content-Digest"),
        )

    async def head_manifest(self, repo: str, reference: str, accept: Sequence[str]) -> ManifestHead:
        response = await self._checked(
            b"HEAD", repo, f"/v2/{repo}/manifests/{reference}", _accept(accept), "MANIFEST_UNKNOWN"
        )
        return ManifestHead(
            digest=_header(response, "Docker-Content-Digest"),
            media_type=_media_type(response),
            size=content_length(response),
        )

    async def get_blob(self, repo: str, digest: str) -> IResponse:
        """A 200 response whose body the caller must consume (deliverBody)."""
        return await self._checked(b"GET", repo, f"/v2/{repo}/blobs/{digest}", {}, "BLOB_UNKNOWN")

    async def head_blob(self, repo: str, digest: str) -> int | None:
        response = await self._checked(
            b"HEAD", repo, f"/v2/{repo}/blobs/{digest}", {}, "BLOB_UNKNOWN"
        )
        return content_length(response)

    async def get_listing(
        self, repo: str, path: str, query: dict[str, str], unknown: str
    ) -> tuple[bytes, dict[str, str]]:
        """A JSON answer passed through as it is (``tags/list``, ``referrers/<digest>``
        under the repository): its body and the headers that go with it."""
        url = f"/v2/{repo}/{path}"
        if query:
            url += "?" + urlencode(query)
        response = await self._checked(b"GET", repo, url, {}, unknown)
        body = await self._read(response)
        headers = {
            name: value
            for name in ("Link", "OCI-Filters-Applied")
            if (value := _header(response, name))
        }
        return body, headers

    async def check_shareable(self, repo: str, what: str) -> None:
        """Raise what an anonymous client of the upstream would get for
        *what* (``manifests/<ref>``, ``blobs/<digest>``, ``tags/list``) in
        *repo*, unless the upstream serves the repository to anyone: content
        regproxy pulls with its own credentials is not for everyone."""
        if self._anonymous is None:
            return
        await self._privacy.check(repo, what, lambda: self._probe(repo, what))

    async def _probe(self, repo: str, what: str) -> RegistryError | None:
        kind = what.split("/", 1)[0]
        method, headers, unknown = {
            "manifests": (b"HEAD", _accept(()), "MANIFEST_UNKNOWN"),
            "blobs": (b"HEAD", {}, "BLOB_UNKNOWN"),
        }.get(kind, (b"GET", {}, "NAME_UNKNOWN"))
        url = (
            f"{self._base}/v2/{repo}/{what if kind in ('manifests', 'blobs') else 'tags/list?n=1'}"
        )
        refused = RegistryError(
            401, "UNAUTHORIZED", f"authentication required: {repo} on {self.name} is not public"
        )
        assert self._anonymous is not None
        try:
            response = await self._authorized(method, repo, url, headers, self._anonymous)
        except RegistryError as e:
            if e.status in UPSTREAM_TROUBLE:
                raise
            return refused
        if response.code == 200:
            await self._discard(response)
            return None
        error = await self._error(response, repo, unknown)
        if error.status in UPSTREAM_TROUBLE:
            raise error
        return refused if error.status in (401, 403) else error

    async def ping(self) -> int:
        """``GET /v2/``: the status the upstream answers (401 is a fine answer)."""
        response = await self._send(b"GET", self._base + "/v2/", {})
        await self._discard(response)
        return response.code

    # -- plumbing ---------------------------------------------------------

    async def _checked(
        self, method: bytes, repo: str, path: str, headers: dict[str, str], unknown: str
    ) -> IResponse:
        """A 200 response from this upstream or, while it is down or
        rate-limiting, from its fallbacks in order."""
        try:
            return await self._checked_here(method, repo, path, headers, unknown)
        except RegistryError as e:
            if e.status not in UPSTREAM_TROUBLE:
                raise
            failure = e
        for other in self._fallbacks():
            log.info(
                "{upstream} failed ({why}); trying fallback {fallback}",
                upstream=self.name,
                why=failure.message,
                fallback=other.name,
            )
            try:
                return await other._checked_here(method, repo, path, headers, unknown)
            except RegistryError as e:
                log.info("fallback {fallback} failed too: {why}", fallback=other.name, why=e)
        raise failure

    async def _checked_here(
        self, method: bytes, repo: str, path: str, headers: dict[str, str], unknown: str
    ) -> IResponse:
        response = await self._authorized(method, repo, self._base + path, headers)
        if response.code == 200:
            return response
        raise await self._error(response, repo, unknown)

    async def _authorized(
        self,
        method: bytes,
        repo: str,
        url: str,
        headers: dict[str, str],
        auth: Authenticator | None = None,
    ) -> IResponse:
        """*auth*: regproxy's own credentials unless another is given."""
        auth = auth or self._auth
        scope = f"repository:{repo}:pull"
        authorization = auth.cached(scope)
        response = await self._follow(method, url, headers, authorization)
        if response.code != 401:
            return response
        await self._discard(response)
        auth.invalidate(scope)
        challenges = parse_www_authenticate(response.headers.getRawHeaders("WWW-Authenticate", []))
        try:
            authorization = await auth.authorize(challenges, scope)
        except AuthError as e:
            raise RegistryError(
                502, "UNAVAILABLE", f"upstream {self.name}: token service failed: {e}"
            ) from None
        if authorization is None:
            # the 401's body is spent: answer for it here
            raise RegistryError(
                401,
                "UNAUTHORIZED",
                f"upstream {self.name} wants credentials for {repo} that regproxy cannot "
                "give: set username and a password for it in the config",
            )
        return await self._follow(method, url, headers, authorization)

    async def _follow(
        self, method: bytes, url: str, headers: dict[str, str], authorization: str | None
    ) -> IResponse:
        """Send, following redirects; ``Authorization`` never leaves the upstream's host."""
        for _ in range(_MAX_REDIRECTS + 1):
            sent = dict(headers)
            if authorization and _origin(url) == self._origin:
                sent["Authorization"] = authorization
            response = await self._send(method, url, sent)
            location = _header(response, "Location")
            if response.code not in _REDIRECTS or not location:
                return response
            await self._discard(response)
            url = urljoin(url, location)
            if urlsplit(url).scheme not in ("http", "https") or not url.isascii():
                break
            if self._https_only and urlsplit(url).scheme != "https":
                raise RegistryError(
                    502, "UNAVAILABLE", f"upstream {self.name} redirected to plain http; refused"
                )
            if internal_host(urlsplit(url).hostname) and not internal_host(self._origin[1]):
                raise RegistryError(
                    502,
                    "UNAVAILABLE",
                    f"upstream {self.name} redirected to an internal address; refused",
                )
            if response.code == 303:
                method = b"GET"
            log.debug(
                "{upstream} redirected to {host}", upstream=self.name, host=urlsplit(url).netloc
            )
        raise RegistryError(502, "UNAVAILABLE", f"upstream {self.name}: too many or bad redirects")

    async def _send(self, method: bytes, url: str, headers: dict[str, str]) -> IResponse:
        """One request, retried after a failed connection (GET and HEAD are safe
        to repeat), behind this upstream's circuit breaker."""
        try:
            self.breaker.check()
        except CircuitOpen as e:
            raise RegistryError(
                503,
                "UNAVAILABLE",
                f"upstream {self.name} ({self._base}) is failing; not asking it again "
                f"for {e.retry_in:.0f}s",
            ) from None
        for delay in (*_RETRY_DELAYS, None):
            try:
                response = await self._send_once(method, url, headers)
            except RegistryError as e:
                if e.status == 502 and delay is not None:
                    await deferLater(self._clock, delay, lambda: None)
                    continue
                if e.status >= 500:
                    self.breaker.failed()
                raise
            if response.code >= 500:
                self.breaker.failed()
            else:
                self.breaker.succeeded()
            return response
        raise AssertionError("unreachable")  # pragma: no cover

    async def _send_once(self, method: bytes, url: str, headers: dict[str, str]) -> IResponse:
        h = Headers({"User-Agent": ["regproxy/0.1"]})
        for key, value in headers.items():
            h.setRawHeaders(key, [value])
        self._metrics.upstream_requests.labels(self.name, _kind(method, url)).inc()
        try:
            d: Deferred[IResponse] = self._agent.request(method, url.encode("ascii"), h)
            d.addTimeout(self.config.read_timeout, self._clock)
            response = await d
            self.last_answer = self._clock.seconds()
            remaining = _header(response, "RateLimit-Remaining")
            if remaining and remaining.split(";")[0].strip().isdigit():
                self._metrics.ratelimit_remaining.labels(self.name).set(
                    int(remaining.split(";")[0])
                )
            return response
        except (TimeoutError, CancelledError, ConnectingCancelledError):
            raise RegistryError(
                504,
                "UNAVAILABLE",
                f"upstream {self.name} ({self._base}) did not answer within "
                f"{self.config.read_timeout:g}s",
            ) from None
        except Refused as e:
            raise RegistryError(403, "DENIED", f"upstream {self.name}: {_why(e)}") from None
        except (ConnectError, DNSLookupError, ResponseFailed) as e:
            raise RegistryError(
                502, "UNAVAILABLE", f"upstream {self.name} ({self._base}) is unreachable: {_why(e)}"
            ) from None
        except ValueError as e:  # a host name no connection can be made to (IDNA)
            raise RegistryError(
                502, "UNAVAILABLE", f"upstream {self.name}: bad host name in {url!r}: {e}"
            ) from None

    async def _read(self, response: IResponse) -> bytes:
        d: Deferred[bytes] = readBody(response)
        d.addTimeout(self.config.read_timeout, self._clock)
        try:
            return await d
        except Exception as e:
            raise RegistryError(
                502, "UNAVAILABLE", f"upstream {self.name}: response body failed: {_why(e)}"
            ) from None

    async def _discard(self, response: IResponse) -> None:
        try:
            await self._read(response)
        except RegistryError:
            pass

    async def _error(self, response: IResponse, repo: str, unknown: str) -> RegistryError:
        body = b"" if response.request.method == b"HEAD" else await self._read_quietly(response)
        code, message = _upstream_error(body)
        status = response.code
        where = f"upstream {self.name}"
        if status == 404:
            return RegistryError(
                404, code or unknown, f"{where}: {message or 'not found'} ({repo})"
            )
        if status == 429:
            headers = {}
            retry_after = _header(response, "Retry-After")
            if retry_after:
                headers["Retry-After"] = retry_after
            return RegistryError(
                429,
                "TOOMANYREQUESTS",
                f"{where} is rate-limiting us: {message or 'too many requests'}",
                headers=headers,
            )
        if status == 401:
            return RegistryError(
                401,
                code or "UNAUTHORIZED",
                f"{where} refused access to {repo}: {message or 'authentication required'}; "
                "the repository may not exist, or needs credentials in the upstream's config",
            )
        if status >= 500:
            return RegistryError(502, "UNAVAILABLE", f"{where} failed with HTTP {status}")
        return RegistryError(
            status if 400 <= status < 500 else 502,
            code or "UNKNOWN",
            f"{where} answered HTTP {status}: {message or 'unexpected response'}",
        )

    async def _read_quietly(self, response: IResponse) -> bytes:
        try:
            return await self._read(response)
        except RegistryError:
            return b""


def internal_host(host: str | None) -> bool:
    """Loopback, private, link-local and other non-public IP literals, and localhost."""
    if not host:
        return True
    host = host.strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return not is_public(host)
    except ValueError:
        return False


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    return parts.scheme, (parts.hostname or "").lower(), port


def _kind(method: bytes, url: str) -> str:
    path = urlsplit(url).path
    for what in ("manifests", "blobs", "tags"):
        if f"/{what}/" in path:
            return f"{method.decode().lower()}_{what.rstrip('s')}"
    return "other"


def _accept(accept: Sequence[str]) -> dict[str, str]:
    return {"Accept": ", ".join(accept or MODERN)}


def _media_type(response: IResponse) -> str:
    value = _header(response, "Content-Type") or "application/octet-stream"
    return value.split(";", 1)[0].strip()


def _upstream_error(body: bytes) -> tuple[str | None, str | None]:
    try:
        error = json.loads(body)["errors"][0]
        return str(error.get("code")), str(error.get("message"))
    except Exception:
        return None, None


def _why(e: BaseException) -> str:
    if isinstance(e, ResponseFailed) and e.reasons:
        return str(e.reasons[0].value) or type(e.reasons[0].value).__name__
    return str(e) or type(e).__name__
