"""Talking to one upstream registry: auth retries, redirects, timeouts, errors.

Blobs must arrive as the exact bytes of their digest, so this uses a plain
:class:`twisted.web.client.Agent` (no content decoding) for everything the
proxy stores, and maps every upstream failure to a :class:`RegistryError`
that names the upstream.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any, TypeVar
from urllib.parse import urlencode, urljoin, urlsplit

import attrs
from twisted.internet.defer import Deferred, DeferredSemaphore, TimeoutError
from twisted.internet.error import ConnectError, DNSLookupError
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseFailed
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IResponse

from ..config import UpstreamConfig
from ..errors import UPSTREAM_TROUBLE, RegistryError, describe_failure
from ..mediatypes import MODERN
from ..metrics import Metrics
from ..singleflight import SingleFlight
from .auth import Authenticator, AuthError, parse_www_authenticate
from .body import BodyStalled, BodyTooLarge, read_body
from .breaker import CircuitBreaker, CircuitOpen
from .privacy import Privacy
from .public import Refused, is_public

T = TypeVar("T")

log = Logger()

_REDIRECTS = (301, 302, 303, 307, 308)
_MAX_REDIRECTS = 5
#: the largest manifest accepted: CNCF Distribution's own limit (4 MiB)
MAX_MANIFEST = 4 * 1024 * 1024
#: the largest tag list or referrers answer accepted (gcr.io's tag lists,
#: with their map of manifests, run to megabytes)
MAX_LISTING = 32 * 1024 * 1024
#: listings fetched from one upstream at once (each may hold MAX_LISTING
#: bytes); identical ones share a fetch
LISTINGS_AT_ONCE = 4
#: what is read of an error document or a redirect's body
_MAX_SMALL_BODY = 64 * 1024


@attrs.frozen
class Manifest:
    body: bytes
    media_type: str
    #: the upstream's Docker-Content-Digest header, if any (not yet verified)
    digest: str | None
    #: "HIT" if a cluster peer answered it from its cache
    cache: str = "MISS"


@attrs.frozen
class ManifestHead:
    digest: str | None
    media_type: str
    size: int | None


@attrs.define
class _Exchange:
    """One exchange with the upstream, from the first request to the last byte read."""

    #: when its deadline passes, on the client's clock
    ends_at: float
    #: what it waits for now, for the message if the deadline passes
    waiting_for: str = ""
    #: the upstream answered, but not as it should (a 5xx to a ping): a
    #: failure for the circuit breaker
    trouble: bool = False
    #: it failed on something the upstream answered cleanly (a token refused,
    #: a redirect refused): not a failure for the circuit breaker
    answered: bool = False


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


#: the metrics' name for every registry a client names that is not configured
UNLISTED = "other"


class RegistryClient:
    """The pull API of one upstream registry."""

    #: seconds to wait before each retry of a request whose connection failed
    RETRY_DELAYS: tuple[float, ...] = (0.2, 0.8)

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
        *,
        resolve: Callable[[str, int], Awaitable[list[str]]],
    ) -> None:
        """*https_only*: for a registry a client named (allow_any_registry),
        whose redirects must not lead to plain http services.  *anonymous*:
        an authenticator without credentials, to find out what the upstream
        serves to anyone (see :meth:`check_shareable`); None shares all.
        *resolve*: every address a host name resolves to, as a socket would
        resolve it (:func:`.public.lookup`, on a thread pool of the caller's)."""
        self.name = name
        #: its name in the metrics: the registries clients name
        #: (allow_any_registry) share one, so that they add no label sets
        self.label = UNLISTED if https_only else name
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
        self._listings: SingleFlight[str, tuple[bytes, dict[str, str]]] = SingleFlight()
        self._listing_slots = DeferredSemaphore(LISTINGS_AT_ONCE)
        self._resolve = resolve
        #: whether this upstream's own address is public, once known
        self._public: bool | None = None

    # -- the registry API -------------------------------------------------

    async def get_manifest(self, repo: str, reference: str, accept: Sequence[str]) -> Manifest:
        async def manifest(client: RegistryClient, response: IResponse) -> Manifest:
            return Manifest(
                body=await client._read(response, MAX_MANIFEST, "a manifest"),
                media_type=_media_type(response),
                digest=_header(response, "Docker-Content-Digest"),
            )

        return await self._checked(
            b"GET",
            repo,
            f"/v2/{repo}/manifests/{reference}",
            _accept(accept),
            "MANIFEST_UNKNOWN",
            manifest,
        )

    async def head_manifest(self, repo: str, reference: str, accept: Sequence[str]) -> ManifestHead:
        response = await self._checked(
            b"HEAD",
            repo,
            f"/v2/{repo}/manifests/{reference}",
            _accept(accept),
            "MANIFEST_UNKNOWN",
            _as_is,
        )
        return ManifestHead(
            digest=_header(response, "Docker-Content-Digest"),
            media_type=_media_type(response),
            size=content_length(response),
        )

    async def get_blob(self, repo: str, digest: str, start: int = 0) -> IResponse:
        """A 200 response whose body the caller must consume (deliverBody);
        the deadline ends with its headers.  From *start* on: a 206 whose
        Content-Range starts there, or a 200 of the whole blob from an
        upstream that does not take ranges."""
        headers = {"Range": f"bytes={start}-"} if start else {}
        return await self._checked(
            b"GET",
            repo,
            f"/v2/{repo}/blobs/{digest}",
            headers,
            "BLOB_UNKNOWN",
            _as_is,
            ok=(200, 206) if start else (200,),
        )

    async def head_blob(self, repo: str, digest: str) -> int | None:
        response = await self._checked(
            b"HEAD", repo, f"/v2/{repo}/blobs/{digest}", {}, "BLOB_UNKNOWN", _as_is
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

        async def listing(
            client: RegistryClient, response: IResponse
        ) -> tuple[bytes, dict[str, str]]:
            body = await client._read(response, MAX_LISTING, f"its answer to {path}")
            headers = {
                name: value
                for name in ("Link", "OCI-Filters-Applied")
                if (value := _header(response, name))
            }
            return body, headers

        async def fetch() -> tuple[bytes, dict[str, str]]:
            slot = self._listing_slots.acquire()
            slot.addTimeout(self.config.deadline_seconds, self._clock)
            try:
                await slot
            except TimeoutError:
                raise RegistryError(
                    503,
                    "UNAVAILABLE",
                    f"{LISTINGS_AT_ONCE} listings of upstream {self.name} are being "
                    "fetched already; try again",
                ) from None
            try:
                return await self._checked(b"GET", repo, url, {}, unknown, listing)
            finally:
                self._listing_slots.release()

        # clients asking for the same listing at once share one fetch and body
        return await self._listings.run(url, fetch)

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
        anonymous = self._anonymous
        assert anonymous is not None

        async def probe(exchange: _Exchange) -> RegistryError | None:
            try:
                response = await self._authorized(exchange, method, repo, url, headers, anonymous)
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

        return await self._exchange(probe)

    async def ping(self) -> int:
        """``GET /v2/``: the status the upstream answers (401 is a fine answer)."""

        async def ping(exchange: _Exchange) -> int:
            response = await self._send(exchange, b"GET", self._base + "/v2/", {})
            await self._discard(response)
            exchange.trouble = response.code >= 500
            return response.code

        return await self._exchange(ping)

    # -- plumbing ---------------------------------------------------------

    async def _checked(
        self,
        method: bytes,
        repo: str,
        path: str,
        headers: dict[str, str],
        unknown: str,
        consume: Callable[[RegistryClient, IResponse], Awaitable[T]],
        ok: tuple[int, ...] = (200,),
    ) -> T:
        """What *consume* makes of a 200 response from this upstream or, while
        it is down or rate-limiting, from its fallbacks in order, each within
        its own deadline."""

        async def pull(client: RegistryClient, exchange: _Exchange) -> T:
            url = client._base + path
            response = await client._authorized(exchange, method, repo, url, headers)
            if response.code not in ok:
                raise await client._error(response, repo, unknown)
            return await consume(client, response)

        try:
            return await self._exchange(functools.partial(pull, self))
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
                return await other._exchange(functools.partial(pull, other))
            except RegistryError as e:
                log.info("fallback {fallback} failed too: {why}", fallback=other.name, why=e)
        raise failure

    async def _exchange(self, work: Callable[[_Exchange], Coroutine[Any, Any, T]]) -> T:
        """*work*, behind this upstream's circuit breaker (which it fails or
        closes) and within its deadline (past which it is cancelled: 504)."""
        try:
            self.breaker.check()
        except CircuitOpen as e:
            raise RegistryError(
                503,
                "UNAVAILABLE",
                f"upstream {self.name} ({self._base}) is failing; not asking it again "
                f"for {e.retry_in:.0f}s",
            ) from None
        deadline = self.config.deadline_seconds
        exchange = _Exchange(self._clock.seconds() + deadline)

        def past_deadline(result: T | Failure, timeout: float) -> T | Failure:
            if not isinstance(result, Failure):
                return result
            waiting = f" (waiting for {exchange.waiting_for})" if exchange.waiting_for else ""
            return Failure(
                RegistryError(
                    504,
                    "UNAVAILABLE",
                    f"upstream {self.name} ({self._base}) did not answer within "
                    f"{timeout:g}s{waiting}",
                )
            )

        d: Deferred[T] = Deferred.fromCoroutine(work(exchange))
        d.addTimeout(deadline, self._clock, onTimeoutCancel=past_deadline)
        try:
            result = await d
        except RegistryError as e:
            if e.status in (502, 504) and not exchange.answered:
                self.breaker.failed()
            else:
                self.breaker.succeeded()
            raise
        except BaseException:
            self.breaker.failed()
            raise
        if exchange.trouble:
            self.breaker.failed()
        else:
            self.breaker.succeeded()
        return result

    async def _authorized(
        self,
        exchange: _Exchange,
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
        response = await self._follow(exchange, method, url, headers, authorization)
        if response.code != 401:
            return response
        await self._discard(response)
        auth.invalidate(scope)
        challenges = parse_www_authenticate(response.headers.getRawHeaders("WWW-Authenticate", []))
        realms = [
            realm
            for challenge in challenges
            if challenge.scheme == "bearer"
            and urlsplit(realm := challenge.params.get("realm", "")).scheme in ("http", "https")
        ]
        for realm in realms:
            await self._refuse_internal(exchange, realm, "named as its token service")
        exchange.waiting_for = f"its token service {realms[0]}" if realms else ""
        try:
            authorization = await auth.authorize(challenges, scope)
        except AuthError as e:
            # refused (a 4xx) is an answer; no answer, 5xx or nonsense is trouble
            exchange.answered = e.status is not None and 400 <= e.status < 500
            raise RegistryError(
                502, "UNAVAILABLE", f"upstream {self.name}: token service failed: {e}"
            ) from None
        exchange.waiting_for = ""
        if authorization is None:
            # the 401's body is spent: answer for it here
            raise RegistryError(
                401,
                "UNAUTHORIZED",
                f"upstream {self.name} wants credentials for {repo} that regproxy cannot "
                "give: set username and a password for it in the config",
            )
        return await self._follow(exchange, method, url, headers, authorization)

    async def _follow(
        self,
        exchange: _Exchange,
        method: bytes,
        url: str,
        headers: dict[str, str],
        authorization: str | None,
    ) -> IResponse:
        """Send, following redirects; ``Authorization`` never leaves the upstream's host."""
        for _ in range(_MAX_REDIRECTS + 1):
            sent = dict(headers)
            if authorization and _origin(url) == self._origin:
                sent["Authorization"] = authorization
            response = await self._send(exchange, method, url, sent)
            location = _header(response, "Location")
            if response.code not in _REDIRECTS or not location:
                return response
            await self._discard(response)
            url = urljoin(url, location)
            if urlsplit(url).scheme not in ("http", "https") or not url.isascii():
                break
            if self._https_only and urlsplit(url).scheme != "https":
                exchange.answered = True
                raise RegistryError(
                    502, "UNAVAILABLE", f"upstream {self.name} redirected to plain http; refused"
                )
            await self._refuse_internal(exchange, url, "redirected to")
            if response.code == 303:
                method = b"GET"
            log.debug(
                "{upstream} redirected to {host}", upstream=self.name, host=urlsplit(url).netloc
            )
        exchange.answered = True
        raise RegistryError(502, "UNAVAILABLE", f"upstream {self.name}: too many or bad redirects")

    async def _refuse_internal(self, exchange: _Exchange, url: str, how: str) -> None:
        """Refuse *url*, where this upstream sends us (a redirect, a token
        realm), if its host resolves to an internal address while this
        upstream's own is public.  Resolved as the socket will resolve it,
        so 2130706433, 0x7f000001, 127.1 and 0 are the loopback they are."""
        if self._public is None:
            try:
                self._public = any(is_public(a) for a in await self._addresses(self._base))
            except DNSLookupError:
                return  # nor can it be connected to: nothing to protect yet
        if not self._public:
            return  # an internal upstream (the operator's choice) may lead anywhere
        host = urlsplit(url).hostname or ""
        try:
            internal = [a for a in await self._addresses(url) if not is_public(a)]
        except DNSLookupError as e:
            raise RegistryError(
                502, "UNAVAILABLE", f"upstream {self.name} {how} {host}, which is unreachable: {e}"
            ) from None
        if internal:
            exchange.answered = True
            raise RegistryError(
                502,
                "UNAVAILABLE",
                f"upstream {self.name} {how} {host}, an internal address ({internal[0]}); refused",
            )

    async def _addresses(self, url: str) -> list[str]:
        scheme, host, port = _origin(url)
        try:
            return await self._resolve(host, port or 443)
        except ValueError as e:
            raise DNSLookupError(str(e)) from None

    async def _send(
        self, exchange: _Exchange, method: bytes, url: str, headers: dict[str, str]
    ) -> IResponse:
        """One request, tried again after a failed connection (GET and HEAD are
        safe to repeat) while the exchange's deadline leaves time."""
        for delay in (*self.RETRY_DELAYS, None):
            try:
                return await self._send_once(method, url, headers)
            except _NoConnection as e:
                remaining = exchange.ends_at - self._clock.seconds()
                if delay is None or delay >= remaining or self.breaker.is_open():
                    raise e.error from None
                await deferLater(self._clock, delay, lambda: None)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _send_once(self, method: bytes, url: str, headers: dict[str, str]) -> IResponse:
        h = Headers({"User-Agent": ["regproxy/0.1"]})
        for key, value in headers.items():
            h.setRawHeaders(key, [value])
        self._metrics.upstream_requests.labels(self.label, _kind(method, url)).inc()
        timeout = self.config.read_timeout

        def silent(result: IResponse | Failure, timeout: float) -> IResponse | Failure:
            if not isinstance(result, Failure):
                return result
            return Failure(
                RegistryError(
                    504,
                    "UNAVAILABLE",
                    f"upstream {self.name} ({self._base}) did not answer within {timeout:g}s",
                )
            )

        try:
            d: Deferred[IResponse] = self._agent.request(method, url.encode("ascii"), h)
            d.addTimeout(timeout, self._clock, onTimeoutCancel=silent)
            response = await d
        except Refused as e:
            raise RegistryError(403, "DENIED", f"upstream {self.name}: {e}") from None
        except (ConnectError, DNSLookupError) as e:
            raise _NoConnection(
                RegistryError(
                    502,
                    "UNAVAILABLE",
                    f"upstream {self.name} ({self._base}) is unreachable: {describe_failure(e)}",
                )
            ) from None
        except ResponseFailed as e:
            why = describe_failure(e)
            raise RegistryError(
                502,
                "UNAVAILABLE",
                f"upstream {self.name} ({self._base}) failed before answering: {why}",
            ) from None
        except ValueError as e:  # a host name no connection can be made to (IDNA)
            raise RegistryError(
                502, "UNAVAILABLE", f"upstream {self.name}: bad host name in {url!r}: {e}"
            ) from None
        self.last_answer = self._clock.seconds()
        remaining = _header(response, "RateLimit-Remaining")
        if remaining and remaining.split(";")[0].strip().isdigit():
            self._metrics.ratelimit_remaining.labels(self.label).set(int(remaining.split(";")[0]))
        return response

    async def _read(self, response: IResponse, limit: int, what: str) -> bytes:
        """The whole body, at most *limit* bytes, with no silence longer than
        read_timeout; else the connection is closed and the client gets 502 or 504."""
        try:
            return await read_body(response, limit, self.config.read_timeout, self._clock)
        except BodyTooLarge as e:
            size = f"{e.declared} bytes, more than" if e.declared is not None else "more than"
            raise RegistryError(
                502,
                "UNAVAILABLE",
                f"upstream {self.name} sent {what} of {size} {limit} bytes "
                "(regproxy's limit); refused",
            ) from None
        except BodyStalled as e:
            raise RegistryError(
                504,
                "UNAVAILABLE",
                f"upstream {self.name} ({self._base}) sent nothing for {e.idle:g}s "
                f"in the middle of {what}; gave up",
            ) from None
        except Exception as e:
            raise RegistryError(
                502, "UNAVAILABLE", f"upstream {self.name}: {what} failed: {describe_failure(e)}"
            ) from None

    async def _discard(self, response: IResponse) -> None:
        await self._read_quietly(response)

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
        """An error document or a redirect's body: what there is of it up to a
        small limit, or nothing (its connection closed) if it is larger or slow."""
        try:
            return await self._read(response, _MAX_SMALL_BODY, "an error document")
        except RegistryError:
            return b""


async def _as_is(client: RegistryClient, response: IResponse) -> IResponse:
    return response


class _NoConnection(Exception):
    """No connection could be made: the one failure worth trying again."""

    def __init__(self, error: RegistryError) -> None:
        super().__init__(error)
        self.error = error


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
