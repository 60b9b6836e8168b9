"""A real ``twistd`` node stops on SIGTERM while PostgreSQL never answers.

Stopped with SIGSTOP, PostgreSQL keeps its connections and answers nothing:
the node's heartbeat and settings refresh threads wait in libpq for good.
Its exit after SIGTERM used to wait on them, for as long as PostgreSQL
stayed stopped (a supervisor's SIGKILL, without a word in the log); each
part's stop now goes on without them after STOP_SECONDS."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest_twisted
from fakeregistry import FakeRegistry
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread

from registryproxy.runtime import STOP_SECONDS
from registryproxy.tap import _PUBLISH_SECONDS

from . import engines
from .nodes import Cluster, fetch


@pytest_twisted.ensureDeferred
async def test_a_node_stops_on_sigterm_while_the_database_never_answers(
    tmp_path: Path, swift: engines.S3Endpoint, postgres: engines.Postgres
) -> None:
    from twisted.internet import reactor

    registry = await FakeRegistry.start()
    dsn = postgres.create_database("stopping")
    nodes = Cluster(
        tmp_path,
        swift,
        f"regproxy-stop-{int(time.time())}",
        dsn,
        registry.url,
        lambda backends: None,  # type: ignore[arg-type,return-value]
        extra_config={"proxy": {"shutdown_grace": 1}},
    )
    try:
        (node,) = await deferToThread(nodes.add_nodes, 1)
        digest = registry.add_blob(os.urandom(100_000))
        got = await deferToThread(fetch, node.url, f"/v2/library/x/blobs/{digest}")
        assert got.status == 200, got.error
        assert node.proc is not None
        with postgres.frozen():
            # its heartbeats and refreshes now wait in libpq
            await deferLater(reactor, 2 * nodes.heartbeat, lambda: None)
            started = time.monotonic()
            node.proc.send_signal(signal.SIGTERM)
            code = await deferToThread(node.proc.wait, 60)
            took = time.monotonic() - started
        assert code == -signal.SIGTERM  # twistd's own end: by the signal it got
        # the grace, the downloads' publishing (to the stopped database),
        # then the parts' deadlines side by side, and the engines' close
        assert took < 1 + _PUBLISH_SECONDS + 2 * STOP_SECONDS, took
        log = node.last_run_log()
        assert "leaving the cluster: no answer within" in log, log
        assert log.rstrip().endswith("Server Shut Down."), log
        # each part's failure said in a line, not a traceback
        assert "Unhandled" not in log and "Traceback" not in log, log
    finally:
        nodes.stop()
        await registry.stop()
        postgres.drop_database(dsn)
