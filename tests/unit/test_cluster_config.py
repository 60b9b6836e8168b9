"""The cluster mode's configuration keys (issue 11): cache.storage,
cache.index and cluster, their secrets in three forms, and what is refused,
never showing a secret."""

from __future__ import annotations

import re
from pathlib import Path

import attrs
import pytest
import yaml

from registryproxy.cluster.engineconfig import PgSettings, S3Settings
from registryproxy.config import (
    ClusterConfig,
    Config,
    ConfigError,
    IndexConfig,
    StorageConfig,
    parse_config,
)

ROOT = Path(__file__).parent.parent.parent

S3_SECRET = "s3-SECRET-value"
PG_PASSWORD = "pg-SECRET-value"
CLUSTER_SECRET = "cluster-SECRET-value"
SECRETS = (S3_SECRET, PG_PASSWORD, CLUSTER_SECRET)

#: the shape the acceptance tests write
ISSUE_YAML = f"""
cache:
  directory: "/var/cache/regproxy"
  storage:
    s3:
      endpoint: "http://127.0.0.1:18080"
      bucket: "regproxy"
      region: "us-east-1"
      access_key: "test:tester"
      secret_key: "{S3_SECRET}"
  index:
    postgresql:
      dsn: "postgresql://regproxy@127.0.0.1:15432/regproxy"
cluster:
  node: "node-1"
  listen: "tcp:5002:interface=127.0.0.1"
  advertise: "http://127.0.0.1:5002"
"""


def config_with(
    s3: str = "{bucket: b, access_key: AK, secret_key: SK}",
    postgresql: str = "{dsn: 'host=db dbname=cache'}",
    cluster: str = "{node: n1, listen: 'tcp:5002', advertise: 'http://10.0.0.5:5002'}",
    storage_extra: str = "",
) -> str:
    lines = ["cache:", "  directory: regproxy-cache"]
    if s3 or storage_extra:
        lines.append("  storage:")
    if s3:
        lines.append(f"    s3: {s3}")
    if storage_extra:
        lines.append(f"    {storage_extra}")
    if postgresql:
        lines.append(f"  index: {{postgresql: {postgresql}}}")
    if cluster:
        lines.append(f"cluster: {cluster}")
    return "\n".join(lines) + "\n"


def refused(text: str) -> str:
    with pytest.raises(ConfigError) as raised:
        parse_config(text, source="f.yaml")
    message = str(raised.value)
    assert message.startswith("f.yaml: ")
    for secret in SECRETS:
        assert secret not in message
    return message


def test_the_issues_shape_loads_into_the_attributes_tap_reads():
    config = parse_config(ISSUE_YAML)
    s3 = config.cache.storage.s3
    assert s3 == S3Settings(
        bucket="regproxy",
        endpoint="http://127.0.0.1:18080",
        region="us-east-1",
        access_key="test:tester",
        secret_key=S3_SECRET,
    )
    assert s3.addressing_style == "path"
    assert config.cache.storage.local_max_bytes == 10 * 1024**3
    assert config.cache.storage.redirect is False
    assert config.cache.index.postgresql == PgSettings(
        dsn="postgresql://regproxy@127.0.0.1:15432/regproxy"
    )
    assert config.cluster == ClusterConfig(
        node="node-1", listen="tcp:5002:interface=127.0.0.1", advertise="http://127.0.0.1:5002"
    )
    assert (config.cluster.heartbeat, config.cluster.node_timeout) == (2.0, 10.0)
    assert (config.cluster.peer_timeout, config.cluster.secret) == (10.0, None)
    assert S3_SECRET not in repr(config)


def test_without_the_new_keys_nothing_changes():
    config = parse_config("cache: {directory: /tmp/x}\n")
    assert config.cluster is None
    assert config.cache.storage == StorageConfig()
    assert config.cache.storage.s3 is None
    assert config.cache.index == IndexConfig()
    assert config.cache.index.postgresql is None
    assert Config().cache.storage.local_max_size == "10GiB"


def test_every_key_can_be_given():
    config = parse_config(
        config_with(
            s3="{bucket: b, endpoint: 'https://s3.internal', prefix: 'rp/', region: eu-west-1,"
            " path_style: false, connect_timeout: 1, read_timeout: 2, max_attempts: 5}",
            postgresql="{dsn: 'host=db', min_size: 0, max_size: 4, connect_timeout: 3,"
            " acquire_timeout: 4, query_timeout: 6, max_leases: 2, keepalive_idle: 7,"
            " keepalive_interval: 2}",
            cluster="{node: a.b_c-1, listen: 'tcp:5002', advertise: 'https://n1.internal/',"
            " heartbeat: 0.5, node_timeout: 3, peer_timeout: 4, secret: x}",
            storage_extra="local_max_size: 1GB",
        )
    )
    s3 = config.cache.storage.s3
    assert s3 is not None
    assert (s3.prefix, s3.addressing_style, s3.max_attempts) == ("rp/", "virtual", 5)
    assert s3.access_key is None and s3.secret_key is None  # boto3's own lookup
    pg = config.cache.index.postgresql
    assert pg is not None and (pg.max_size, pg.max_leases, pg.query_timeout) == (4, 2, 6.0)
    assert config.cluster is not None
    assert (config.cluster.heartbeat, config.cluster.node_timeout) == (0.5, 3.0)
    assert config.cache.storage.local_max_bytes == 10**9


@pytest.mark.parametrize("form", ["inline", "env", "file"])
def test_each_secret_form(form, tmp_path, monkeypatch):
    values = {"secret_key": S3_SECRET, "dsn": f"host=db password={PG_PASSWORD}"}
    values["secret"] = CLUSTER_SECRET
    given = {}
    for key, value in values.items():
        if form == "inline":
            given[key] = f"{key}: '{value}'"
        elif form == "env":
            monkeypatch.setenv(f"TEST_{key.upper()}", value)
            given[key] = f"{key}_env: TEST_{key.upper()}"
        else:
            path = tmp_path / key
            path.write_text(value + "\n")
            given[key] = f"{key}_file: '{path}'"
    config = parse_config(
        config_with(
            s3=f"{{bucket: b, access_key: AK, {given['secret_key']}}}",
            postgresql=f"{{{given['dsn']}}}",
            cluster="{node: n1, listen: 'tcp:5002', advertise: 'http://10.0.0.5:5002',"
            f" {given['secret']}}}",
        )
    )
    assert config.cache.storage.s3 is not None
    assert config.cache.storage.s3.secret_key == S3_SECRET
    assert config.cache.index.postgresql is not None
    assert config.cache.index.postgresql.dsn == values["dsn"]
    assert config.cluster is not None and config.cluster.secret == CLUSTER_SECRET
    for secret in SECRETS:
        assert secret not in repr(config)


def test_secret_errors_name_the_key_and_never_the_secret(tmp_path, monkeypatch):
    monkeypatch.setenv("TEST_S3_SECRET", S3_SECRET)
    message = refused(
        config_with(
            s3=f"{{bucket: b, access_key: AK, secret_key: '{S3_SECRET}',"
            " secret_key_env: TEST_S3_SECRET}"
        )
    )
    assert "cache.storage.s3: give only one of secret_key, secret_key_env, secret_key_file" in (
        message
    )
    message = refused(config_with(s3="{bucket: b, access_key: AK, secret_key_env: NO_SUCH_VAR}"))
    assert "cache.storage.s3.secret_key_env: environment variable NO_SUCH_VAR is not set" in (
        message
    )
    message = refused(
        config_with(s3=f"{{bucket: b, access_key: AK, secret_key_file: '{tmp_path}/none'}}")
    )
    assert f"cache.storage.s3.secret_key_file: cannot read '{tmp_path}/none'" in message
    (tmp_path / "empty").write_text("\n")
    message = refused(config_with(postgresql=f"{{dsn_file: '{tmp_path}/empty'}}"))
    assert "cache.index.postgresql.dsn_file:" in message and "is empty" in message
    # a secret of the wrong type is not echoed either
    message = refused(config_with(s3="{bucket: b, access_key: AK, secret_key: 1234567}"))
    assert "cache.storage.s3.secret_key: expected a string, got int (not shown)" in message
    assert "1234567" not in message
    message = refused(config_with(postgresql=f"{{dsn: 'nonsense {PG_PASSWORD}'}}"))
    assert "cache.index.postgresql: dsn: expected a libpq connection string" in message
    message = refused(config_with(s3=f"{{bucket: b, secret_key: '{S3_SECRET}'}}"))
    assert "access_key and secret_key: give both or neither" in message


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (config_with(s3="{region: x}"), "cache.storage.s3.bucket: required key is missing"),
        (config_with(s3="{bucket: ''}"), "cache.storage.s3: bucket: is empty"),
        (config_with(s3="{bucket: b, region: 1}"), "cache.storage.s3.region: expected a string"),
        (config_with(s3="{bucket: b, endpoint: 's3.internal'}"), "endpoint: expected http(s)"),
        (config_with(s3="{bucket: b, colour: red}"), "cache.storage.s3.colour: unknown key"),
        (config_with(s3="{bucket: b, colour: red}"), "secret_key_env, secret_key_file"),
        (
            config_with(postgresql="{min_size: 1}"),
            "cache.index.postgresql: give one of dsn, dsn_env, dsn_file",
        ),
        (
            config_with(postgresql="{dsn: 'host=db', min_size: 3, max_size: 2}"),
            "cache.index.postgresql: min_size, max_size",
        ),
        (config_with(storage_extra="local_max_size: lots"), "cache.storage: local_max_size:"),
        (
            config_with(postgresql="{dsn: 'host=db', query_timeout: .inf}"),
            "cache.index.postgresql.query_timeout: expected a finite number, got inf",
        ),
        (config_with(s3="", storage_extra="redirect: true"), "redirect: redirects go to"),
        ("cache: {storage: {disk: 1}}", "cache.storage.disk: unknown key"),
        ("cache: {index: {sqlite: 1}}", "cache.index.sqlite: unknown key"),
        ("cache: {storage: {s3: bucket}}", "cache.storage.s3: expected a mapping"),
        (
            config_with(s3="", postgresql=""),
            "cluster: the nodes of a cluster share cache.storage.s3 (the blobs) and "
            "cache.index.postgresql (the index): add cache.storage.s3 and "
            "cache.index.postgresql",
        ),
        (config_with(s3=""), "add cache.storage.s3"),
        (config_with(postgresql=""), "add cache.index.postgresql"),
        (
            config_with(cluster=""),
            "cache.storage.s3 and cache.index.postgresql are for a cluster: "
            "add a cluster section (node, listen, advertise)",
        ),
        (config_with(cluster="", s3=""), "are for a cluster"),
        (config_with(cluster="", postgresql=""), "are for a cluster"),
    ],
)
def test_refusals_name_the_key(text, message):
    assert message in refused(text)


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ({"advertise": None}, "cluster.advertise: required key is missing"),
        ({"node": "node 1"}, "cluster: node: expected 1 to 63 letters, digits"),
        ({"node": "n" * 64}, "cluster: node: expected 1 to 63"),
        ({"advertise": "10.0.0.5:5002"}, "cluster: advertise: expected the URL other nodes"),
        ({"advertise": "ftp://a"}, "advertise: expected the URL"),
        ({"advertise": "http://a/v2/"}, "advertise: expected the URL"),
        ({"advertise": "http://u:p@a"}, "advertise: expected the URL"),
        ({"advertise": "http://a:port"}, "advertise: expected the URL"),
        ({"advertise": "http://0.0.0.0:1"}, "advertise: 0.0.0.0 is no address to reach"),
        ({"listen": "bogus:1"}, "cluster: listen: 'bogus:1' is not an endpoint"),
        ({"listen": "tcp:port"}, "cluster: listen: 'tcp:port' is not an endpoint"),
        ({"listen": "tcp:5000"}, "cluster.listen: proxy.listen is the same endpoint"),
        (
            {"heartbeat": 5, "node_timeout": 5},
            "cluster: node_timeout: expected more seconds than heartbeat (5), got 5",
        ),
        ({"heartbeat": 0}, "cluster: heartbeat: expected a number > 0"),
        ({"peer_timeout": "soon"}, "cluster.peer_timeout: expected a number"),
        (
            {"secret": "a", "secret_file": "/etc/hostname"},
            "cluster: give only one of secret, secret_env, secret_file",
        ),
        ({"secret_env": "NO_SUCH_VAR"}, "cluster.secret_env: environment variable NO_SUCH"),
    ],
)
def test_cluster_refusals_name_the_key(keys, message):
    """*keys* change (None: drop) those of a valid cluster section."""
    given = {"node": "n1", "listen": "tcp:5002", "advertise": "http://10.0.0.5:5002", **keys}
    section = {k: v for k, v in given.items() if v is not None}
    text = config_with(cluster=yaml.safe_dump(section, default_flow_style=True, width=1000))
    assert message in refused(text)


def test_the_example_config_documents_every_cluster_key():
    text = (ROOT / "etc" / "regproxy.yaml").read_text()
    documented = set(re.findall(r"^[\s#]*([a-z_0-9]+):", text, re.MULTILINE))
    for cls in (StorageConfig, IndexConfig, S3Settings, PgSettings, ClusterConfig):
        for field in attrs.fields(cls):
            assert field.name in documented, f"{cls.__name__}.{field.name}"
    assert {"secret_key_env", "secret_key_file", "dsn_env", "dsn_file"} <= documented
    assert {"secret_env", "secret_file", "cluster", "storage", "index"} <= documented
