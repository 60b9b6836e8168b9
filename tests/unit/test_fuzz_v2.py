"""Fuzz the /v2/ request parser of a real listening regproxy: whatever the
path, query, headers and Range, no 500 and no traceback in the log."""

from __future__ import annotations

import json
import socket
from typing import Any
from urllib.parse import urlsplit

import pytest_twisted
from fuzzing import examples
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.threads import deferToThread
from twisted.logger import globalLogPublisher

from registryproxy.config import PRESETS

DIGEST = "sha256:" + "a" * 64

_text = st.text(st.characters(min_codepoint=0x21, max_codepoint=0xFF), max_size=12)
_segment = st.one_of(
    st.sampled_from(
        [
            "library",
            "app",
            "alpine",
            "x",
            "..",
            ".",
            "",
            "%2F",
            "%00",
            "a" * 300,
            "ghcr.io",
            "localhost:5000",
            "127.0.0.1",
            "1",
            "latest",
            DIGEST,
            "sha256:zz",
            "sha512:00",
        ]
    ),
    _text,
)
_tail = st.one_of(
    st.tuples(st.sampled_from(["manifests", "blobs", "referrers"]), _segment).map("/".join),
    st.just("tags/list"),
    st.sampled_from(["blobs/uploads/", "blobs/uploads/1", ""]),
)
_path = st.builds(
    lambda parts, tail: "/v2/" + "/".join(parts) + ("/" if parts else "") + tail,
    st.lists(_segment, max_size=3),
    _tail,
) | _text.map(lambda t: "/" + t)
_query = st.lists(
    st.tuples(st.sampled_from(["ns", "n", "last", "artifactType", "x", "ns", "n"]), _text),
    max_size=3,
).map(lambda pairs: "&".join(f"{k}={v}" for k, v in pairs))
_number = st.one_of(st.integers(0, 2**70).map(str), st.just("9" * 5000), st.just(""))
_range = st.one_of(
    st.builds(lambda a, b: f"bytes={a}-{b}", _number, _number),
    _text,
    st.builds(lambda a, b: f"bytes={a}-{b},0-1", _number, _number),
)
_headers = st.fixed_dictionaries(
    {},
    optional={
        "Range": _range,
        "Host": st.one_of(_text, st.sampled_from(["localhost", "ghcr.io", "docker.io"])),
        "Accept": _text,
        "X-Any": _text,
    },
)


def send(url: str, method: str, target: str, headers: dict[str, str]) -> bytes:
    parts = urlsplit(url)
    lines = [f"{method} {target} HTTP/1.1", "Connection: close"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    raw = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as sock:
        sock.sendall(raw)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    return received


@pytest_twisted.ensureDeferred
async def test_no_request_makes_a_500(fake_registry, make_proxy):
    _, body = fake_registry.add_image("library/app", "1", [b"layer"])
    layer = json.loads(body)["layers"][0]["digest"]
    # every built-in upstream points at the fake: nothing leaves 127.0.0.1
    here = {name: {"url": fake_registry.url} for name in PRESETS if name != "docker.io"}
    proxy = await make_proxy(fake_registry.url, upstreams=here)
    failures: list[dict[str, Any]] = []

    def observe(event: dict[str, Any]) -> None:
        if (
            "log_failure" in event
            or event.get("log_level") is not None
            and (event["log_level"].name in ("error", "critical"))
        ):
            failures.append(event)

    cached = f"/v2/app/blobs/{layer}"
    assert (await proxy.get(cached)).code == 200

    @settings(
        max_examples=examples(60),
        deadline=None,
        suppress_health_check=list(HealthCheck),
        database=None,
    )
    @given(
        method=st.sampled_from(["GET", "HEAD", "PUT", "DELETE", "OPTIONS", "G\xe9T"]),
        path=st.one_of(_path, st.sampled_from([cached, "/v2/app/manifests/1", "/v2/"])),
        query=_query,
        headers=_headers,
    )
    def check(method: str, path: str, query: str, headers: dict[str, str]) -> None:
        target = path + ("?" + query if query else "")
        received = send(proxy.url, method, target, headers)
        status = received.split(b" ", 2)[1] if received.startswith(b"HTTP/1.") else b""
        assert status and not status.startswith(b"5"), (method, target, headers, received[:300])

    globalLogPublisher.addObserver(observe)
    try:
        await deferToThread(check)
    finally:
        globalLogPublisher.removeObserver(observe)
    assert failures == [], failures[0]
