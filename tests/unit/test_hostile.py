"""Hostile clients: odd headers, bodies, slow and idle connections, floods."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import pytest_twisted
from twisted.logger import globalLogPublisher


@pytest.fixture
def failures() -> Iterator[list[dict[str, Any]]]:
    """Every event logged with a traceback (or at error level) during the test."""
    seen: list[dict[str, Any]] = []

    def observe(event: dict[str, Any]) -> None:
        if "log_failure" in event:
            seen.append(event)

    globalLogPublisher.addObserver(observe)
    yield seen
    globalLogPublisher.removeObserver(observe)


def error_code(reply) -> str:
    return json.loads(reply.body)["errors"][0]["code"]


@pytest_twisted.ensureDeferred
async def test_range_numbers_of_any_length(fake_registry, make_proxy, failures):
    digest = fake_registry.add_blob(b"0123456789")
    proxy = await make_proxy(fake_registry.url)
    path = f"/v2/library/x/blobs/{digest}"
    await proxy.get(path)
    huge = "9" * 5000
    for header, code, body in [
        (f"bytes={huge}-", 416, None),
        (f"bytes={huge}-{huge}", 416, None),
        (f"bytes=2-{huge}", 206, b"23456789"),
        (f"bytes=-{huge}", 206, b"0123456789"),
        (f"bytes={'0' * 5000}3-4", 206, b"34"),
    ]:
        reply = await proxy.get(path, Range=[header])
        assert reply.code == code, header[:20]
        if body is not None:
            assert reply.body == body
        else:
            assert error_code(reply) == "RANGE_INVALID"
            assert len(reply.body) < 500
    reply = await proxy.get(path, Range=[b"bytes=\xff0-1"])
    assert reply.code == 416
    assert failures == []


@pytest_twisted.ensureDeferred
async def test_headers_that_are_not_utf8(fake_registry, make_proxy, failures):
    fake_registry.add_image("library/app", "1", [b"layer"])
    proxy = await make_proxy(fake_registry.url)
    reply = await proxy.request("GET", "/v2/app/manifests/1", {"Host": [b"\xff.example"]})
    assert reply.code == 200
    assert failures == []
