"""The pull API's errors against the OCI distribution-spec error table.

One row per error a pull client can meet, for GET and HEAD where both
apply: the status, the code, the JSON error document
(``{"errors": [{"code", "message"}]}``), its Content-Type, and that a HEAD
answer has no body.  Each request goes out verbatim on its own socket and
is read to the connection's end, so nothing the proxy sends is hidden.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Callable
from typing import Any

import attrs
import pytest
import pytest_twisted
from fakeregistry import FakeRegistry, Override
from proxyharness import RunningProxy
from twisted.internet.threads import deferToThread

#: the distribution spec's error codes (and Distribution's, for upstream trouble)
SPEC_CODES = {
    "BLOB_UNKNOWN",
    "BLOB_UPLOAD_INVALID",
    "BLOB_UPLOAD_UNKNOWN",
    "DIGEST_INVALID",
    "MANIFEST_BLOB_UNKNOWN",
    "MANIFEST_INVALID",
    "MANIFEST_UNKNOWN",
    "NAME_INVALID",
    "NAME_UNKNOWN",
    "SIZE_INVALID",
    "UNAUTHORIZED",
    "DENIED",
    "UNSUPPORTED",
    "TOOMANYREQUESTS",
    "UNAVAILABLE",
    "PAGINATION_NUMBER_INVALID",
}
UNKNOWN_DIGEST = "sha256:" + "0" * 64
UNKNOWN_TAG = "no-such-tag"


@attrs.frozen
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes


def raw(port: int, method: str, path: str) -> Answer:
    """*method path* over HTTP/1.1 with ``Connection: close``, read to the end."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
        extra = "Content-Length: 0\r\n" if method in ("PUT", "POST", "PATCH") else ""
        head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{extra}Connection: close\r\n"
        conn.sendall(head.encode() + b"\r\n")
        data = b""
        while chunk := conn.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return Answer(int(status_line.split()[1]), headers, body)


@attrs.frozen
class Row:
    id: str
    methods: tuple[str, ...]
    path: str
    status: int
    code: str | None
    #: upstream keys for the proxy's docker.io
    upstream: dict[str, Any] = attrs.field(factory=dict)
    #: sets the fake registry up (and may send requests first, through the proxy)
    setup: Callable[[FakeRegistry], None] | None = None
    #: requests sent first (to open a circuit breaker)
    before: tuple[str, ...] = ()
    headers: dict[str, str] = attrs.field(factory=dict)


def override(pattern: str, status: int, **headers: str) -> Callable[[FakeRegistry], None]:
    def setup(registry: FakeRegistry) -> None:
        registry.status_override[pattern] = Override(status, headers=headers)

    return setup


def not_found(pattern: str) -> Callable[[FakeRegistry], None]:
    """An upstream answering 404 with a code outside the spec's table."""
    body = json.dumps({"errors": [{"code": "NOT_FOUND", "message": "nothing here"}]}).encode()

    def setup(registry: FakeRegistry) -> None:
        registry.status_override[pattern] = Override(404, body=body)

    return setup


def no_referrers(registry: FakeRegistry) -> None:
    registry.referrers_api = False


def slow_blobs(registry: FakeRegistry) -> None:
    registry.blob_delay.update({"GET": 5.0, "HEAD": 5.0})


GH = ("GET", "HEAD")
M = "/v2/app/manifests"
B = "/v2/app/blobs"
ROWS = [
    # end-1: the API's base
    Row("end-1 base", GH, "/v2/", 200, None),
    # end-2: blobs
    Row("end-2 unknown blob", GH, f"{B}/{UNKNOWN_DIGEST}", 404, "BLOB_UNKNOWN"),
    Row("end-2 malformed digest", GH, f"{B}/sha256:xyz", 400, "DIGEST_INVALID"),
    Row("end-2 unknown algorithm", GH, f"{B}/md5:{'0' * 32}", 400, "DIGEST_INVALID"),
    Row("end-2 bad name", GH, f"/v2/UPPER/blobs/{UNKNOWN_DIGEST}", 400, "NAME_INVALID"),
    # end-3: manifests
    Row("end-3 unknown tag", GH, f"{M}/{UNKNOWN_TAG}", 404, "MANIFEST_UNKNOWN"),
    Row("end-3 unknown digest", GH, f"{M}/{UNKNOWN_DIGEST}", 404, "MANIFEST_UNKNOWN"),
    Row("end-3 malformed digest", GH, f"{M}/sha256:xyz", 404, "MANIFEST_UNKNOWN"),
    Row("end-3 tag too long", GH, f"{M}/{'a' * 129}", 404, "MANIFEST_UNKNOWN"),
    Row("end-3 tag starting with a dot", GH, f"{M}/.hidden", 404, "MANIFEST_UNKNOWN"),
    Row("end-3 empty reference", GH, f"{M}/", 404, "MANIFEST_UNKNOWN"),
    Row("end-3 unknown repository", GH, "/v2/nobody/here/manifests/1", 404, "NAME_UNKNOWN"),
    Row("end-3 bad name", GH, "/v2/UPPER/manifests/1", 400, "NAME_INVALID"),
    Row("end-3 bad name (double slash)", GH, "/v2/a//b/manifests/1", 400, "NAME_INVALID"),
    Row("end-3 unknown registry", GH, "/v2/unknown.example/a/manifests/1", 404, "NAME_UNKNOWN"),
    Row("end-3 unknown registry (ns=)", GH, f"{M}/1?ns=unknown.example", 404, "NAME_UNKNOWN"),
    # end-8: tags
    Row("end-8 unknown repository", ("GET",), "/v2/nobody/tags/list", 404, "NAME_UNKNOWN"),
    Row("end-8 bad n", ("GET",), "/v2/app/tags/list?n=many", 400, "PAGINATION_NUMBER_INVALID"),
    Row("end-8 negative n", ("GET",), "/v2/app/tags/list?n=-1", 400, "PAGINATION_NUMBER_INVALID"),
    # end-12: referrers
    Row(
        "end-12 no referrers API",
        ("GET",),
        f"/v2/app/referrers/{UNKNOWN_DIGEST}",
        404,
        "MANIFEST_UNKNOWN",
        setup=no_referrers,
    ),
    Row("end-12 malformed digest", ("GET",), "/v2/app/referrers/sha256:xyz", 400, "DIGEST_INVALID"),
    # push and delete: a read-only cache
    Row("end-4 start an upload", ("POST",), "/v2/app/blobs/uploads/", 405, "UNSUPPORTED"),
    Row("end-5 upload a chunk", ("PATCH",), "/v2/app/blobs/uploads/1", 405, "UNSUPPORTED"),
    Row("end-6 finish an upload", ("PUT",), "/v2/app/blobs/uploads/1?digest=x", 405, "UNSUPPORTED"),
    Row("end-7 push a manifest", ("PUT",), f"{M}/1", 405, "UNSUPPORTED"),
    Row("end-9 delete a manifest", ("DELETE",), f"{M}/{UNKNOWN_DIGEST}", 405, "UNSUPPORTED"),
    Row("end-10 delete a blob", ("DELETE",), f"{B}/{UNKNOWN_DIGEST}", 405, "UNSUPPORTED"),
    Row(
        "end-11 mount a blob", ("POST",), f"{B}/uploads/?mount={UNKNOWN_DIGEST}", 405, "UNSUPPORTED"
    ),
    Row("end-13 upload status", ("GET",), "/v2/app/blobs/uploads/1", 405, "UNSUPPORTED"),
    # the upstream's trouble
    Row("upstream 401", GH, f"{M}/1", 401, "UNAUTHORIZED", setup=override("/manifests/", 401)),
    Row(
        "upstream 429",
        GH,
        f"{M}/1",
        429,
        "TOOMANYREQUESTS",
        setup=override("/manifests/", 429, **{"Retry-After": "17"}),
        headers={"retry-after": "17"},
    ),
    Row(
        "upstream 404 NOT_FOUND blob",
        GH,
        f"{B}/{UNKNOWN_DIGEST}",
        404,
        "BLOB_UNKNOWN",
        setup=not_found("/blobs/"),
    ),
    Row("upstream 404 NOT_FOUND tag", GH, f"{M}/9", 404, "MANIFEST_UNKNOWN", setup=not_found("/9")),
    Row(
        "upstream 404 NOT_FOUND tags",
        ("GET",),
        "/v2/app/tags/list",
        404,
        "NAME_UNKNOWN",
        setup=not_found("/tags/"),
    ),
    Row("upstream 500", GH, f"{M}/1", 502, "UNAVAILABLE", setup=override("/manifests/", 500)),
    Row(
        "upstream 503",
        GH,
        f"{B}/{UNKNOWN_DIGEST}",
        502,
        "UNAVAILABLE",
        setup=override("/blobs/", 503),
    ),
    Row(
        "circuit open",
        GH,
        f"{M}/1",
        503,
        "UNAVAILABLE",
        upstream={"breaker_threshold": 1, "breaker_cooldown": 600},
        setup=override("/manifests/", 500),
        before=(f"{M}/2",),
    ),
    Row(
        "upstream too slow",
        GH,
        f"{B}/{UNKNOWN_DIGEST}",
        504,
        "UNAVAILABLE",
        upstream={"read_timeout": 0.2},
        setup=slow_blobs,
    ),
]
CASES = [
    pytest.param(row, method, id=f"{row.id} {method}") for row in ROWS for method in row.methods
]


@pytest.mark.parametrize("row, method", CASES)
@pytest_twisted.ensureDeferred
async def test_error_table(fake_registry, make_proxy, row, method):
    fake_registry.add_image("library/app", "1", [os.urandom(100)])
    if row.setup is not None:
        row.setup(fake_registry)
    proxy: RunningProxy = await make_proxy(fake_registry.url, **row.upstream)
    port = int(proxy.url.rsplit(":", 1)[1])
    for path in row.before:
        await deferToThread(raw, port, "GET", path)
    answer = await deferToThread(raw, port, method, row.path)
    assert answer.status == row.status, answer
    assert answer.headers.get("docker-distribution-api-version") == "registry/2.0"
    for name, value in row.headers.items():
        assert answer.headers.get(name) == value, answer
    if method == "HEAD":
        assert answer.body == b""  # a HEAD answer never has a body
        if row.code is None:
            return
        assert answer.headers["content-type"] == "application/json; charset=utf-8"
        return
    if row.code is None:
        assert json.loads(answer.body) == {}
        assert answer.headers["content-type"] == "application/json"
        return
    assert answer.headers["content-type"] == "application/json; charset=utf-8"
    assert int(answer.headers["content-length"]) == len(answer.body)
    document = json.loads(answer.body)
    assert list(document) == ["errors"], document
    (error,) = document["errors"]
    assert {"code", "message"} <= set(error) <= {"code", "message", "detail"}, error
    assert error["code"] == row.code, error
    assert error["code"] in SPEC_CODES
    assert isinstance(error["message"], str) and error["message"]
