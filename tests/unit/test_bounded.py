"""runtime.Bounded: blocking calls with a deadline each and a bound on those under way."""

from __future__ import annotations

import threading

import pytest
import pytest_twisted
from proxyharness import until
from twisted.internet import defer, reactor
from twisted.python.threadpool import ThreadPool

from registryproxy.runtime import Bounded, Stopped


@pytest.mark.parametrize("skip", [True, False])
@pytest_twisted.ensureDeferred
async def test_a_call_given_up_before_its_turn_is_made_only_without_skip(skip):
    """A lookup nobody waits for need not be made; a write must be, later."""
    pool = ThreadPool(0, 1, "test-bounded")
    bounded = Bounded(reactor, pool, most=8, skip=skip)
    release, made = threading.Event(), []
    try:
        first = bounded.run(0.1, release.wait, 10)
        second = bounded.run(0.1, made.append, "second")
        for each in (first, second):
            with pytest.raises(defer.TimeoutError):
                await each
        release.set()
        await until(lambda: bounded.pending == 0)
        assert made == ([] if skip else ["second"])
    finally:
        release.set()
        bounded.stop()


@pytest_twisted.ensureDeferred
async def test_a_call_on_a_pool_stopped_under_it_fails_without_raising():
    """(Its owner may stop the pool itself: the caller gets a failed
    Deferred, as for any other refusal, and nothing stays counted.)"""
    pool = ThreadPool(0, 1, "test-bounded")
    bounded = Bounded(reactor, pool, most=8)
    assert await bounded.run(5, lambda: "made") == "made"
    pool.stop()
    answer = bounded.run(5, lambda: "made")
    with pytest.raises(Stopped):
        await answer
    assert bounded.pending == 0
