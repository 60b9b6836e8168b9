"""A stop never hangs: each part's stop has a deadline, and the whole stop one more.

A database that keeps its connections and never answers held a cluster
node's exit after SIGTERM for good (its heartbeat and settings refresh
threads stuck, the leave queued behind them, the pools' threads joined on
the reactor's thread); tests/cluster/test_node.py stops a real node so."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThreadPool
from twisted.logger import LogEvent, formatEvent

from registryproxy import runtime, tap, watchdog
from registryproxy.cluster.membership import Membership


def text(events: list[LogEvent]) -> str:
    return "\n".join(formatEvent(e) for e in events)


@pytest_twisted.ensureDeferred
async def test_pools_with_stuck_threads_stop_without_them_in_one_deadline(logged):
    pools = [runtime.thread_pool(f"test-stuck-{i}", 2) for i in range(3)]
    release = threading.Event()
    stuck = []
    for pool in pools:
        pool.start()
        stuck.append(deferToThreadPool(reactor, pool, release.wait, 30))
    done = await deferToThreadPool(reactor, pools[0], lambda: "done")
    try:
        started = time.monotonic()
        runtime.stop_pool(*pools, seconds=0.3)
        assert time.monotonic() - started < 0.9  # one deadline for all, not one each
        said = text(logged)
        assert all(f"threads of test-stuck-{i} still busy after 0.3s" in said for i in range(3))
        # their threads do not hold the process's exit
        assert all(t.daemon for t in threading.enumerate() if "test-stuck" in t.name)
    finally:
        release.set()
    assert done == "done"
    assert [await d for d in stuck] == [True] * 3


def test_a_pool_that_finishes_is_stopped_and_joined(logged):
    pool = runtime.thread_pool("test-quick", 2, minthreads=2)
    pool.start()
    runtime.stop_pool(pool, seconds=0)  # a deadline already past: an idle pool still ends
    assert not [t for t in threading.enumerate() if "test-quick" in t.name]
    assert "still busy" not in text(logged)


def test_within_goes_on_without_what_does_not_answer(logged):
    clock = Clock()
    never: Deferred[None] = Deferred()
    d = runtime.within(never, 5, clock, "leaving the cluster")
    clock.advance(4.9)
    assert not d.called
    clock.advance(0.1)
    assert d.called and d.result is None
    assert "leaving the cluster: no answer within 5s: going on without it" in text(logged)
    # and what answers in time is waited for, quietly; a failure is said
    logged.clear()
    assert runtime.within(succeed("x"), 5, clock, "y").result is None
    assert text(logged) == ""
    failing: Deferred[None] = Deferred()
    d = runtime.within(failing, 5, clock, "closing")
    failing.errback(RuntimeError("gone"))
    assert d.called and "closing failed: gone" in text(logged)
    # and what answers after its deadline is left to it, no error unhandled
    never.callback(None)


def _periodic(clock: Clock) -> tuple[Any, list[Deferred[None]]]:
    """A started periodic task every 60 s whose runs answer when the test
    says: the service, and its runs."""
    runs: list[Deferred[None]] = []

    def task() -> Deferred[None]:
        runs.append(Deferred())
        return runs[-1]

    service = tap._Periodic(clock, 60, task, "the test's task")
    service.startService()
    return service, runs


def test_a_periodic_task_under_way_holds_a_stop_at_most_stop_seconds():
    clock = Clock()
    service, runs = _periodic(clock)
    assert len(runs) == 1  # under way, never answered
    stopped = service.stopService()
    clock.advance(runtime.STOP_SECONDS - 0.1)
    assert not stopped.called
    clock.advance(0.1)
    assert stopped.called


def test_a_periodic_task_restarted_after_a_stop_that_gave_up_stays_running():
    clock = Clock()
    service, runs = _periodic(clock)
    stopped = service.stopService()
    clock.advance(runtime.STOP_SECONDS)
    assert stopped.called and not service.running
    service.startService()
    assert service.running and len(runs) == 2
    runs[0].callback(None)  # the run the stop gave up on ends at last
    assert service.running
    runs[1].callback(None)
    clock.advance(60)
    assert len(runs) == 3


class _Silent:
    """A Database whose every call never answers (PostgreSQL stopped)."""

    def run(self, fn: Any) -> Deferred[Any]:
        return Deferred()


def test_leaving_a_cluster_whose_database_never_answers_ends_at_stop_seconds():
    clock = Clock()
    membership = Membership(_Silent(), "node-a", "http://a", clock, 1.0, 3.0)  # type: ignore[arg-type]
    membership.startService()
    stopped = membership.stopService()
    clock.advance(runtime.STOP_SECONDS - 0.1)
    assert not stopped.called
    clock.advance(0.1)
    assert stopped.called


class _Recording:
    """A Database whose calls answer when the test says: (name, Deferred)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Deferred[Any]]] = []

    def run(self, fn: Any) -> Deferred[Any]:
        self.calls.append((fn.__name__, Deferred()))
        return self.calls[-1][1]


def test_leaving_waits_for_a_heartbeat_under_way():
    """Its row, written after the leave's delete, brought the node back
    for the others until node_timeout."""
    clock = Clock()
    database = _Recording()
    membership = Membership(database, "node-a", "http://a", clock, 1.0, 3.0)  # type: ignore[arg-type]
    membership.startService()
    clock.advance(1.0)
    assert [name for name, _ in database.calls] == ["beat"]
    stopped = membership.stopService()
    assert [name for name, _ in database.calls] == ["beat"]  # no delete before it ends
    database.calls[0][1].callback([])
    assert [name for name, _ in database.calls] == ["beat", "delete"]
    assert not stopped.called
    database.calls[1][1].callback(None)
    assert stopped.called


def _fired(exits: list[int], seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while not exits and time.monotonic() < deadline:
        time.sleep(0.01)
    return bool(exits)


def test_a_stop_past_the_watchdog_deadline_ends_the_process_and_says_where(logged):
    exits: list[int] = []
    dog = watchdog.Watchdog(0.1, exit=exits.append)
    dog.arm()
    dog.arm()  # a second stop: still one deadline, one exit
    assert _fired(exits)
    time.sleep(0.2)
    assert exits == [1]
    said = text(logged)
    assert "stopping took over 0.1s" in said
    assert "thread MainThread:" in said and "test_stopping.py" in said  # where it is


def test_a_watchdog_of_a_grace_too_long_for_a_timer_still_counts():
    exits: list[int] = []
    dog = watchdog.Watchdog(1e10, exit=exits.append)  # past threading.TIMEOUT_MAX
    dog.arm()
    time.sleep(0.1)
    assert dog._timer is not None and dog._timer.is_alive()
    dog._timer.cancel()
    assert exits == []


class _NeverAnswers:
    def close(self) -> Deferred[None]:
        return Deferred()

    def flush(self) -> Deferred[None]:
        return Deferred()


class _NoConnections:
    def closeCachedConnections(self) -> Deferred[None]:
        return succeed(None)


def test_a_cluster_nodes_engines_stop_within_their_deadlines(logged):
    """The last access times' write, then the database pool's close, each
    given up at STOP_SECONDS when PostgreSQL never answers."""
    from registryproxy.cluster.node import Engines

    clock = Clock()
    silent = _NeverAnswers()
    engines = Engines(
        database=silent,  # type: ignore[arg-type]
        index=None,  # type: ignore[arg-type]
        access=silent,  # type: ignore[arg-type]
        s3=None,  # type: ignore[arg-type]
        bucket=None,  # type: ignore[arg-type]
        membership=None,  # type: ignore[arg-type]
        peers=None,  # type: ignore[arg-type]
        pools=[],
        agent_pool=_NoConnections(),  # type: ignore[arg-type]
        tier_threads=None,  # type: ignore[arg-type]
        clock=clock,
        settings=None,  # type: ignore[arg-type]
    )
    stopped = Deferred.fromCoroutine(engines.stop())
    clock.advance(runtime.STOP_SECONDS)
    assert "writing the last access times: no answer within" in text(logged)
    assert not stopped.called
    clock.advance(runtime.STOP_SECONDS)
    assert "closing the database pool: no answer within" in text(logged)
    assert stopped.called
