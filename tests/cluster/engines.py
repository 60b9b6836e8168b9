"""Real engines for the cluster tests: Swift with s3api, PostgreSQL 15, haproxy.

Synchronous on purpose, like ``tests/integration/harness.py`` (whose helpers
it uses): each class starts real processes on free 127.0.0.1 ports in a
directory of its own, waits until they answer, and stops them.  Every child
gets SIGTERM if the test process dies (``PR_SET_PDEATHSIG``), so a killed
pytest leaves no engine behind.  ``conftest.py`` owns their lifetimes.

Facts these rely on are in the scale-out notes (``SCALEOUT.md``): Swift 2.30
reads its hash prefix and storage policies from the packaged
``/etc/swift/swift.conf``; PostgreSQL refuses to run as root.
"""

from __future__ import annotations

import ctypes
import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import psycopg
from integration.harness import _terminate, free_port, tail, wait_until
from psycopg import sql

#: the Debian 12 packages each engine needs (what ``.ci/run`` installs)
SWIFT_PACKAGES = "swift-proxy swift-account swift-container swift-object python3-swift memcached"
POSTGRES_PACKAGES = "postgresql"
HAPROXY_PACKAGES = "haproxy"
#: Debian's system Python, the one python3-swift is installed for
SYSTEM_PYTHON = "/usr/bin/python3"
POSTGRES_BIN = Path("/usr/lib/postgresql/15/bin")


def missing(names: Sequence[str], packages: str) -> str | None:
    """Why an engine cannot run here (a sentence saying what to install), or None."""
    absent = [name for name in names if not (shutil.which(name) or Path(name).exists())]
    if not absent:
        return None
    return (
        f"{', '.join(absent)} not installed: apt-get install -y --no-install-recommends {packages}"
    )


def swift_missing() -> str | None:
    reason = missing(
        [
            "swift-proxy-server",
            "swift-account-server",
            "swift-container-server",
            "swift-object-server",
            "memcached",
            "/etc/swift/swift.conf",
        ],
        SWIFT_PACKAGES,
    )
    if (
        reason is None
        and subprocess.run(
            [SYSTEM_PYTHON, "-c", "import swift.common.ring"], capture_output=True
        ).returncode
    ):
        reason = f"python3-swift is not importable: apt-get install -y {SWIFT_PACKAGES}"
    return reason


def postgres_missing() -> str | None:
    reason = missing([str(POSTGRES_BIN / "initdb"), str(POSTGRES_BIN / "postgres")], "postgresql")
    if reason is None and os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            reason = "running as root and there is no postgres user to run PostgreSQL as"
    return reason


def haproxy_missing() -> str | None:
    return missing(["haproxy"], HAPROXY_PACKAGES)


_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """preexec_fn: SIGTERM this child when the test process goes away."""
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _as_user(user: str | None) -> dict[str, Any]:
    """Popen's arguments that run a child as *user* (uid, gid, no other groups)."""
    if user is None:
        return {}
    return {"user": user, "group": pwd.getpwnam(user).pw_gid, "extra_groups": []}


def _spawn(
    args: Sequence[str], log_path: Path, user: str | None = None, **kwargs: Any
) -> subprocess.Popen[bytes]:
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            # after the change of user: that clears the parent-death signal
            preexec_fn=_die_with_parent,
            **_as_user(user),
            **kwargs,
        )


def _children(parent: int) -> list[int]:
    """The processes whose parent is *parent*."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(") ", 1)[1].split()[1]) == parent:
                        found.append(int(entry))
            except (OSError, IndexError, ValueError):
                continue
    return found


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _wait_for_port(
    port: int, procs: dict[str, subprocess.Popen[bytes]], logs: dict[str, Path], what: str
) -> None:
    """Wait until *port* accepts, failing at once (with the logs) if a process died."""

    def check() -> bool:
        for name, proc in procs.items():
            if proc.poll() is not None:
                raise RuntimeError(
                    f"{name} exited with {proc.returncode} while starting {what}:\n"
                    + tail(logs[name])
                )
        return _accepts(port)

    wait_until(check, 30, what)


@dataclass(frozen=True)
class S3Endpoint:
    """Where an S3-compatible service answers, and the credentials it takes."""

    url: str
    access_key: str
    secret_key: str
    region: str = "us-east-1"
    #: the CA bundle to trust for an https url
    ca_file: str | None = None


# --------------------------------------------------------------------------
# OpenStack Swift 2.30 with s3api
# --------------------------------------------------------------------------

_SWIFT_COMMON = """\
[DEFAULT]
bind_ip = 127.0.0.1
bind_port = {port}
workers = 0
mount_check = false
devices = {devices}
swift_dir = {swift_dir}
user = {user}
log_name = {name}
log_level = {log_level}
"""

_SWIFT_BACKEND = """\
recon_cache_path = {swift_dir}

[pipeline:main]
pipeline = {name}-server

[app:{name}-server]
use = egg:swift#{name}
"""

_SWIFT_PROXY = """\

[pipeline:main]
pipeline = {pipeline}

[app:proxy-server]
use = egg:swift#proxy
account_autocreate = true

[filter:tempauth]
use = egg:swift#tempauth
user_test_tester = {secret_key} .admin

[filter:s3api]
use = egg:swift#s3api
location = us-east-1

[filter:cache]
use = egg:swift#memcache
memcache_servers = 127.0.0.1:{memcached_port}

[filter:catch_errors]
use = egg:swift#catch_errors

[filter:gatekeeper]
use = egg:swift#gatekeeper

[filter:healthcheck]
use = egg:swift#healthcheck

[filter:proxy-logging]
use = egg:swift#proxy_logging

[filter:listing_formats]
use = egg:swift#listing_formats

[filter:copy]
use = egg:swift#copy

[filter:slo]
use = egg:swift#slo

[filter:dlo]
use = egg:swift#dlo
"""

_SWIFT_PIPELINE = (
    "catch_errors gatekeeper healthcheck proxy-logging cache listing_formats"
    " s3api tempauth copy slo dlo proxy-logging proxy-server"
)

# swift-ring-builder's own RingBuilder in one process: the CLI's nine runs
# (create, add, rebalance for three rings) take ~6 s, this ~0.6 s.
_BUILD_RINGS = """\
import sys
from swift.common.ring import RingBuilder
swift_dir = sys.argv[1]
for arg in sys.argv[2:]:
    name, port = arg.split("=")
    builder = RingBuilder(8, 1, 1)
    builder.add_dev({"region": 1, "zone": 1, "ip": "127.0.0.1", "port": int(port),
                     "device": "d1", "weight": 100})
    builder.rebalance()
    builder.get_ring().save(f"{swift_dir}/{name}.ring.gz")
"""

# Python imports usercustomize at start-up, from PYTHONPATH too.  eventlet
# 0.33's monkey_patch runs gc.collect() before greening each RLock that
# exists (17 in a Swift server: 0.7 s of CPU, 4 servers at once); the
# collection does nothing for correctness (it looks up the referrers of a
# live lock), so it is skipped while existing locks are greened.
_SKIP_GC_IN_MONKEY_PATCH = """\
import gc

import eventlet.patcher

_green_existing_locks = eventlet.patcher._green_existing_locks


def _without_collections():
    collect = gc.collect
    gc.collect = lambda generation=2: 0
    try:
        return _green_existing_locks()
    finally:
        gc.collect = collect


eventlet.patcher._green_existing_locks = _without_collections
"""


class Swift:
    """A one-replica Swift (proxy with s3api + account + container + object
    servers) and the memcached its proxy uses, all on free loopback ports.

    ``endpoint`` is the S3 endpoint and tempauth's ``test:tester`` account.
    """

    SERVERS = ("account", "container", "object")

    def __init__(self, workdir: Path, log_level: str = "WARNING") -> None:
        self.workdir = workdir
        self.swift_dir = workdir / "etc"
        self.devices = workdir / "srv"
        self.log_level = log_level
        self.ports = {name: free_port() for name in (*self.SERVERS, "proxy", "memcached")}
        self.endpoint = S3Endpoint(
            url=f"http://127.0.0.1:{self.ports['proxy']}",
            access_key="test:tester",
            secret_key="testing",
        )
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.logs = {name: workdir / f"{name}.log" for name in self.ports}

    def start(self) -> None:
        self.swift_dir.mkdir(parents=True, exist_ok=True)
        (self.devices / "d1").mkdir(parents=True, exist_ok=True)
        user = pwd.getpwuid(os.geteuid()).pw_name
        # The rings name the servers' ports, known already: build them while
        # memcached and the account, container and object servers start; the
        # proxy reads them when it starts.
        rings = _spawn(
            [
                SYSTEM_PYTHON,
                "-c",
                _BUILD_RINGS,
                str(self.swift_dir),
                *(f"{name}={self.ports[name]}" for name in self.SERVERS),
            ],
            self.workdir / "rings.log",
        )
        memcached = ["memcached", "-l", "127.0.0.1", "-p", str(self.ports["memcached"])]
        self.procs["memcached"] = _spawn(
            [*memcached, "-U", "0", "-m", "16", "-u", user], self.logs["memcached"]
        )
        for name in self.SERVERS:
            self._start_server(name, user)
        if rings.wait(30):
            raise RuntimeError(
                "building the Swift rings failed:\n" + tail(self.workdir / "rings.log")
            )
        self._start_server("proxy", user)
        for name in self.ports:
            _wait_for_port(self.ports[name], self.procs, self.logs, f"swift {name}")

    def _start_server(self, name: str, user: str, kind: str | None = None, extra: str = "") -> None:
        """Start server *name*, a *kind* server (account, container, object,
        proxy; *name* itself by default), *extra* added to its [DEFAULT]."""
        kind = kind or name
        common = _SWIFT_COMMON.format(
            port=self.ports[name],
            devices=self.devices,
            swift_dir=self.swift_dir,
            user=user,
            name=name,
            log_level=self.log_level,
        )
        if kind == "proxy":
            rest = _SWIFT_PROXY.format(
                pipeline=_SWIFT_PIPELINE,
                secret_key=self.endpoint.secret_key,
                memcached_port=self.ports["memcached"],
            )
        else:
            rest = _SWIFT_BACKEND.format(swift_dir=self.swift_dir, name=kind)
        conf = self.swift_dir / f"{name}-server.conf"
        conf.write_text(common + extra + rest)
        # -v: logs on stderr (into our log file) as well as to syslog.
        self.procs[name] = _spawn(
            [f"swift-{kind}-server", str(conf), "-v"], self.logs[name], env=self._server_env()
        )

    def add_proxy(self, tls_pem: Path | None = None) -> S3Endpoint:
        """One more proxy server over the same rings and devices (Swift's own
        scale-out shape): https with *tls_pem* (key and certificate) if given.
        Its endpoint, with the same credentials."""
        name = f"proxy{sum(1 for n in self.procs if n.startswith('proxy')) + 1}"
        self.ports[name] = free_port()
        self.logs[name] = self.workdir / f"{name}.log"
        extra = f"cert_file = {tls_pem}\nkey_file = {tls_pem}\n" if tls_pem else ""
        self._start_server(name, pwd.getpwuid(os.geteuid()).pw_name, "proxy", extra)
        _wait_for_port(self.ports[name], self.procs, self.logs, f"swift {name}")
        scheme = "https" if tls_pem else "http"
        return replace(self.endpoint, url=f"{scheme}://127.0.0.1:{self.ports[name]}")

    def _server_env(self) -> dict[str, str]:
        """Two things that take three quarters of a server's start-up CPU and
        do nothing for a test: importing dnspython (we resolve 127.0.0.1
        only) and eventlet 0.33's gc.collect() per lock in monkey_patch."""
        hooks = self.workdir / "pyhooks"
        hooks.mkdir(exist_ok=True)
        (hooks / "usercustomize.py").write_text(_SKIP_GC_IN_MONKEY_PATCH)
        path = os.pathsep.join(filter(None, [str(hooks), os.environ.get("PYTHONPATH")]))
        return {**os.environ, "EVENTLET_NO_GREENDNS": "yes", "PYTHONPATH": path}

    def stop(self) -> None:
        for proc in self.procs.values():
            _terminate(proc)
        self.procs.clear()

    def log_tails(self) -> str:
        return "\n".join(f"--- {name}\n{tail(path)}" for name, path in self.logs.items())


# --------------------------------------------------------------------------
# PostgreSQL 15
# --------------------------------------------------------------------------


class Postgres:
    """A throw-away PostgreSQL 15 cluster on a free loopback port, trust auth.

    Run as the ``postgres`` user when we are root (initdb and postgres refuse
    root), as ourselves otherwise; its data directory is *workdir*, owned by
    that user.  Durability is off (``fsync``), which is what tests want.
    """

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.data = workdir / "data"
        self.port = free_port()
        self.user = "postgres" if os.geteuid() == 0 else None
        self.log_path = workdir / "postgres.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._databases = 0

    def dsn(self, dbname: str = "postgres") -> str:
        return f"host=127.0.0.1 port={self.port} user=postgres dbname={dbname} connect_timeout=5"

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.user:
            entry = pwd.getpwnam(self.user)
            os.chown(self.workdir, entry.pw_uid, entry.pw_gid)
        self.log_path.touch()
        if self.user:
            shutil.chown(self.log_path, self.user)
        result = subprocess.run(
            [
                str(POSTGRES_BIN / "initdb"),
                "-D",
                str(self.data),
                "-U",
                "postgres",
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
            ],
            capture_output=True,
            cwd=self.workdir,
            **_as_user(self.user),
        )
        if result.returncode:
            raise RuntimeError(f"initdb failed:\n{result.stdout!r}\n{result.stderr!r}")
        self.proc = _spawn(
            [
                str(POSTGRES_BIN / "postgres"),
                "-D",
                str(self.data),
                "-p",
                str(self.port),
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                f"unix_socket_directories={self.workdir}",
                "-c",
                "fsync=off",
                "-c",
                "synchronous_commit=off",
                "-c",
                "full_page_writes=off",
            ],
            self.log_path,
            user=self.user,
            cwd=self.workdir,
        )
        wait_until(self._ready, 30, "postgres to accept connections")

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(
                f"postgres exited with {self.proc.returncode}:\n{tail(self.log_path)}"
            )
        try:
            psycopg.connect(self.dsn(), connect_timeout=1).close()
        except psycopg.OperationalError:
            return False
        return True

    def create_database(self, prefix: str = "test") -> str:
        """A new empty database; its DSN."""
        self._databases += 1
        name = f"{prefix}_{self._databases}"
        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.dsn(name)

    def drop_database(self, dsn: str) -> None:
        name = psycopg.conninfo.conninfo_to_dict(dsn)["dbname"]
        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )

    @contextmanager
    def frozen(self) -> Iterator[None]:
        """Every process of the server stopped (SIGSTOP), as a server stuck
        on its storage: its kernel keeps the connections, nothing answers."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)  # first: it forks no more
        stopped = [self.proc.pid, *_children(self.proc.pid)]
        try:
            for pid in stopped[1:]:
                with suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGSTOP)
            yield
        finally:
            for pid in stopped:
                with suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)

    def stop(self) -> None:
        if self.proc is not None:
            # SIGINT is PostgreSQL's fast shutdown: clients are disconnected.
            _terminate(self.proc, signal.SIGINT)
            self.proc = None


# --------------------------------------------------------------------------
# haproxy 2.6
# --------------------------------------------------------------------------

_HAPROXY_CONFIG = """\
global
    stats socket {stats} mode 600 level admin
    hard-stop-after 5s

defaults
    mode http
    timeout connect 2s
    timeout client 60s
    timeout server 60s
    timeout check 2s
    option redispatch
    retries 1

frontend front
    bind 127.0.0.1:{port}
    default_backend nodes

backend nodes
    balance roundrobin
    option httpchk GET /v2/
    http-check expect status 200
    default-server check inter {check_interval_ms} fall 2 rise 1
{servers}
"""


class HAProxy:
    """haproxy in master-worker mode in front of *backends* (``host:port``),
    round robin, HTTP health checks on ``GET /v2/``.

    ``reload(backends)`` rewrites the configuration and reloads it the way an
    operator adds a node: the master starts a new worker, the old one
    finishes its connections; it returns when the new worker is serving.
    """

    def __init__(self, workdir: Path, check_interval_ms: int = 500) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config_path = workdir / "haproxy.cfg"
        self.stats_path = workdir / "stats.sock"
        self.log_path = workdir / "haproxy.log"
        self.check_interval_ms = check_interval_ms
        self.backends: list[str] = []
        self.proc: subprocess.Popen[bytes] | None = None

    def _write(self, backends: Sequence[str]) -> None:
        self.backends = list(backends)
        servers = "\n".join(
            f"    server node{i} {address}" for i, address in enumerate(self.backends, 1)
        )
        self.config_path.write_text(
            _HAPROXY_CONFIG.format(
                stats=self.stats_path,
                port=self.port,
                check_interval_ms=self.check_interval_ms,
                servers=servers,
            )
        )
        result = subprocess.run(
            ["haproxy", "-c", "-q", "-f", str(self.config_path)], capture_output=True, text=True
        )
        if result.returncode:
            raise RuntimeError(f"haproxy rejects {self.config_path}:\n{result.stderr}")

    def command(self, line: str) -> str:
        """One command on the worker's stats socket (``show stat``, ``show info``...)."""
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(5)
            s.connect(str(self.stats_path))
            s.sendall(line.encode() + b"\n")
            chunks = []
            while chunk := s.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode()

    def worker_pid(self) -> int | None:
        try:
            info = self.command("show info")
        except OSError:
            return None
        for line in info.splitlines():
            if line.startswith("Pid:"):
                return int(line.split(":", 1)[1])
        return None

    def server_stats(self) -> dict[str, dict[str, str]]:
        """``{"node1": {"status": "UP", "stot": "12", ...}, ...}``: each
        server's row of ``show stat`` (the counters start again at a reload)."""
        rows = self.command("show stat").splitlines()
        header = rows[0].lstrip("# ").split(",")
        stats = {}
        for row in rows[1:]:
            fields = dict(zip(header, row.split(","), strict=False))
            if fields.get("pxname") == "nodes" and fields.get("svname", "").startswith("node"):
                stats[fields["svname"]] = fields
        return stats

    def server_states(self) -> dict[str, str]:
        """``{"node1": "UP", ...}`` as the health checks see them."""
        return {name: fields["status"] for name, fields in self.server_stats().items()}

    def start(self, backends: Sequence[str]) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._write(backends)
        self.proc = _spawn(["haproxy", "-W", "-db", "-f", str(self.config_path)], self.log_path)
        self._wait_for_worker(None)
        _wait_for_port(self.port, {"haproxy": self.proc}, {"haproxy": self.log_path}, "haproxy")

    def reload(self, backends: Sequence[str]) -> None:
        assert self.proc is not None
        old = self.worker_pid()
        self._write(backends)
        self.proc.send_signal(signal.SIGUSR2)
        self._wait_for_worker(old)

    def _wait_for_worker(self, old: int | None) -> None:
        assert self.proc is not None
        proc = self.proc

        def check() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"haproxy exited with {proc.returncode}:\n{tail(self.log_path)}")
            pid = self.worker_pid()
            return pid is not None and pid != old

        wait_until(check, 10, "a new haproxy worker")

    def stop(self) -> None:
        if self.proc is not None:
            _terminate(self.proc, signal.SIGUSR1)  # soft stop: master and workers
            self.proc = None


def timed(what: str, start: Callable[[], None], times: dict[str, float]) -> None:
    """Run *start*, noting how long it took in *times* (reported at the end)."""
    began = time.monotonic()
    start()
    times[what] = time.monotonic() - began
