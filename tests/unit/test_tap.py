"""Start-up: the twistd plugin, embedded defaults, and one clear line for every bad config."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.testing import MemoryReactorClock
from twisted.scripts.twistd import ServerOptions

from registryproxy.cache.index import Index
from registryproxy.config import Config, ConfigError, load_config, parse_config
from registryproxy.tap import Options, makeService

ROOT = Path(__file__).parent.parent.parent
TWISTD = str(Path(sys.executable).parent / "twistd")


def twistd(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [TWISTD, "-n", "--pidfile=", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_example_config_documents_the_defaults():
    assert load_config(str(ROOT / "etc" / "regproxy.yaml")) == Config()


def test_defaults_mirror_docker_hub():
    config = Config()
    assert config.proxy.listen == "tcp:5000"
    assert config.upstreams["docker.io"].url == "https://registry-1.docker.io"
    assert config.default_upstream == "docker.io"
    assert config.cache.tag_ttl == 3600


def test_an_upstream_can_point_at_a_local_registry():
    config = parse_config(
        "upstreams:\n  docker.io:\n    url: http://127.0.0.1:5001\n"
        "    username: u\n    password: s3cr3t\ncache: {tag_ttl: 60}\n"
    )
    hub = config.upstreams["docker.io"]
    assert (hub.url, hub.username, hub.password) == ("http://127.0.0.1:5001", "u", "s3cr3t")
    assert config.cache.tag_ttl == 60
    assert "s3cr3t" not in repr(hub)


@pytest.mark.parametrize(
    "text, message",
    [
        ("cache: {tag_ttl: soon}", "cache.tag_ttl: expected a number"),
        ("cache: {tag_ttl: -1}", "cache.tag_ttl: expected a number >= 0"),
        # no deadline that never comes, no number every comparison calls false
        ("upstreams: {docker.io: {read_timeout: .inf}}", "read_timeout: expected a finite number"),
        ("cache: {tag_ttl: .nan}", "cache.tag_ttl: expected a finite number, got nan"),
        ("cache: {size: 1}", "cache.size: unknown key"),
        ("proxy: {listen: 5000}", "proxy.listen: expected a string"),
        ("upstreams: {docker.io: {url: 'ftp://x'}}", "upstreams.docker.io: url"),
        ("upstreams: {my.registry: {}}", "upstreams.my.registry.url: required key is missing"),
        ("upstreams: {ghcr.io: {fallbacks: [x.io]}}", "fallbacks: 'x.io' is not another"),
        ("upstreams: {ghcr.io: {aliases: ['a b']}}", "aliases: 'a b' is not a host name"),
        (
            "upstreams: {ghcr.io: {username: u, password_env: NO_SUCH_VAR}}",
            "NO_SUCH_VAR is not set",
        ),
        ("upstreams: {docker.io: {url: 'http://x', username: u}}", "username and a password"),
        ("upstreams: {'a/../b': {url: 'http://x'}}", "is not a registry host name"),
        ("default_upstream: my.registry", "default_upstream: 'my.registry' is not one of"),
        ("cache: {}\ncache: {}", "key 'cache' is given twice"),
        ("proxy: [", "not valid YAML at line 1"),
        ("upstreams: {x.io: {url: 'https://u:p@x.io'}}", "not in the URL"),
        ("admin: {listen: 'tcp:5001'}", "the admin API needs a token"),
        ("admin: {listen: 'tcp:5001:interface=0.0.0.0'}", "needs a token"),
        ("admin: {token: a, token_file: /etc/hostname}", "token or token_file, not both"),
        ("cache: {low_water: 0}", "low_water"),
        ("cache: {pinned: ['UPPER:1']}", "pinned: image"),
        ("- 1", "config: expected a mapping"),
    ],
)
def test_config_errors_name_the_key(text, message):
    with pytest.raises(ConfigError) as e:
        parse_config(text, source="f.yaml")
    assert str(e.value).startswith("f.yaml: ")
    assert message in str(e.value)


def test_the_first_unknown_key_as_written_is_named():
    with pytest.raises(ConfigError) as e:
        parse_config("cache: {zz: 2, size: 1, tag_ttl: soon}")
    assert str(e.value).startswith("<config>: cache.zz: unknown key (known here: directory, ")


def test_twistd_lists_the_plugin():
    # what ``twistd --help`` lists; test_busy_port... runs the real twistd
    assert "regproxy" in [command[0] for command in ServerOptions().subCommands]


@pytest.fixture(scope="module")
def started_as_twistd(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """What a fresh interpreter holds once ``makeService`` ran as twistd runs
    it (on the global reactor): one interpreter for the tests below."""
    tmp_path = tmp_path_factory.mktemp("twistd")
    (tmp_path / "regproxy.yaml").write_text(f"cache: {{directory: {str(tmp_path)!r}}}\n")
    script = (
        "import gc, json, sys\n"
        "from registryproxy.tap import Options, makeService\n"
        "options = Options()\n"
        "options.parseOptions(['--config', sys.argv[1]])\n"
        "makeService(options)\n"
        "from twisted.internet import reactor\n"
        "before = reactor._eventTriggers['shutdown'].before\n"
        "print(json.dumps({'modules': sorted(sys.modules), 'frozen': gc.get_freeze_count(),"
        " 'tracked': len(gc.get_objects()),"
        " 'before_shutdown': [getattr(f, '__qualname__', repr(f)) for f, _, _ in before]}))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "regproxy.yaml")],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def test_twistds_stop_is_watched(started_as_twistd: dict[str, Any]) -> None:
    """The watchdog is armed as the reactor begins to shut down (see
    test_stopping.py for what it does then)."""
    assert "Watchdog.arm" in started_as_twistd["before_shutdown"]


def test_a_single_node_does_not_import_the_cluster_engines(started_as_twistd):
    # boto3 and psycopg cost every twistd start about 0.4 s (engineconfig.py)
    modules = started_as_twistd["modules"]
    assert "registryproxy.tap" in modules
    assert [m for m in ("boto3", "botocore", "psycopg") if m in modules] == []


def test_twistds_start_up_heap_is_frozen(started_as_twistd):
    # a full collection would walk it every time, the reactor stopped (bench/gcpause.py)
    frozen, tracked = started_as_twistd["frozen"], started_as_twistd["tracked"]
    assert frozen > 20 * max(tracked, 1), (frozen, tracked)


def start_up(*args: str) -> str:
    """What ``twistd -n regproxy ARGS`` would exit with, run in this process:
    the same Options, makeService and port binding, on a reactor that binds
    nothing and runs nothing.  A SystemExit whose code is a string makes
    Python print it (and no traceback) and exit with status 1."""
    with pytest.raises(SystemExit) as e:
        options = Options()
        options.parseOptions(list(args))
        makeService(options, MemoryReactorClock()).privilegedStartService()
    message = e.value.code
    assert isinstance(message, str) and message.startswith("regproxy: "), message
    assert "\n" not in message, message  # one line
    return message


@pytest.mark.parametrize(
    "config, message",
    [
        ("cache: {tag_ttl: soon}\n", "cache.tag_ttl: expected a number, got str 'soon'"),
        (None, "cannot read config file"),
        ("proxy: {listen: 'bogus:1'}\n", "proxy.listen 'bogus:1' is not an endpoint"),
        ("cache: {directory: /proc/none}\n", "cannot use cache.directory '/proc/none'"),
        (
            "proxy: {listen: 'ssl:0:privateKey=/proc/none.pem'}\n",
            "proxy: listen: cannot read privateKey '/proc/none.pem': No such file or directory",
        ),
    ],
)
def test_bad_start_up_is_one_line_and_non_zero(tmp_path, monkeypatch, config, message):
    monkeypatch.chdir(tmp_path)  # the default cache directory is ./regproxy-cache
    path = tmp_path / "regproxy.yaml"
    if config is not None:
        path.write_text(config)
    assert message in start_up("--config", str(path))


def test_busy_port_is_one_line_and_non_zero(tmp_path):
    """The real twistd: its exit status and its output, for a bad start-up."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        (tmp_path / "c.yaml").write_text(f"proxy: {{listen: 'tcp:{port}:interface=127.0.0.1'}}\n")
        result = twistd("regproxy", "--config", str(tmp_path / "c.yaml"), cwd=tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "cannot listen on proxy.listen" in output
    assert "Traceback" not in output


def test_runs_on_embedded_defaults(tmp_path):
    """No --config: port 5000 (if free here), cache under ./regproxy-cache."""
    with socket.socket() as probe:
        if probe.connect_ex(("127.0.0.1", 5000)) == 0:
            pytest.skip("something else listens on port 5000")
    process = subprocess.Popen(
        [TWISTD, "-n", "--pidfile=", "regproxy"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        import time
        import urllib.request

        def answers() -> bool:
            try:
                with urllib.request.urlopen("http://127.0.0.1:5000/v2/", timeout=2) as reply:
                    assert reply.status == 200
                    assert reply.headers["Docker-Distribution-API-Version"] == "registry/2.0"
                    return True
            except OSError:
                return False

        for _ in range(100):
            if process.poll() is not None:
                break
            # it makes its index before it listens
            if (tmp_path / "regproxy-cache" / "index.db").exists() and answers():
                break
            time.sleep(0.1)
        else:
            raise AssertionError("regproxy did not answer on port 5000")
    finally:
        process.terminate()
        output = process.communicate(timeout=30)[0]
    if "cannot listen on proxy.listen" in output:  # the answer was another test run's
        pytest.skip("another test run took port 5000 meanwhile")
    assert process.returncode == -signal.SIGTERM, output  # it ran until told to stop
    assert os.listdir(tmp_path / "regproxy-cache" / "tmp") == []


def test_admin_token_sources(tmp_path, monkeypatch):
    monkeypatch.delenv("REGPROXY_ADMIN_TOKEN", raising=False)
    assert parse_config("").admin.secret() is None
    assert parse_config("admin: {listen: 'tcp:1', token: t0k}").admin.secret() == "t0k"
    (tmp_path / "token").write_text("from-file\n")
    config = parse_config(f"admin: {{listen: 'tcp:1', token_file: {str(tmp_path / 'token')!r}}}")
    assert config.admin.secret() == "from-file"
    monkeypatch.setenv("REGPROXY_ADMIN_TOKEN", "from-env")
    config = parse_config("admin: {listen: 'tcp:1:interface=0.0.0.0'}")
    assert config.admin.secret() == "from-env"
    assert "t0k" not in repr(parse_config("admin: {token: t0k}"))


@pytest.mark.parametrize(
    "damage",
    [
        lambda db: db.write_bytes(b"not a database at all" * 100),
        # a real SQLite file with a page gone bad
        lambda db: db.write_bytes(db.read_bytes()[:4096] + b"\xa5" * 8192),
    ],
)
def test_corrupt_index_is_one_line_naming_the_way_out(tmp_path, damage):
    cache = tmp_path / "cache"
    Index(str(cache / "index.db")).close()
    damage(cache / "index.db")
    (tmp_path / "c.yaml").write_text(
        f"proxy: {{listen: 'tcp:0:interface=127.0.0.1'}}\n"
        f"admin: {{listen: 'tcp:0:interface=127.0.0.1'}}\n"
        f"cache: {{directory: {str(cache)!r}}}\n"
    )
    output = start_up("--config", str(tmp_path / "c.yaml"))
    assert "index.db" in output and "--rebuild-index" in output, output


def test_a_full_disk_at_opening_is_not_called_damage(tmp_path, monkeypatch):
    """Bringing an old schema up to date is the biggest write at opening:
    a full disk then must not send the operator to --rebuild-index, which
    would throw a sound index away (nor does --rebuild-index do so)."""
    import sqlite3

    cache = tmp_path / "cache"
    Index(str(cache / "index.db")).close()
    before = (cache / "index.db").read_bytes()

    def full(self, path):
        error = sqlite3.OperationalError("database or disk is full")
        error.sqlite_errorname = "SQLITE_FULL"
        raise error

    monkeypatch.setattr(Index, "_open", full)
    (tmp_path / "c.yaml").write_text(
        f"proxy: {{listen: 'tcp:0:interface=127.0.0.1'}}\n"
        f"admin: {{listen: 'tcp:0:interface=127.0.0.1'}}\n"
        f"cache: {{directory: {str(cache)!r}}}\n"
    )
    for rebuild in ([], ["--rebuild-index"]):
        output = start_up("--config", str(tmp_path / "c.yaml"), *rebuild)
        assert "disk is full" in output and "not damaged" in output, output
        assert "--rebuild-index" not in output, output
    assert sorted(p.name for p in cache.iterdir() if p.name.startswith("index.db")) == ["index.db"]
    assert (cache / "index.db").read_bytes() == before


@pytest_twisted.ensureDeferred
async def test_rebuild_index_from_the_blobs_on_disk(tmp_path, fake_registry, make_proxy):
    from proxyharness import until

    _, body = fake_registry.add_image("library/app", "1", [b"layer one", b"layer two"])
    cache = tmp_path / "cache"
    proxy = await make_proxy(fake_registry.url, cache_dir=cache)
    assert (await proxy.get("/v2/app/manifests/1")).code == 200
    for layer in json.loads(body)["layers"]:
        assert (await proxy.get(f"/v2/app/blobs/{layer['digest']}")).code == 200
    await proxy.stop()
    stored = sorted(p.name for p in (cache / "blobs").rglob("*") if p.is_file())
    (cache / "index.db").write_bytes(b"garbage" * 1000)
    (tmp_path / "c.yaml").write_text(
        "proxy: {listen: 'tcp:0:interface=127.0.0.1'}\n"
        "admin: {listen: 'tcp:0:interface=127.0.0.1'}\n"
        f"cache: {{directory: {str(cache)!r}}}\n"
        f"upstreams: {{docker.io: {{url: {fake_registry.url!r}}}}}\n"
    )
    options = Options()
    options.parseOptions(["--config", str(tmp_path / "c.yaml"), "--rebuild-index"])
    service = makeService(options, reactor)
    service.privilegedStartService()
    service.startService()
    try:
        index = Index(str(cache / "index.db"))
        await until(lambda: len(index.blob_sizes(f"sha256:{n}" for n in stored)) == len(stored))
        index.close()
    finally:
        await service.stopService()
    assert len(list(cache.glob("index.db.corrupt-*"))) == 1

    # who sent each blob is not on disk: the upstream sends each layer once
    # more (its manifest listing them proves nothing), then they are cached
    proxy = await make_proxy(fake_registry.url, cache_dir=cache)
    assert (await proxy.get("/v2/app/manifests/1")).code == 200
    before = fake_registry.count("GET", "/blobs/")
    for expected in ("MISS", "HIT"):
        for layer in json.loads(body)["layers"]:
            reply = await proxy.get(f"/v2/app/blobs/{layer['digest']}")
            assert (reply.code, reply.header("X-Cache")) == (200, expected)
    assert fake_registry.count("GET", "/blobs/") == before + 2
