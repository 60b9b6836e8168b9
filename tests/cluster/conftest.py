"""Fixtures for the cluster tests: real Swift (S3), PostgreSQL and haproxy.

Each engine starts once per session, on free 127.0.0.1 ports, in one
temporary directory removed at the end (``REGPROXY_KEEP_TMP=1`` keeps it).
An engine whose binaries are missing skips its tests with the apt-get line
that installs it; with ``REGPROXY_CLUSTER_REQUIRED=1`` (``.ci/run`` sets it)
that is a failure instead, so CI never skips them silently.  The start-up
times are shown at the end of the run.

Fixture API:

``swift`` (session) -> :class:`engines.S3Endpoint`
    ``.url``, ``.access_key``, ``.secret_key``, ``.region`` of a Swift 2.30
    proxy with s3api (``Swift`` itself: ``swift_engine``).
``swift_tls`` (session) -> :class:`engines.S3Endpoint` of a second proxy over
    the same Swift, on https with a private CA (``.ca_file``).
``s3_settings`` (function) -> ``registryproxy.cluster.s3.S3Settings`` for
    ``swift`` with a bucket of the test's own (not yet created).
``s3_store`` (function) -> ``S3Store`` over ``s3_settings`` on ``threadpool``,
    its bucket created.
``postgres`` (session) -> :class:`engines.Postgres`: ``.dsn(dbname)``,
    ``.create_database(prefix) -> dsn``, ``.drop_database(dsn)``, ``.port``.
``pg_dsn`` (function) -> the DSN of a new empty database, dropped after.
``make_database`` (function) -> ``await make_database(dsn=pg_dsn, **settings)``:
    an open ``registryproxy.cluster.pg.Database`` (one per "node"), closed after.
``make_haproxy`` (function) -> ``make_haproxy(backends, check_interval_ms=500)
    -> engines.HAProxy`` running: ``.url``, ``.reload(backends)``,
    ``.server_states()``, ``.command(line)``; stopped after the test.
``threadpool`` (function) -> a started ``ThreadPool`` (max 8), stopped after.

From ``tests/integration/conftest.py``, for the end-to-end tests
(``test_cluster.py``): ``upstream_registry`` (session; a docker-registry with
token auth), ``token_server`` and ``integration_dir``.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from integration.conftest import (  # noqa: F401 (fixtures, shared with the integration tests)
    integration_dir,
    token_server,
    upstream_registry,
)
from tlscerts import make_ca_and_server_cert
from twisted.internet import reactor
from twisted.python.threadpool import ThreadPool

from registryproxy.cluster.engineconfig import PgSettings, S3Settings
from registryproxy.cluster.pg import Database
from registryproxy.cluster.s3 import S3Store

from . import engines
from .nodes import s3_settings_of

#: engine -> seconds it took to start, shown in the terminal summary
START_TIMES: dict[str, float] = {}


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if START_TIMES:
        times = ", ".join(f"{name} {seconds:.2f}s" for name, seconds in START_TIMES.items())
        terminalreporter.write_line(f"cluster engines started in: {times}")


def _require(reason: str | None) -> None:
    if reason is None:
        return
    if os.environ.get("REGPROXY_CLUSTER_REQUIRED"):
        pytest.fail(f"REGPROXY_CLUSTER_REQUIRED is set, yet {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def cluster_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="regproxy-cluster-"))
    # PostgreSQL runs as another user, and must reach its directory inside
    path.chmod(0o711)
    yield path
    if os.environ.get("REGPROXY_KEEP_TMP"):
        print(f"\nkept cluster temp dir {path}")
    else:
        shutil.rmtree(path, ignore_errors=True)


def _session_engine(name: str, missing: str | None, engine: Any) -> Iterator[Any]:
    _require(missing)
    try:
        engines.timed(name, engine.start, START_TIMES)
        yield engine
    finally:
        engine.stop()


@pytest.fixture(scope="session")
def swift_engine(cluster_dir: Path) -> Iterator[engines.Swift]:
    swift = engines.Swift(cluster_dir / "swift")
    yield from _session_engine("swift", engines.swift_missing(), swift)


@pytest.fixture(scope="session")
def swift(swift_engine: engines.Swift) -> engines.S3Endpoint:
    return swift_engine.endpoint


@pytest.fixture(scope="session")
def swift_tls(swift_engine: engines.Swift, cluster_dir: Path) -> engines.S3Endpoint:
    ca_pem, server_pem = make_ca_and_server_cert(ips=["127.0.0.1"])
    tls = cluster_dir / "tls"
    tls.mkdir()
    (tls / "ca.pem").write_bytes(ca_pem)
    (tls / "server.pem").write_bytes(server_pem)
    added: list[engines.S3Endpoint] = []
    engines.timed(
        "swift https proxy",
        lambda: added.append(swift_engine.add_proxy(tls_pem=tls / "server.pem")),
        START_TIMES,
    )
    return dataclasses.replace(added[0], ca_file=str(tls / "ca.pem"))


@pytest.fixture(scope="session")
def postgres(cluster_dir: Path) -> Iterator[engines.Postgres]:
    pg = engines.Postgres(cluster_dir / "postgres")
    yield from _session_engine("postgres", engines.postgres_missing(), pg)


@pytest.fixture
def threadpool() -> Iterator[ThreadPool]:
    pool = ThreadPool(minthreads=0, maxthreads=8, name="regproxy-test-cluster")
    pool.start()
    yield pool
    pool.stop()


_buckets = itertools.count(1)


@pytest.fixture
def s3_settings(swift: engines.S3Endpoint) -> S3Settings:
    return s3_settings_of(swift, f"regproxy-test-{os.getpid()}-{next(_buckets)}")


@pytest_twisted.async_yield_fixture()
async def s3_store(s3_settings: S3Settings, threadpool: ThreadPool) -> AsyncIterator[S3Store]:
    store = S3Store(s3_settings, threadpool, reactor)
    await store.ensure_bucket()
    yield store


@pytest.fixture
def pg_dsn(postgres: engines.Postgres) -> Iterator[str]:
    dsn = postgres.create_database()
    yield dsn
    postgres.drop_database(dsn)


@pytest_twisted.async_yield_fixture()
async def make_database(
    pg_dsn: str, threadpool: ThreadPool
) -> AsyncIterator[Callable[..., Awaitable[Database]]]:
    opened: list[Database] = []

    async def make(dsn: str = pg_dsn, **settings: Any) -> Database:
        db = Database(PgSettings(dsn=dsn, **settings), threadpool, reactor)
        await db.open()
        opened.append(db)
        return db

    yield make
    for db in opened:
        await db.close()


@pytest.fixture
def make_haproxy(
    cluster_dir: Path, request: pytest.FixtureRequest
) -> Iterator[Callable[..., engines.HAProxy]]:
    _require(engines.haproxy_missing())
    started: list[engines.HAProxy] = []

    def make(backends: Sequence[str], check_interval_ms: int = 500) -> engines.HAProxy:
        name = f"haproxy-{len(started)}-{request.node.name}"[:80]
        proxy = engines.HAProxy(cluster_dir / name, check_interval_ms=check_interval_ms)
        if "haproxy" not in START_TIMES:
            engines.timed("haproxy", lambda: proxy.start(backends), START_TIMES)
        else:
            proxy.start(backends)
        started.append(proxy)
        return proxy

    yield make
    for proxy in started:
        proxy.stop()
