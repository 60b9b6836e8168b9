"""The cluster mode's building blocks without engines: what their settings
refuse and show, and what an unreachable endpoint looks like."""

from __future__ import annotations

import pytest
import pytest_twisted
from integration.harness import free_port
from twisted.internet import reactor
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
