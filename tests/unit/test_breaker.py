"""The circuit breaker: a failing upstream is left alone for a while, then tried once."""

from __future__ import annotations

import json

import pytest
import pytest_twisted
from fakeregistry import Override
from twisted.internet.task import Clock

from registryproxy.upstream.breaker import CircuitBreaker, CircuitOpen


def test_opens_after_threshold_then_half_opens():
    clock = Clock()
    breaker = CircuitBreaker(clock, threshold=3, cooldown=10)
    for _ in range(2):
        breaker.check()
        breaker.failed()
    breaker.check()  # still closed after two failures
    breaker.failed()
    with pytest.raises(CircuitOpen) as e:
        breaker.check()
    assert e.value.retry_in == 10
    clock.advance(10)
    breaker.check()  # the one trial
    with pytest.raises(CircuitOpen):
        breaker.check()  # others wait while it runs
    breaker.failed()  # trial failed: open twice as long
    clock.advance(19)
    with pytest.raises(CircuitOpen):
        breaker.check()
    clock.advance(1)
    breaker.check()
    breaker.succeeded()
    breaker.check()
    breaker.check()


def test_a_success_resets_the_count():
    breaker = CircuitBreaker(Clock(), threshold=2, cooldown=10)
    breaker.failed()
    breaker.succeeded()
    breaker.failed()
    breaker.check()


def test_threshold_zero_never_opens():
    breaker = CircuitBreaker(Clock(), threshold=0, cooldown=10)
    for _ in range(100):
        breaker.failed()
    breaker.check()


@pytest_twisted.ensureDeferred
async def test_failing_upstream_is_not_asked_while_open(fake_registry, make_proxy):
    _, body = fake_registry.add_image("library/app", "1", [b"v1"])
    proxy = await make_proxy(
        fake_registry.url, breaker_threshold=3, breaker_cooldown=60, cache={"tag_ttl": 0}
    )
    await proxy.get("/v2/app/manifests/1")
    fake_registry.status_override["/v2/"] = Override(500)
    for _ in range(3):
        reply = await proxy.get("/v2/app/manifests/1")
        assert reply.header("X-Cache") == "STALE"
    asked = len(fake_registry.requests)
    for _ in range(5):
        reply = await proxy.get("/v2/app/manifests/1")
        assert (reply.code, reply.header("X-Cache")) == (200, "STALE")
        reply = await proxy.get("/v2/app/manifests/2")
        assert reply.code == 503
        assert "not asking it again" in json.loads(reply.body)["errors"][0]["message"]
    assert len(fake_registry.requests) == asked
