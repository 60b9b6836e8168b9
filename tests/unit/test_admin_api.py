"""The admin API in memory: treq's StubTreq over the Klein resource, a fake backend."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import attrs
import pytest
import pytest_twisted
from fakeadmin import FakeAdmin, _image, digest_of
from treq.testing import StubTreq
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure

from registryproxy import names
from registryproxy.admin import bodies, openapi
from registryproxy.admin.app import AdminAPI
from registryproxy.admin.backend import AdminError, FsckResult, PurgeSelector
from registryproxy.cache.index import Page
from registryproxy.reference import ImageReference, parse_image
from registryproxy.structuring import matches

TOKEN = "s3cret-token"
DIGEST = "sha256:" + "a" * 64


@attrs.frozen
class Reply:
    code: int
    headers: dict[str, list[str]]
    body: bytes

    def header(self, name: str) -> str | None:
        values = self.headers.get(name.lower())
        return values[0] if values else None

    def json(self) -> Any:
        assert self.header("Content-Type") == "application/json", self.body
        return json.loads(self.body)

    @property
    def message(self) -> str:
        error = self.json()["error"]
        assert set(error) == {"code", "message"}
        return str(error["message"])


class Admin:
    """The API over a FakeAdmin, with requests that carry the token unless told not to."""

    def __init__(self, token: str | None = TOKEN) -> None:
        self.backend = FakeAdmin()
        self.treq = StubTreq(AdminAPI(self.backend, token).resource())

    async def __call__(
        self,
        method: str,
        path: str,
        body: Any = None,
        token: str | None = TOKEN,
        data: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> Reply:
        sent = dict(headers or {})
        if token is not None:
            sent["Authorization"] = f"Bearer {token}"
        if body is not None:
            data = json.dumps(body).encode()
            sent.setdefault("Content-Type", "application/json")
        response = await self._pumped(
            self.treq.request(method, "http://admin.test" + path, headers=sent, data=data)
        )
        content = await self._pumped(response.content())
        received = {
            k.decode().lower(): [v.decode() for v in vs]
            for k, vs in response.headers.getAllRawHeaders()
        }
        return Reply(response.code, received, content)

    async def _pumped(self, d: Deferred[Any]) -> Any:
        """*d*'s result, the memory connection pumped until then: an
        answer made in a thread (a repository's detail) ends after the
        request's own turn of the reactor."""
        results: list[Any] = []
        d.addBoth(lambda result: results.append(result))  # fired, not only called
        deadline = reactor.seconds() + 10
        while not results:
            assert reactor.seconds() < deadline, "no answer in 10 s"
            await deferLater(reactor, 0.001, lambda: None)
            self.treq.flush()
        if isinstance(results[0], Failure):
            results[0].raiseException()
        return results[0]


@pytest.fixture
def admin() -> Admin:
    return Admin()


# -- serving and access ----------------------------------------------------------

#: a request to every route the app serves
EVERY_ROUTE = [
    ("GET", "/readyz"),
    ("GET", "/metrics"),
    ("GET", "/api/v1/openapi.json"),
    ("GET", "/api/v1/stats"),
    ("GET", "/api/v1/history"),
    ("GET", "/api/v1/errors"),
    ("GET", "/api/v1/cache"),
    ("DELETE", "/api/v1/cache?all=true"),
    ("GET", "/api/v1/cache/docker.io"),
    ("DELETE", "/api/v1/cache/docker.io"),
    ("GET", "/api/v1/cache/docker.io/library/alpine"),
    ("DELETE", "/api/v1/cache/docker.io/library/alpine"),
    ("GET", "/api/v1/prefetch"),
    ("POST", "/api/v1/prefetch"),
    ("GET", "/api/v1/prefetch/job1"),
    ("POST", "/api/v1/fsck"),
    ("GET", "/api/v1/pins"),
    ("PUT", "/api/v1/pins"),
    ("DELETE", "/api/v1/pins?image=nginx"),
    ("GET", "/api/v1/upstreams"),
    ("GET", "/api/v1/upstreams/ghcr.io"),
    ("PUT", "/api/v1/upstreams/ghcr.io"),
    ("PATCH", "/api/v1/upstreams/ghcr.io"),
    ("DELETE", "/api/v1/upstreams/ghcr.io"),
]


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("method,path", EVERY_ROUTE)
async def test_every_route_but_healthz_needs_the_token(admin, method, path):
    for token in (None, "guess-1234", TOKEN + "x", TOKEN[:-1]):
        reply = await admin(method, path, token=token)
        assert reply.code == 401
        assert reply.header("WWW-Authenticate").startswith("Bearer")
        assert reply.json()["error"]["code"] == "UNAUTHORIZED"
        # neither the real token nor the one sent is echoed
        assert TOKEN[:-1] not in reply.body.decode()
        assert "guess-1234" not in reply.body.decode()
    # nothing reached the backend
    assert admin.backend.calls == []


@pytest_twisted.ensureDeferred
async def test_token_must_be_a_bearer_token(admin):
    reply = await admin("GET", "/api/v1/stats", token=None, headers={"Authorization": TOKEN})
    assert reply.code == 401
    basic = await admin(
        "GET", "/api/v1/stats", token=None, headers={"Authorization": f"Basic {TOKEN}"}
    )
    assert basic.code == 401
    lower = await admin(
        "GET", "/api/v1/stats", token=None, headers={"Authorization": f"bearer {TOKEN}"}
    )
    assert lower.code == 200


@pytest_twisted.ensureDeferred
async def test_unknown_routes_ask_for_the_token_first(admin):
    assert (await admin("GET", "/nope", token=None)).code == 401
    assert (await admin("GET", "/nope")).code == 404


@pytest_twisted.ensureDeferred
async def test_healthz_is_open(admin):
    for token in (None, "wrong", TOKEN):
        reply = await admin("GET", "/healthz", token=token)
        assert reply.code == 200
        assert reply.json() == {"status": "ok"}


@pytest_twisted.ensureDeferred
async def test_without_a_token_nothing_is_asked():
    admin = Admin(token=None)
    reply = await admin("GET", "/api/v1/stats", token=None)
    assert reply.code == 200
    # a token sent anyway does no harm
    assert (await admin("GET", "/api/v1/stats", token="whatever")).code == 200


@pytest_twisted.ensureDeferred
async def test_unknown_route_is_404_json(admin):
    for path in (
        "/nope",
        "/api/v1",
        "/api/v1/stats/",
        "/api/v2/stats",
        # werkzeug would redirect these to a merged path
        "/api//v1/stats",
        "/api/v1/cache/docker.io//alpine",
    ):
        reply = await admin("GET", path)
        assert reply.code == 404, path
        assert reply.json()["error"]["code"] == "NOT_FOUND"
        assert "openapi.json" in reply.message


@pytest_twisted.ensureDeferred
async def test_wrong_method_is_405_with_allow(admin):
    reply = await admin("POST", "/api/v1/stats")
    assert reply.code == 405
    assert reply.header("Allow") == "GET, HEAD"
    assert reply.json()["error"]["code"] == "METHOD_NOT_ALLOWED"
    reply = await admin("POST", "/api/v1/upstreams/ghcr.io")
    assert reply.code == 405
    assert set(reply.header("Allow").split(", ")) == {"GET", "HEAD", "PUT", "PATCH", "DELETE"}
    reply = await admin("PUT", "/api/v1/cache/docker.io/library/alpine")
    assert set(reply.header("Allow").split(", ")) == {"GET", "HEAD", "DELETE"}


@pytest_twisted.ensureDeferred
async def test_unknown_or_repeated_query_parameter_is_400(admin):
    reply = await admin("GET", "/api/v1/stats?verbose=1")
    assert reply.code == 400
    assert "unknown query parameter 'verbose'" in reply.message
    reply = await admin("DELETE", "/api/v1/cache?all=true&all=true")
    assert reply.code == 400
    assert "given 2 times" in reply.message
    assert not [c for c in admin.backend.calls if c[0] == "purge"]


@pytest_twisted.ensureDeferred
async def test_non_utf8_url_is_400_json(admin):
    reply = await admin("GET", "/api/v1/cache/%FF")
    assert reply.code == 400
    assert "UTF-8" in reply.message
    reply = await admin("DELETE", "/api/v1/cache?older_than=%FF")
    assert reply.code == 400


@pytest_twisted.ensureDeferred
async def test_backend_admin_error_keeps_its_status_and_message(admin):
    admin.backend.failures["stats"] = AdminError(409, "busy purging: try again")
    reply = await admin("GET", "/api/v1/stats")
    assert reply.code == 409
    assert reply.json() == {"error": {"code": "CONFLICT", "message": "busy purging: try again"}}


@pytest_twisted.ensureDeferred
async def test_a_cluster_index_that_does_not_answer_is_503_not_an_internal_error(admin):
    """(SharedIndex answers 503 at its query_timeout: a purge flushes access
    times through it first.)"""
    from registryproxy.errors import RegistryError

    why = "the cluster's index did not answer within 30 s: try again shortly"
    admin.backend.failures["purge"] = RegistryError(503, "UNAVAILABLE", why)
    reply = await admin("DELETE", "/api/v1/cache?all=true")
    assert (reply.code, reply.message) == (503, why)


@pytest_twisted.ensureDeferred
async def test_admin_error_with_a_status_that_is_no_error_is_500(admin):
    admin.backend.failures["stats"] = AdminError(200, "fine?")
    reply = await admin("GET", "/api/v1/stats")
    assert reply.code == 500
    assert "fine?" not in reply.message


@pytest_twisted.ensureDeferred
async def test_other_exceptions_are_500_generic_and_logged(admin):
    logged: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(logged.append)
    try:
        admin.backend.failures["repositories"] = RuntimeError("secret detail /var/cache")
        reply = await admin("GET", "/api/v1/cache")
    finally:
        globalLogPublisher.removeObserver(logged.append)
    assert reply.code == 500
    assert reply.json()["error"]["code"] == "INTERNAL_SERVER_ERROR"
    assert "secret detail" not in reply.message
    assert "log" in reply.message
    failures = [e for e in logged if "log_failure" in e]
    assert len(failures) == 1
    assert isinstance(failures[0]["log_failure"].value, RuntimeError)
    assert failures[0]["path"] == "/api/v1/cache"


# -- health and numbers ---------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_readyz_is_200_when_ready_else_503(admin):
    reply = await admin("GET", "/readyz")
    assert reply.code == 200
    assert reply.json()["ready"] is True
    admin.backend.is_ready = False
    reply = await admin("GET", "/readyz")
    assert reply.code == 503
    assert reply.json()["ready"] is False
    assert "checks" in reply.json()


@pytest_twisted.ensureDeferred
async def test_stats(admin):
    reply = await admin("GET", "/api/v1/stats")
    assert reply.code == 200
    assert reply.json()["hit_ratio"] == 0.75
    assert reply.header("Cache-Control") == "no-store"


@pytest_twisted.ensureDeferred
async def test_metrics_are_prometheus_text(admin):
    reply = await admin("GET", "/metrics")
    assert reply.code == 200
    assert reply.header("Content-Type").startswith("text/plain; version=0.0.4")
    assert b"regproxy_requests_total 120.0" in reply.body


@pytest_twisted.ensureDeferred
async def test_openapi_document_is_served(admin):
    reply = await admin("GET", "/api/v1/openapi.json")
    assert reply.code == 200
    assert reply.json() == openapi.document()


# -- the cache ----------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_list_repositories(admin):
    reply = await admin("GET", "/api/v1/cache")
    assert reply.code == 200
    repos = reply.json()["repositories"]
    assert [(r["upstream"], r["repository"]) for r in repos] == [
        ("docker.io", "library/alpine"),
        ("docker.io", "library/nginx"),
        ("ghcr.io", "owner/name"),
    ]
    assert set(repos[0]) == {"upstream", "repository", "tags", "manifests", "size", "last_access"}
    reply = await admin("GET", "/api/v1/cache/ghcr.io")
    assert [r["repository"] for r in reply.json()["repositories"]] == ["owner/name"]
    # no parameters: the first page of the most there may be, by name
    assert admin.backend.last("repositories") == ("ghcr.io", Page(limit=1000))
    assert reply.header("Link") is None


def add_repositories(admin, count):
    """*count* more repositories in docker.io, each its own size."""
    for n in range(count):
        image = _image("docker.io", f"team/app_{n:03}", {"1": f"app {n}"})
        image = attrs.evolve(
            image, manifests=tuple(attrs.evolve(m, size=100 + n) for m in image.manifests)
        )
        admin.backend.cached[("docker.io", image.repository)] = image


@pytest_twisted.ensureDeferred
async def test_listing_in_pages_following_link(admin):
    """Each page has n rows at most and a Link to the next while more
    remain: following them lists every repository once, in name order."""
    add_repositories(admin, 7)
    everything = (await admin("GET", "/api/v1/cache")).json()["repositories"]
    assert len(everything) == 10
    for path, prefix in (("/api/v1/cache", ""), ("/api/v1/cache/docker.io", "docker.io")):
        seen, url = [], f"{path}?n=3"
        while url:
            reply = await admin("GET", url)
            rows = reply.json()["repositories"]
            assert 1 <= len(rows) <= 3
            seen += rows
            link = reply.header("Link")
            if link is None:
                break
            match = re.fullmatch(r'<(/[^>]*)>; rel="next"', link)
            assert match, link
            url = match.group(1)
            assert url.startswith(f"{path}?") and "n=3" in url
        assert seen == [r for r in everything if r["upstream"].startswith(prefix)]
    reply = await admin("GET", "/api/v1/cache?n=2&last=docker.io%2Flibrary%2Fnginx&q=_")
    assert [r["repository"] for r in reply.json()["repositories"]] == [
        "team/app_000",
        "team/app_001",
    ]
    assert admin.backend.last("repositories") == (
        None,
        Page("_", ("docker.io", "library/nginx"), False, 2),
    )
    assert reply.header("Link") == (
        '</api/v1/cache?n=2&last=docker.io%2Fteam%2Fapp_001&q=_>; rel="next"'
    )


@pytest_twisted.ensureDeferred
async def test_listing_by_size_and_search(admin):
    add_repositories(admin, 3)
    reply = await admin("GET", "/api/v1/cache?sort=size&n=2")
    repos = reply.json()["repositories"]
    assert admin.backend.last("repositories") == (None, Page(None, None, True, 2))
    sizes = sorted((r["size"] for r in everything_of(admin)), reverse=True)
    assert [r["size"] for r in repos] == sizes[:2]
    # the first page only: more remain, but no next page by size
    assert reply.header("Link") is None
    reply = await admin("GET", "/api/v1/cache?sort=size&n=50&q=ALP")
    assert [r["repository"] for r in reply.json()["repositories"]] == ["library/alpine"]
    assert admin.backend.last("repositories") == (None, Page("ALP", None, True, 50))
    reply = await admin("GET", "/api/v1/cache?q=")
    assert admin.backend.last("repositories") == (None, Page(limit=1000))


def everything_of(admin):
    return [
        {"size": sum(m.size + sum(b.size or 0 for b in m.blobs) for m in d.manifests)}
        for d in admin.backend.cached.values()
    ]


@pytest.mark.parametrize(
    "query, words",
    [
        ("n=0", "n: expected a page size from 1 to 1000, got '0'"),
        ("n=1001", "n: expected a page size from 1 to 1000"),
        ("n=-1", "n: expected a page size"),
        ("n=ten", "n: expected a page size"),
        ("n=1.5", "n: expected a page size"),
        ("n=", "n: expected a page size"),
        ("n=99999999999999999999", "n: expected a page size"),
        ("sort=largest", "sort: expected name (the default) or size"),
        ("last=alpine", "last: expected upstream/repository as listed"),
        ("last=docker.io/", "last: expected upstream/repository"),
        ("last=docker.io/UPPER", "last: expected upstream/repository"),
        ("last=not_a_host!/x", "last: expected upstream/repository"),
        ("sort=size&last=docker.io/x", "last pages in name order only"),
        ("q=" + "a" * 513, "q: longer than 512 characters"),
        ("q=a%00b", "has control characters"),
        ("n=1&n=2", "given 2 times"),
        ("page=2", "unknown query parameter 'page'"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_listing_bad_parameters_are_400(admin, query, words):
    for path in ("/api/v1/cache", "/api/v1/cache/docker.io"):
        reply = await admin("GET", f"{path}?{query}")
        assert reply.code == 400, (path, query)
        assert words in reply.message
    assert not [c for c in admin.backend.calls if c[0] == "repositories"]


@pytest_twisted.ensureDeferred
async def test_list_repositories_of_unknown_or_invalid_upstream(admin):
    reply = await admin("GET", "/api/v1/cache/nowhere.example")
    assert reply.code == 404
    reply = await admin("GET", "/api/v1/cache/not_a_host!")
    assert reply.code == 400
    assert "not an upstream name" in reply.message


@pytest_twisted.ensureDeferred
async def test_show_repository_with_slashes(admin):
    for path in ("library/alpine", "library%2Falpine"):
        reply = await admin("GET", f"/api/v1/cache/docker.io/{path}")
        assert reply.code == 200
        detail = reply.json()
        assert detail["repository"] == "library/alpine"
        assert [t["tag"] for t in detail["tags"]] == ["3.19", "latest"]
        (manifest,) = detail["manifests"]
        assert manifest["digest"] == digest_of("alpine 3.19")
        assert [b["cached"] for b in manifest["blobs"]] == [True, True]
    reply = await admin("GET", "/api/v1/cache/ghcr.io/owner/missing")
    assert reply.code == 404
    assert "nothing of ghcr.io/owner/missing" in reply.message


@pytest_twisted.ensureDeferred
async def test_a_repositorys_detail_is_written_off_the_reactor_thread(admin, monkeypatch):
    """Its JSON grows with the repository (7 MB, 370 ms for 5,000 tags and
    manifests): every client of the proxy would wait for it."""
    from twisted.python.threadable import isInIOThread

    from registryproxy.admin import app

    threads: list[bool] = []
    record = app._record

    def watched(value: Any) -> dict[str, Any]:
        threads.append(isInIOThread())
        return record(value)

    monkeypatch.setattr(app, "_record", watched)
    reply = await admin("GET", "/api/v1/cache/docker.io/library/alpine")
    assert (reply.code, reply.json()["repository"]) == (200, "library/alpine")
    assert threads and not any(threads), threads


def test_a_repositorys_detail_is_encoded_an_item_at_a_time(monkeypatch):
    """json's C encoder holds the GIL for a whole call, so the reactor
    thread waited out one call for the whole detail (185 ms at 5,000 tags)
    even from another thread: each call is now one tag or manifest."""
    from registryproxy.admin import app
    from registryproxy.admin.backend import BlobInfo, ManifestInfo, RepositoryDetail, TagInfo

    kind = "application/vnd.oci.image.manifest.v1+json"
    layers = tuple(BlobInfo(DIGEST, 1000, True) for _ in range(8))
    detail = RepositoryDetail(
        "docker.io",
        "library/x",
        tuple(TagInfo(f"t{i}", DIGEST, kind, 1.0, 2.0) for i in range(300)),
        tuple(ManifestInfo(DIGEST, kind, 1000, 1.0, None, layers, ()) for _ in range(300)),
    )
    calls: list[int] = []
    dumps = app._dumps
    monkeypatch.setattr(
        app, "_dumps", lambda value: calls.append(len(dumps(value))) or dumps(value)
    )
    body = app._json_of(detail)
    assert json.loads(body) == json.loads(json.dumps(attrs.asdict(detail)))
    assert len(calls) >= 600
    assert max(calls) <= len(json.dumps(attrs.asdict(detail.manifests[0]))), max(calls)


@pytest.mark.parametrize(
    "method,path", [("DELETE", "/api/v1/cache?all=true"), ("POST", "/api/v1/fsck")]
)
@pytest_twisted.ensureDeferred
async def test_purge_and_fsck_answers_are_written_off_the_reactor_thread(
    admin, monkeypatch, method, path
):
    """They list every digest they deleted or indexed (100,000 in a purge of
    everything, 60 ms of JSON)."""
    from twisted.python.threadable import isInIOThread

    from registryproxy.admin import app

    threads: list[bool] = []
    dumps = app._dumps
    monkeypatch.setattr(app, "_dumps", lambda value: threads.append(isInIOThread()) or dumps(value))
    reply = await admin(method, path)
    assert reply.code == 200, reply.body
    assert threads and not any(threads), threads


def test_a_list_of_digests_is_encoded_in_pieces(monkeypatch):
    from registryproxy.admin import app
    from registryproxy.admin.backend import PurgeResult

    result = PurgeResult(1, 2, tuple(f"sha256:{i:064x}" for i in range(1000)), 3)
    calls: list[Any] = []
    dumps = app._dumps
    monkeypatch.setattr(app, "_dumps", lambda value: calls.append(value) or dumps(value))
    assert app._json_of(result) == json.dumps(attrs.asdict(result)).encode() + b"\n"
    assert max(len(c) for c in calls if isinstance(c, list)) == app._ITEMS_PER_DUMP
    assert (
        app._json_of(PurgeResult(0, 0, (), 0))
        == b'{"tags": 0, "manifests": 0, "blobs": [], "bytes_freed": 0}\n'
    )


@pytest_twisted.ensureDeferred
async def test_show_repository_invalid_name(admin):
    for name in ("Library/Alpine", "a//b", "a/../b", "a" * 256):
        reply = await admin("GET", f"/api/v1/cache/docker.io/{name}")
        assert reply.code in (400, 404), name
        if reply.code == 400:
            assert "not a repository name" in reply.message
    assert admin.backend.calls == []


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize(
    "path,selector",
    [
        ("/api/v1/cache?all=true", PurgeSelector(everything=True)),
        ("/api/v1/cache?older_than=1700000000", PurgeSelector(older_than=1_700_000_000.0)),
        (
            "/api/v1/cache?unused_since=2024-05-01T12:00:00Z",
            PurgeSelector(unused_since=datetime(2024, 5, 1, 12, tzinfo=UTC).timestamp()),
        ),
        # no zone: UTC
        (
            "/api/v1/cache?older_than=2024-05-01",
            PurgeSelector(older_than=datetime(2024, 5, 1, tzinfo=UTC).timestamp()),
        ),
        (
            "/api/v1/cache?older_than=2024-05-01T14:00:00%2B02:00",
            PurgeSelector(older_than=datetime(2024, 5, 1, 12, tzinfo=UTC).timestamp()),
        ),
        ("/api/v1/cache/ghcr.io", PurgeSelector(upstream="ghcr.io")),
        (
            "/api/v1/cache/ghcr.io?unused_since=5.5",
            PurgeSelector(upstream="ghcr.io", unused_since=5.5),
        ),
        (
            "/api/v1/cache/docker.io/library/alpine",
            PurgeSelector(upstream="docker.io", repository="library/alpine"),
        ),
        (
            "/api/v1/cache/docker.io/library/alpine?tag=3.19",
            PurgeSelector(upstream="docker.io", repository="library/alpine", tag="3.19"),
        ),
        (
            f"/api/v1/cache/localhost:5000/x/y?digest={DIGEST}&older_than=10",
            PurgeSelector(
                upstream="localhost:5000", repository="x/y", digest=DIGEST, older_than=10
            ),
        ),
    ],
)
async def test_purge_selectors(admin, path, selector):
    reply = await admin("DELETE", path)
    assert reply.code == 200, reply.body
    assert admin.backend.last("purge") == (selector,)
    assert set(reply.json()) == {"tags", "manifests", "blobs", "bytes_freed"}


@pytest_twisted.ensureDeferred
async def test_purge_reports_what_went(admin):
    reply = await admin("DELETE", "/api/v1/cache/ghcr.io/owner/name?tag=1.0")
    result = reply.json()
    assert result["tags"] == 1
    assert result["manifests"] == 1
    assert result["blobs"] == [digest_of("name 1.0 config"), digest_of("name 1.0 layer")]
    assert result["bytes_freed"] == 400 + 500 + 3_000_000
    detail = (await admin("GET", "/api/v1/cache/ghcr.io/owner/name")).json()
    assert [t["tag"] for t in detail["tags"]] == ["2.0"]


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize(
    "path,words",
    [
        ("/api/v1/cache", "say what to purge"),
        ("/api/v1/cache?all=false", "say what to purge"),
        ("/api/v1/cache?all=yes", "expected true or false"),
        ("/api/v1/cache?all=true&older_than=1", "give it alone"),
        ("/api/v1/cache?older_than=yesterday", "older_than: expected epoch seconds or an ISO"),
        ("/api/v1/cache?older_than=-5", "older_than: expected"),
        ("/api/v1/cache?unused_since=2024-13-45", "unused_since: expected"),
        ("/api/v1/cache?older_than=nan", "older_than: expected"),
        ("/api/v1/cache?tag=1", "unknown query parameter 'tag'"),
        ("/api/v1/cache/docker.io?tag=1", "unknown query parameter 'tag'"),
        ("/api/v1/cache/-bad-", "not an upstream name"),
        ("/api/v1/cache/docker.io/UPPER", "not a repository name"),
        (f"/api/v1/cache/docker.io/x?tag=1&digest={DIGEST}", "tag or digest, not both"),
        ("/api/v1/cache/docker.io/x?tag=.bad", "not a tag"),
        ("/api/v1/cache/docker.io/x?digest=sha256:abc", "not a digest"),
        ("/api/v1/cache/docker.io/x?digest=md5:" + "a" * 32, "not a digest"),
    ],
)
async def test_purge_bad_input_is_400(admin, path, words):
    reply = await admin("DELETE", path)
    assert reply.code == 400, reply.body
    assert reply.json()["error"]["code"] == "BAD_REQUEST"
    assert words in reply.message
    assert not [c for c in admin.backend.calls if c[0] == "purge"]


# -- prefetch -----------------------------------------------------------------------


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize(
    "image,call",
    [
        ("nginx", ("docker.io", "library/nginx", "latest")),
        ("nginx:1.27", ("docker.io", "library/nginx", "1.27")),
        (f"nginx@{DIGEST}", ("docker.io", "library/nginx", DIGEST)),
        (f"nginx:1.27@{DIGEST}", ("docker.io", "library/nginx", DIGEST)),
        ("ghcr.io/owner/name:1.0", ("ghcr.io", "owner/name", "1.0")),
        ("owner/name", ("docker.io", "owner/name", "latest")),
    ],
)
async def test_prefetch_parses_images_like_docker(admin, image, call):
    reply = await admin("POST", "/api/v1/prefetch", {"image": image})
    assert reply.code == 202, reply.body
    assert admin.backend.last("prefetch") == (*call, None)
    job = reply.json()
    assert reply.header("Location") == f"/api/v1/prefetch/{job['id']}"
    assert job["state"] == "queued"


@pytest_twisted.ensureDeferred
async def test_prefetch_platforms_and_jobs(admin):
    reply = await admin(
        "POST",
        "/api/v1/prefetch",
        {"image": "alpine", "platforms": ["linux/amd64", "linux/arm/v7"]},
    )
    assert reply.code == 202
    assert admin.backend.last("prefetch")[-1] == ("linux/amd64", "linux/arm/v7")
    job = reply.json()
    assert job["platforms"] == ["linux/amd64", "linux/arm/v7"]
    listed = (await admin("GET", "/api/v1/prefetch")).json()["jobs"]
    assert listed == [job]
    shown = await admin("GET", reply.header("Location"))
    assert shown.json() == job
    missing = await admin("GET", "/api/v1/prefetch/nope")
    assert missing.code == 404


@pytest_twisted.ensureDeferred
async def test_prefetch_takes_a_form_encoded_content_type(admin):
    """``curl -d '{...}'`` labels JSON as a form; the body is read as JSON anyway."""
    reply = await admin(
        "POST",
        "/api/v1/prefetch",
        data=b'{"image": "alpine"}',
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert reply.code == 202, reply.body


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize(
    "body,words",
    [
        (b"", "send a JSON object"),
        (b"{not json", "not JSON"),
        (b'{"image": NaN}', "not JSON"),
        (b'{"image": "a", "image": "b"}', "given twice"),
        (b"[]", "body: expected an object, got a list"),
        (b'{"platforms": ["linux/amd64"]}', "required field 'image' is missing"),
        (b'{"image": "nginx", "tag": "1"}', "unknown field 'tag'"),
        (b'{"image": 5}', "body.image: expected a string, got an integer"),
        (b'{"image": ""}', "body.image: must not be empty"),
        (b'{"image": "nginx", "platforms": "linux/amd64"}', "body.platforms: expected a list"),
        (b'{"image": "nginx", "platforms": []}', "at least 1"),
        (b'{"image": "nginx", "platforms": ["linux"]}', "body.platforms[0]: not valid"),
        (b'{"image": "nginx", "platforms": ["linux/amd64\\n"]}', "body.platforms[0]: not valid"),
        (b'{"image": "Nginx"}', "not a repository name"),
        (b'{"image": "nginx:-1"}', "not a tag"),
        (b'{"image": "nginx@sha256:00"}', "not a digest"),
        (b'{"image": "unknown.example/a/b"}', "unknown upstream"),
    ],
)
async def test_prefetch_bad_input_is_400(admin, body, words):
    reply = await admin(
        "POST", "/api/v1/prefetch", data=body, headers={"Content-Type": "application/json"}
    )
    assert reply.code == 400, reply.body
    assert words in reply.message


@pytest_twisted.ensureDeferred
async def test_prefetch_body_too_large_is_413(admin):
    big = json.dumps({"image": "nginx", "platforms": ["linux/amd64"] * 10000}).encode()
    reply = await admin("POST", "/api/v1/prefetch", data=big)
    assert reply.code == 413
    assert reply.json()["error"]["code"] == "REQUEST_ENTITY_TOO_LARGE"


# -- fsck ---------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_fsck(admin):
    admin.backend.fsck_result = FsckResult(
        8, 12_002_000, (digest_of("rotten"),), (digest_of("stray"),), ()
    )
    reply = await admin("POST", "/api/v1/fsck")
    assert reply.code == 200, reply.body
    assert reply.json() == {
        "checked": 8,
        "bytes_checked": 12_002_000,
        "quarantined": [digest_of("rotten")],
        "indexed": [digest_of("stray")],
        "forgotten": [],
    }
    assert admin.backend.fscks_done == 1


@pytest_twisted.ensureDeferred
async def test_fsck_refusals(admin):
    assert (await admin("GET", "/api/v1/fsck")).code == 405
    reply = await admin("POST", "/api/v1/fsck?full=true")
    assert reply.code == 400
    assert "unknown query parameter 'full'" in reply.message
    admin.backend.failures["fsck"] = AdminError(409, "fsck works on the local file store only")
    reply = await admin("POST", "/api/v1/fsck")
    assert reply.code == 409
    assert reply.json()["error"] == {
        "code": "CONFLICT",
        "message": "fsck works on the local file store only",
    }


@pytest_twisted.ensureDeferred
async def test_fsck_answers_when_done_and_one_at_a_time(admin):
    gate: Deferred[None] = Deferred()
    admin.backend.fsck_gate = gate
    first = Deferred.fromCoroutine(admin("POST", "/api/v1/fsck"))
    assert not first.called
    second = await admin("POST", "/api/v1/fsck")
    assert second.code == 409
    assert "already running" in second.message
    # the API still answers meanwhile
    assert (await admin("GET", "/api/v1/pins")).code == 200
    gate.callback(None)
    admin.treq.flush()  # StubTreq pumps an answer given later only when told
    reply = await first
    assert reply.code == 200
    assert reply.json()["checked"] == 8
    assert admin.backend.fscks_done == 1


def test_fsck_goes_on_when_the_client_goes_away():
    """Klein cancels a route when its connection drops; the fsck must not be cut short."""
    backend = FakeAdmin()
    gate: Deferred[None] = Deferred()
    backend.fsck_gate = gate
    answer = AdminAPI(backend, None)._shielded_fsck()
    answer.cancel()
    answer.addErrback(lambda _: None)
    assert not gate.called
    gate.callback(None)
    assert backend.fscks_done == 1


# -- pins ---------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_pins_list_pin_unpin(admin):
    reply = await admin("GET", "/api/v1/pins")
    assert reply.code == 200
    assert reply.json() == {
        "pins": [{"image": "docker.io/library/alpine:3.19", "source": "config"}]
    }
    added = await admin("PUT", "/api/v1/pins", {"image": "nginx:1.27"})
    assert added.code == 201, added.body
    assert added.json() == {"image": "docker.io/library/nginx:1.27", "source": "api"}
    assert admin.backend.last("pin") == ("nginx:1.27",)
    # idempotent, however it is spelled
    again = await admin("PUT", "/api/v1/pins", {"image": "docker.io/library/nginx:1.27"})
    assert again.code == 200
    assert again.json() == added.json()
    by_config = await admin("PUT", "/api/v1/pins", {"image": "alpine:3.19"})
    assert by_config.code == 200
    assert by_config.json()["source"] == "config"
    listed = (await admin("GET", "/api/v1/pins")).json()["pins"]
    assert [p["image"] for p in listed] == [
        "docker.io/library/alpine:3.19",
        "docker.io/library/nginx:1.27",
    ]
    removed = await admin("DELETE", "/api/v1/pins?image=nginx:1.27")
    assert removed.code == 204
    assert removed.body == b""
    assert admin.backend.last("unpin") == ("nginx:1.27",)
    assert len((await admin("GET", "/api/v1/pins")).json()["pins"]) == 1


@pytest_twisted.ensureDeferred
async def test_unpin_takes_slashes_colons_and_digests(admin):
    image = f"localhost:5000/team/app:1@{DIGEST}"
    assert (await admin("PUT", "/api/v1/pins", {"image": image})).code == 201
    reply = await admin("DELETE", "/api/v1/pins?image=" + quote(image, safe=""))
    assert reply.code == 204, reply.body
    assert admin.backend.last("unpin") == (image,)


@pytest_twisted.ensureDeferred
async def test_unpin_not_pinned_is_404_and_config_pin_409(admin):
    missing = await admin("DELETE", "/api/v1/pins?image=nginx")
    assert missing.code == 404
    assert missing.json()["error"] == {
        "code": "NOT_FOUND",
        "message": "docker.io/library/nginx is not pinned",
    }
    config = await admin("DELETE", "/api/v1/pins?image=alpine:3.19")
    assert config.code == 409
    assert "cache.pinned" in config.message


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize(
    "body,words",
    [
        (b"", "send a JSON object"),
        (b'{"image": "nginx", "tag": "1"}', "unknown field 'tag'"),
        (b"{}", "required field 'image' is missing"),
        (b'{"image": 5}', "body.image: expected a string"),
        (b'{"image": ""}', "body.image: must not be empty"),
        (b'{"image": "Nginx"}', "image: image 'Nginx': 'library/Nginx' is not a repository name"),
        (b'{"image": "nginx:-1"}', "not a tag"),
        (b'{"image": "nginx@sha256:00"}', "not a digest"),
    ],
)
async def test_pin_bad_input_is_400(admin, body, words):
    reply = await admin("PUT", "/api/v1/pins", data=body)
    assert reply.code == 400, reply.body
    assert words in reply.message
    assert not [c for c in admin.backend.calls if c[0] == "pin"]


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize(
    "query,words",
    [
        ("", "say what to unpin"),
        ("?image=", "empty image name"),
        ("?image=Nginx", "not a repository name"),
        ("?image=a&image=b", "given 2 times"),
        ("?tag=1", "unknown query parameter 'tag'"),
        ("?image=" + "a" * 1025, "longer than 1024 characters"),
    ],
)
async def test_unpin_bad_input_is_400(admin, query, words):
    reply = await admin("DELETE", "/api/v1/pins" + query)
    assert reply.code == 400, reply.body
    assert words in reply.message
    assert not [c for c in admin.backend.calls if c[0] == "unpin"]


# -- upstreams ---------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_list_and_show_upstreams(admin):
    upstreams = (await admin("GET", "/api/v1/upstreams")).json()["upstreams"]
    assert upstreams["docker.io"]["default"] is True
    assert upstreams["ghcr.io"]["preset"] is True
    shown = await admin("GET", "/api/v1/upstreams/ghcr.io")
    assert shown.json() == upstreams["ghcr.io"]
    missing = await admin("GET", "/api/v1/upstreams/nowhere.example")
    assert missing.code == 404
    assert "GET /api/v1/upstreams lists them" in missing.message
    invalid = await admin("GET", "/api/v1/upstreams/bad_name")
    assert invalid.code == 400


@pytest_twisted.ensureDeferred
async def test_put_adds_then_replaces(admin):
    settings = {"url": "https://registry.example", "username": "me", "password": "hunter2"}
    added = await admin("PUT", "/api/v1/upstreams/registry.example", settings)
    assert added.code == 201, added.body
    assert added.json()["url"] == "https://registry.example"
    assert added.json()["password"] == "<set>"
    assert b"hunter2" not in added.body
    assert admin.backend.last("set_upstream") == ("registry.example", settings, False)
    replaced = await admin(
        "PUT", "/api/v1/upstreams/registry.example", {"url": "https://registry.example:8443"}
    )
    assert replaced.code == 200
    assert replaced.json()["username"] is None


@pytest_twisted.ensureDeferred
async def test_patch_merges(admin):
    reply = await admin("PATCH", "/api/v1/upstreams/ghcr.io", {"tag_ttl": 60, "aliases": []})
    assert reply.code == 200
    assert reply.json()["tag_ttl"] == 60
    assert admin.backend.last("set_upstream") == ("ghcr.io", {"tag_ttl": 60, "aliases": []}, True)
    missing = await admin("PATCH", "/api/v1/upstreams/nowhere.example", {"tag_ttl": 1})
    assert missing.code == 404


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize(
    "body,words",
    [
        ({"url": "https://x.example", "pasword": "hunter2"}, "unknown field 'pasword'"),
        ({"password": 12345}, "body.password: expected a string or null, got an integer"),
        ({"tag_ttl": "soon"}, "body.tag_ttl: expected a number or null, got a string"),
        ({"tag_ttl": -1}, "body.tag_ttl: expected a number >= 0"),
        # json.dumps writes them, json.loads would take them: a deadline never reached
        ({"deadline_seconds": float("inf")}, "Infinity is not a JSON number"),
        ({"tag_ttl": float("nan")}, "NaN is not a JSON number"),
        ({"connect_timeout": None}, "body.connect_timeout: expected a number, got null"),
        ({"library_prefix": "yes"}, "expected a boolean"),
        ({"aliases": "a.example"}, "body.aliases: expected a list"),
        ({"fallbacks": [1]}, "body.fallbacks[0]: expected a string"),
    ],
)
async def test_upstream_settings_are_checked_without_echoing_values(admin, body, words):
    reply = await admin("PATCH", "/api/v1/upstreams/ghcr.io", body)
    assert reply.code == 400, reply.body
    assert words in reply.message
    assert b"hunter2" not in reply.body
    assert b"12345" not in reply.body
    assert not [c for c in admin.backend.calls if c[0] == "set_upstream"]


@pytest_twisted.ensureDeferred
async def test_upstream_settings_the_config_refuses_are_400(admin):
    reply = await admin("PUT", "/api/v1/upstreams/x.example", {"url": "ftp://x.example"})
    assert reply.code == 400
    assert "url: expected http(s)://host[:port]" in reply.message
    reply = await admin("PUT", "/api/v1/upstreams/x.example", {"tag_ttl": 5})
    assert reply.code == 400
    assert "url: required key is missing" in reply.message
    reply = await admin("PATCH", "/api/v1/upstreams/ghcr.io", {"fallbacks": ["nowhere.example"]})
    assert reply.code == 400
    assert "is not another upstream" in reply.message


@pytest_twisted.ensureDeferred
async def test_delete_upstream(admin):
    await admin("PUT", "/api/v1/upstreams/x.example", {"url": "https://x.example"})
    reply = await admin("DELETE", "/api/v1/upstreams/x.example")
    assert reply.code == 204
    assert reply.body == b""
    assert (await admin("GET", "/api/v1/upstreams/x.example")).code == 404
    assert (await admin("DELETE", "/api/v1/upstreams/x.example")).code == 404
    default = await admin("DELETE", "/api/v1/upstreams/docker.io")
    assert default.code == 409
    assert default.json()["error"]["code"] == "CONFLICT"


# -- the OpenAPI document -----------------------------------------------------------


def _served_operations() -> set[tuple[str, str]]:
    """(method, OpenAPI path) for every rule of the Klein app."""
    served = set()
    for rule in AdminAPI.app.url_map.iter_rules():
        path = re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", rule.rule)
        for method in rule.methods or ():
            if method not in ("HEAD", "OPTIONS"):
                served.add((method.lower(), path))
    return served


def test_openapi_lists_every_route_and_nothing_else():
    document = openapi.document()
    documented = {(method, path) for path, item in document["paths"].items() for method in item}
    assert documented == _served_operations()


def test_every_route_is_tested_for_the_token():
    tested = {(m.lower(), p.split("?")[0]) for m, p in EVERY_ROUTE}
    for method, template in _served_operations() - {("get", "/healthz")}:
        pattern = re.sub(r"\\\{(\w+)\\\}", ".+", re.escape(template))
        assert any(m == method and re.fullmatch(pattern, p) for m, p in tested), template


def test_openapi_path_parameters_match_the_routes():
    for path, item in openapi.document()["paths"].items():
        in_path = set(re.findall(r"\{(\w+)\}", path))
        for method, operation in item.items():
            declared = {p["name"] for p in operation.get("parameters", ()) if p["in"] == "path"}
            assert declared == in_path, (method, path)


def test_openapi_document_shape():
    document = openapi.document()
    assert document["openapi"].startswith("3.")
    assert document["components"]["securitySchemes"]["bearer"] == {
        "type": "http",
        "scheme": "bearer",
        "description": "admin.token from regproxy's config",
    }
    assert document["security"] == [{"bearer": []}]
    assert document["paths"]["/healthz"]["get"]["security"] == []
    for path, item in document["paths"].items():
        for method, operation in item.items():
            assert "500" in operation["responses"], (method, path)
            if path != "/healthz":
                assert "401" in operation["responses"], (method, path)
            body = operation.get("requestBody")
            if body:
                ref = body["content"]["application/json"]["schema"]["$ref"]
                schema = document["components"]["schemas"][ref.rsplit("/", 1)[1]]
                assert schema["additionalProperties"] is False


def test_upstream_settings_schema_follows_the_config():
    from registryproxy.config import UpstreamConfig

    schema = openapi.SCHEMAS["UpstreamSettings"]
    assert set(schema["properties"]) == {f.name for f in attrs.fields(UpstreamConfig)}
    assert schema["properties"]["tag_ttl"] == {"type": ["number", "null"], "minimum": 0}
    assert schema["properties"]["aliases"] == {"type": "array", "items": {"type": "string"}}


@attrs.frozen
class _Part:
    size: int | None


@attrs.frozen
class _Record:
    name: str = attrs.field(metadata={"openapi": {"description": "what it is called"}})
    parts: tuple[_Part, ...] = ()
    seen_at: float | None = None


def test_answer_schemas_are_derived_from_attrs_classes():
    """A field is declared once: its class gives its name, type and description."""
    assert openapi.schema_of(_Record) == {
        "type": "object",
        "properties": {
            "name": {"type": "string", "description": "what it is called"},
            "parts": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {"size": {"type": ["integer", "null"]}},
                    "required": ["size"],
                },
            },
            "seen_at": {"type": ["number", "null"]},
        },
        "required": ["name", "parts", "seen_at"],
    }
    from registryproxy.admin import backend

    for name in ("RepositorySummary", "RepositoryDetail", "PurgeResult", "PrefetchJob", "Pin"):
        fields = {f.name for f in attrs.fields(getattr(backend, name))}
        assert set(openapi.SCHEMAS[name]["properties"]) == fields, name


@pytest.mark.parametrize(
    "pattern,valid,samples",
    [
        (
            openapi.NAME_PATTERN,
            names.is_valid_name,
            ["a", "library/alpine", "a__b/c-d", "A", "a/", "/a", "a//b", "a\n", "a..b"],
        ),
        (openapi.TAG_PATTERN, names.is_valid_tag, ["1.0", "_x", ".x", "-x", "a" * 129, "x\n"]),
        (
            openapi.DIGEST_PATTERN,
            names.is_valid_digest,
            [DIGEST, DIGEST.upper(), "sha256:abc", "sha512:" + "b" * 128, DIGEST + "\n"],
        ),
        (
            openapi.HOST_PATTERN,
            names.is_valid_registry_host,
            ["docker.io", "localhost:5000", "-a.io", "a_b.io", "a.io:", "a.io\n"],
        ),
    ],
)
def test_openapi_patterns_agree_with_names(pattern, valid, samples):
    for sample in samples:
        assert matches(pattern, sample) == valid(sample), sample


# -- image references ----------------------------------------------------------------


@pytest.mark.parametrize(
    "text,expected",
    [
        ("nginx", ImageReference("docker.io", "library/nginx")),
        ("nginx:1.27", ImageReference("docker.io", "library/nginx", "1.27")),
        ("owner/name", ImageReference("docker.io", "owner/name")),
        ("docker.io/nginx", ImageReference("docker.io", "library/nginx")),
        ("docker.io/library/alpine", ImageReference("docker.io", "library/alpine")),
        ("index.docker.io/library/alpine:3", ImageReference("docker.io", "library/alpine", "3")),
        ("ghcr.io/owner/name:1.0", ImageReference("ghcr.io", "owner/name", "1.0")),
        ("ghcr.io/name", ImageReference("ghcr.io", "name")),
        ("localhost:5000/x:1", ImageReference("localhost:5000", "x", "1")),
        ("localhost:5000/x", ImageReference("localhost:5000", "x")),
        ("localhost/x/y", ImageReference("localhost", "x/y")),
        (f"nginx@{DIGEST}", ImageReference("docker.io", "library/nginx", None, DIGEST)),
        (f"a.io:1/b/c:2@{DIGEST}", ImageReference("a.io:1", "b/c", "2", DIGEST)),
    ],
)
def test_parse_image(text, expected):
    assert parse_image(text) == expected


def test_image_reference_defaults_to_latest():
    assert parse_image("nginx").reference == "latest"
    assert parse_image("nginx:1").reference == "1"
    assert parse_image(f"nginx:1@{DIGEST}").reference == DIGEST
    assert str(parse_image("nginx:1")) == "docker.io/library/nginx:1"


@pytest.mark.parametrize(
    "text,words",
    [
        ("", "empty image name"),
        ("Nginx", "not a repository name"),
        ("nginx:", "not a tag"),
        ("nginx:a/b", "not a registry host"),
        ("nginx@sha256:12", "not a digest"),
        ("nginx@", "not a digest"),
        ("ghcr.io/", "not a repository name"),
        ("-bad.io/x", "not a registry host"),
        ("a//b", "not a repository name"),
    ],
)
def test_parse_image_refuses(text, words):
    with pytest.raises(ValueError, match=words):
        parse_image(text)


# -- the body checker ---------------------------------------------------------------


def test_check_accepts_a_valid_body():
    bodies.parse({"image": "nginx", "platforms": None}, bodies.PrefetchRequest)
    bodies.parse({"url": "https://x", "tag_ttl": 0, "aliases": ["a"]}, bodies.UpstreamSettings)
    bodies.parse({}, bodies.UpstreamSettings)


def test_check_booleans_are_not_numbers():
    with pytest.raises(AdminError, match="body.tag_ttl: expected a number or null, got a boolean"):
        bodies.parse({"tag_ttl": True}, bodies.UpstreamSettings)
    with pytest.raises(AdminError, match="expected a boolean, got an integer"):
        bodies.parse({"library_prefix": 1}, bodies.UpstreamSettings)


def test_request_schemas_are_derived_from_the_body_classes():
    """A body's field is declared once: the route reads it with the class the
    document describes, keywords (minLength, pattern, minItems) included."""
    for name in ("PrefetchRequest", "PinRequest"):
        fields = {f.name for f in attrs.fields(getattr(bodies, name))}
        assert set(openapi.SCHEMAS[name]["properties"]) == fields, name
    platforms = openapi.SCHEMAS["PrefetchRequest"]["properties"]["platforms"]
    assert platforms["minItems"] == 1
    assert platforms["items"]["pattern"] == bodies.PLATFORM_PATTERN
    assert openapi.SCHEMAS["PrefetchRequest"]["required"] == ["image"]
    assert "required" not in openapi.SCHEMAS["UpstreamSettings"]
    settings = bodies.parse({"aliases": ["a.example"], "tag_ttl": 5}, bodies.UpstreamSettings)
    assert bodies.given(settings) == {"aliases": ["a.example"], "tag_ttl": 5.0}


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("number", [b"1e400", b"1" + b"0" * 400])
async def test_a_number_too_large_is_400(admin, number):
    reply = await admin("PATCH", "/api/v1/upstreams/ghcr.io", data=b'{"tag_ttl": ' + number + b"}")
    assert reply.code == 400, reply.body
    assert "too large a number" in reply.message
