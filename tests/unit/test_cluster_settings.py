"""The cluster mode's building blocks without engines: what their settings
refuse and show, and what an unreachable endpoint looks like."""

from __future__ import annotations

import contextlib
import socket
import struct
import threading

import pytest
import pytest_twisted
from integration.harness import free_port
from twisted.internet import reactor
from twisted.internet.defer import fail
from twisted.python.threadpool import ThreadPool

from registryproxy.cluster.engineconfig import PgSettings, S3Settings
from registryproxy.cluster.pg import Database, Unavailable, _keepalives, lock_id
from registryproxy.cluster.s3 import S3Error, S3Store


def test_s3_settings_hide_the_secret_and_default_to_path_style_for_an_endpoint():
    settings = S3Settings(
        bucket="blobs", endpoint="http://127.0.0.1:8080", access_key="AK", secret_key="s3cr3t"
    )
    assert "s3cr3t" not in repr(settings)
    assert "AK" in repr(settings)
    assert settings.addressing_style == "path"
    assert S3Settings(bucket="blobs").addressing_style == "virtual"  # AWS
    assert S3Settings(bucket="b", endpoint="http://x", path_style=False).addressing_style == (
        "virtual"
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"access_key": "AK"}, "give both or neither"),
        ({"prefix": "/abs"}, "prefix"),
        ({"max_attempts": 0}, "max_attempts"),
    ],
)
def test_s3_settings_refuse(kwargs, message):
    with pytest.raises(ValueError, match=message):
        S3Settings(bucket="blobs", **kwargs)


def test_pg_settings_hide_the_password():
    settings = PgSettings(dsn="host=db user=regproxy password=pgs3cr3t dbname=cache")
    assert "pgs3cr3t" not in repr(settings)
    assert "host=db" in repr(settings)
    uri = PgSettings(dsn="postgresql://regproxy:pgs3cr3t@db/cache")
    assert "pgs3cr3t" not in repr(uri)
    assert PgSettings(dsn="host=db", connect_timeout=0.5).libpq_connect_timeout == 2
    with pytest.raises(ValueError, match="min_size"):
        PgSettings(dsn="host=db", min_size=3, max_size=2)


def test_lock_ids_are_stable_signed_64_bit():
    # the same on every node and release: changing it would let two nodes
    # running different releases fetch the same blob at once
    assert lock_id("blob:sha256:" + "0" * 64) == lock_id("blob:sha256:" + "0" * 64)
    ids = {lock_id(f"k{i}") for i in range(1000)}
    assert len(ids) == 1000
    assert all(-(2**63) <= i < 2**63 for i in ids)
    assert lock_id("regproxy") == STABLE_LOCK_ID


STABLE_LOCK_ID = 7630469907212608055


@pytest_twisted.ensureDeferred
async def test_s3_unreachable_is_an_s3_error_naming_the_endpoint():
    pool = ThreadPool(minthreads=0, maxthreads=2, name="test-s3-unreachable")
    pool.start()
    try:
        settings = S3Settings(
            bucket="blobs",
            endpoint=f"http://127.0.0.1:{free_port()}",
            access_key="AK",
            secret_key="SK",
            max_attempts=1,
            connect_timeout=1,
        )
        with pytest.raises(S3Error) as raised:
            await S3Store(settings, pool, reactor).head("k")
        assert raised.value.code == "EndpointConnectionError"
        assert settings.endpoint in str(raised.value)
    finally:
        pool.stop()


@pytest_twisted.ensureDeferred
async def test_pg_unreachable_says_where_and_what_to_check():
    pool = ThreadPool(minthreads=0, maxthreads=2, name="test-pg-unreachable")
    pool.start()
    try:
        dsn = f"host=127.0.0.1 port={free_port()} user=u password=pgs3cr3t dbname=d"
        db = Database(PgSettings(dsn=dsn, connect_timeout=0.5), pool, reactor)
        with pytest.raises(Unavailable) as raised:
            await db.open()
        message = str(raised.value)
        assert "127.0.0.1" in message and "pgs3cr3t" not in message
        assert "is it running" in message
    finally:
        pool.stop()


def test_the_sessions_settings_go_after_the_dsns_own_options(monkeypatch):
    """libpq's options keyword replaces the DSN's (and PGOPTIONS): a
    search_path set there must survive regproxy's keepalives and timeouts."""
    monkeypatch.delenv("PGOPTIONS", raising=False)
    dsn = "host=db dbname=regproxy options='-c search_path=regproxy'"
    options = _keepalives(PgSettings(dsn=dsn), " -c statement_timeout=1")["options"]
    assert options.startswith("-c search_path=regproxy -c tcp_keepalives_idle=")
    assert options.endswith(" -c statement_timeout=1")
    monkeypatch.setenv("PGOPTIONS", "-c search_path=elsewhere")
    assert _keepalives(PgSettings(dsn="host=db"))["options"].startswith(
        "-c search_path=elsewhere -c tcp_keepalives_idle="
    )


class FrozenPostgres:
    """A PostgreSQL that completes the handshake, then reads every query and
    answers none: a server process stopped, or stuck on its storage (its
    kernel keeps TCP alive, and its statement_timeout cannot fire)."""

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._clients: list[socket.socket] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            self._clients.append(client)
            threading.Thread(target=self._frozen, args=(client,), daemon=True).start()

    def _frozen(self, client: socket.socket) -> None:
        try:
            while True:
                (length,) = struct.unpack("!i", client.recv(4))
                code = struct.unpack("!i", client.recv(length - 4)[:4])[0]
                if code not in (80877103, 80877104):  # an SSL or GSS request: no
                    break
                client.sendall(b"N")
            said = b"R" + struct.pack("!ii", 8, 0)  # authenticated
            for key, value in [("server_version", "15.0"), ("client_encoding", "UTF8")]:
                pair = key.encode() + b"\0" + value.encode() + b"\0"
                said += b"S" + struct.pack("!i", 4 + len(pair)) + pair
            said += b"K" + struct.pack("!iii", 12, 1, 2) + b"Z" + struct.pack("!i", 5) + b"I"
            client.sendall(said)
            while client.recv(65536):
                pass
        except OSError:
            pass

    def thaw(self) -> None:
        """Close every connection: the queries stuck on them fail."""
        for each in [self._listener, *self._clients]:
            with contextlib.suppress(OSError):
                each.shutdown(socket.SHUT_RDWR)  # (a close alone wakes no recv)
            each.close()


@pytest_twisted.ensureDeferred
async def test_a_database_that_never_answers_holds_no_request_past_query_timeout(monkeypatch):
    """Each request's index work is answered 503 at query_timeout, and past
    MOST_QUICK calls waiting, at once, while the threads stay stuck."""
    from registryproxy.cluster import pgindex
    from registryproxy.errors import RegistryError

    frozen = FrozenPostgres()
    monkeypatch.setattr(pgindex, "MOST_QUICK", 3)
    threads = ThreadPool(minthreads=0, maxthreads=2, name="test-pg-frozen")
    heavy = ThreadPool(minthreads=0, maxthreads=1, name="test-pg-frozen-heavy")
    dsn = f"host=127.0.0.1 port={frozen.port} user=u dbname=d sslmode=disable gssencmode=disable"
    database = Database(PgSettings(dsn=dsn, max_size=2, acquire_timeout=1), threads, reactor)
    threads.start()
    try:
        await database.open()
        shared = pgindex.SharedIndex(
            pgindex.PgIndex(database), threads, heavy, reactor, query_timeout=0.3
        )
        asked = [shared.quick(lambda index: index.blob_sizes(["sha256:" + "a" * 64]))]
        asked += [shared.quick(lambda index: index.total_size()) for _ in range(2)]
        with pytest.raises(RegistryError) as busy:
            await shared.quick(lambda index: index.total_size())
        assert (busy.value.status, busy.value.code) == (503, "UNAVAILABLE")
        assert "not keeping up" in busy.value.message
        for each in asked:
            with pytest.raises(RegistryError) as late:
                await each.addTimeout(10, reactor)  # (a test that fails, not hangs)
            assert late.value.status == 503
            assert "did not answer within 0.3 s" in late.value.message
    finally:
        frozen.thaw()  # the stuck threads fail, and can be joined
        await database.close()
        threads.stop()


@pytest_twisted.ensureDeferred
async def test_the_shared_settings_of_a_database_that_gives_no_connection_are_unavailable():
    """Said in one line a heartbeat while the database is down (tap's
    refresh), not a traceback each time."""
    from psycopg_pool import PoolTimeout

    from registryproxy.cluster.settings import ClusterSettings

    class NoConnection:
        def run(self, fn):
            return fail(PoolTimeout("couldn't get a connection after 10.00 sec"))

    with pytest.raises(Unavailable, match="shared settings: couldn't get a connection"):
        await ClusterSettings(NoConnection()).refresh()  # type: ignore[arg-type]
