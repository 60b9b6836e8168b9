"""Subprocesses the integration tests drive: docker-registry, regproxy, skopeo.

Synchronous on purpose: each helper starts a real process on a free
127.0.0.1 port, waits until it answers, and knows how to stop or kill it.
Fixtures in ``conftest.py`` own their lifetimes.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from . import regclient

#: every Go client gets these: loopback is never proxied, anything else dies
#: on a dead local port instead of leaving the machine.
GO_PROXY_ENV = {
    "HTTP_PROXY": "http://127.0.0.1:9",
    "HTTPS_PROXY": "http://127.0.0.1:9",
    "NO_PROXY": "127.0.0.1,localhost",
    "http_proxy": "http://127.0.0.1:9",
    "https_proxy": "http://127.0.0.1:9",
    "no_proxy": "127.0.0.1,localhost",
}


#: free_port's ports: below the kernel's ephemeral range (32768 on), where
#: bind(0) picks and every outgoing connection takes one, so that between
#: the pick and a daemon's bind no client takes it; a block per pytest
#: process, so that no other process picks it either (three processes
#: starting Swift's five servers at once did: a proxy then spoke to another
#: process's object server)
_PORTS_FROM = 20_000
_PORTS_PER_PROCESS = 2_500
_ports_taken = itertools.count()


def free_port() -> int:
    """A port of 127.0.0.1 that is free now, and not handed out before."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw")
    first = _PORTS_FROM + (int(worker) % 5 if worker.isdigit() else 0) * _PORTS_PER_PROCESS
    for _ in range(_PORTS_PER_PROCESS):
        port = first + next(_ports_taken) % _PORTS_PER_PROCESS
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {first}..{first + _PORTS_PER_PROCESS - 1}")


def tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as e:
        return f"<cannot read {path}: {e}>"
    return "\n".join(text.splitlines()[-lines:])


def _terminate(
    proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 10.0
) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def require_binary(name: str, apt_package: str) -> str:
    """The path of *name*, or an error that says how to install it."""
    found = shutil.which(name)
    if not found:
        raise RuntimeError(
            f"{name} is not installed: apt-get install -y --no-install-recommends {apt_package}"
        )
    return found


def wait_until(check: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


# --------------------------------------------------------------------------
# docker-registry (CNCF Distribution 2.8) with token auth
# --------------------------------------------------------------------------

_ACCESS_LINE = re.compile(
    r"^(?P<remote>\S+) \S+ (?P<user>\S+) \[(?P<time>[^\]]+)\] "
    r'"(?P<method>\S+) (?P<path>\S+) (?P<proto>[^"]+)" '
    r"(?P<status>\d{3}) (?P<size>\d+|-)"
)


@dataclass(frozen=True)
class AccessLogLine:
    method: str
    path: str
    status: int
    size: int
    raw: str

    @property
    def is_blob(self) -> bool:
        return "/blobs/" in self.path

    @property
    def is_manifest(self) -> bool:
        return "/manifests/" in self.path


class UpstreamRegistry:
    """``docker-registry serve CONFIG`` with filesystem storage and token auth.

    Its access log (stdout, Apache combined format) goes to ``access_log_path``;
    :meth:`mark` + :meth:`requests`/:meth:`count_requests` let a test count the
    requests made during one step.
    """

    binary = "docker-registry"

    def __init__(
        self,
        workdir: Path,
        token_realm: str,
        service: str,
        issuer: str,
        rootcert: Path,
        push_creds: tuple[str, str],
        read_creds: tuple[str, str],
        port: int | None = None,
    ) -> None:
        self.workdir = workdir
        self.port = port or free_port()
        self.push_creds = push_creds
        self.read_creds = read_creds
        self.storage_dir = workdir / "storage"
        self.storage_dir.mkdir(parents=True, exist_ok=True)
        self.access_log_path = workdir / "access.log"
        self.log_path = workdir / "registry.log"
        self.config_path = workdir / "config.yml"
        config = {
            "version": 0.1,
            "log": {"level": "info", "formatter": "text", "accesslog": {"disabled": False}},
            "storage": {
                "filesystem": {"rootdirectory": str(self.storage_dir)},
                "redirect": {"disable": True},
                "delete": {"enabled": True},
                "maintenance": {"uploadpurging": {"enabled": False}},
            },
            "http": {"addr": f"127.0.0.1:{self.port}", "secret": "regproxy-integration-tests"},
            "auth": {
                "token": {
                    "realm": token_realm,
                    "service": service,
                    "issuer": issuer,
                    "rootcertbundle": str(rootcert),
                }
            },
        }
        self.config_path.write_text(yaml.safe_dump(config))
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def host_port(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host_port}"

    def client(self, creds: tuple[str, str] | None = None) -> regclient.RegistryClient:
        """An HTTP client straight to the registry (anonymous unless *creds*)."""
        user, password = creds if creds else (None, None)
        return regclient.RegistryClient(self.url, user, password)

    def start(self, timeout: float = 20.0) -> None:
        assert self.proc is None or self.proc.poll() is not None, "registry already running"
        with open(self.access_log_path, "ab") as out, open(self.log_path, "ab") as err:
            self.proc = subprocess.Popen(
                [self.binary, "serve", str(self.config_path)],
                stdout=out,
                stderr=err,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **GO_PROXY_ENV},
                cwd=self.workdir,
            )

        def up() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"docker-registry exited with {self.proc.returncode}:\n{tail(self.log_path)}"
                )
            try:
                return regclient.request(self.url + "/v2/", timeout=2).status in (200, 401)
            except OSError:
                return False

        wait_until(up, timeout, f"docker-registry on {self.host_port}")

    def stop(self) -> None:
        if self.proc is not None:
            _terminate(self.proc)

    def kill(self) -> None:
        """SIGKILL, as in "the upstream died"; :meth:`start` brings it back."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # -- access log ----------------------------------------------------------
    def _size(self) -> int:
        try:
            return self.access_log_path.stat().st_size
        except FileNotFoundError:
            return 0

    def _settle(self, quiet: float) -> int:
        """Wait until the access log has not grown for *quiet* seconds (the
        registry logs a request once it has answered it); at most 5 s."""
        last = self._size()
        deadline = time.monotonic() + 5
        while quiet and time.monotonic() < deadline:
            time.sleep(quiet)
            size = self._size()
            if size == last:
                break
            last = size
        return last

    def mark(self, settle: float = 0.1) -> int:
        """The access log's end, once quiet: pass it as ``since`` later."""
        return self._settle(settle)

    def requests(self, since: int = 0, settle: float = 0.3) -> list[AccessLogLine]:
        """Access-log lines written after offset *since*, once the log has
        been quiet for *settle* seconds."""
        self._settle(settle)
        with open(self.access_log_path, "rb") as f:
            f.seek(since)
            data = f.read()
        out = []
        for raw in data.decode(errors="replace").splitlines():
            m = _ACCESS_LINE.match(raw)
            if m:
                size = 0 if m["size"] == "-" else int(m["size"])
                out.append(AccessLogLine(m["method"], m["path"], int(m["status"]), size, raw))
        return out

    def count_requests(
        self,
        method: str,
        path_substring: str = "",
        since: int = 0,
        statuses: Sequence[int] | None = None,
    ) -> int:
        return sum(
            1
            for line in self.requests(since)
            if line.method == method
            and path_substring in line.path
            and (statuses is None or line.status in statuses)
        )


# --------------------------------------------------------------------------
# regproxy under twistd
# --------------------------------------------------------------------------


def twistd_path() -> str:
    beside = Path(sys.executable).parent / "twistd"
    if beside.exists():
        return str(beside)
    found = shutil.which("twistd")
    if not found:
        raise RuntimeError("twistd not found: pip install . (regproxy and Twisted) into this venv")
    return found


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = (
            deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
        )
    return out


class RegProxy:
    """``twistd -n --pidfile= regproxy --config FILE`` on a free port."""

    #: twistd's own options, before ``regproxy`` (a benchmark's ``--profile``)
    twistd_options: list[str] = []

    def __init__(self, workdir: Path, config: dict[str, Any], port: int | None = None) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.admin_port = free_port()
        config = deep_merge(
            {
                "proxy": {"listen": f"tcp:{self.port}:interface=127.0.0.1"},
                "admin": {"listen": f"tcp:{self.admin_port}:interface=127.0.0.1"},
                "cache": {"directory": str(workdir / "cache"), "tag_ttl": 3600},
            },
            config,
        )
        self.config = config
        #: an ssl: listen (its port given there): clients need its CA
        self.tls = config["proxy"]["listen"].startswith("ssl:")
        if self.tls:
            self.port = int(config["proxy"]["listen"].split(":")[1])
        self.cache_dir = Path(config["cache"]["directory"])
        self.config_path = workdir / "regproxy.yaml"
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        self.log_path = workdir / "regproxy.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def host_port(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host_port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def start(self, timeout: float = 30.0) -> None:
        assert self.proc is None or self.proc.poll() is not None, "regproxy already running"
        argv = [twistd_path(), "-n", "--pidfile=", *self.twistd_options]
        argv += ["regproxy", "--config", str(self.config_path)]
        with open(self.log_path, "ab") as log:
            log.write(f"=== {' '.join(argv)}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.workdir,
            )

        def up() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"regproxy exited with {self.proc.returncode} before answering GET /v2/ "
                    f"(is it installed in this venv? `pip install .`):\n{tail(self.log_path)}"
                )
            try:
                if self.tls:  # without the CA or a client certificate: is it listening
                    socket.create_connection(("127.0.0.1", self.port), timeout=2).close()
                    return True
                # 401: it answers, and wants a login (proxy.auth)
                return regclient.request(self.url + "/v2/", timeout=2).status in (200, 401)
            except OSError:
                return False

        try:
            wait_until(up, timeout, f"regproxy GET {self.url}/v2/ -> 200 or 401")
        except TimeoutError as e:
            self.kill()
            raise RuntimeError(f"{e}; log:\n{tail(self.log_path)}") from None

    def stop(self) -> None:
        if self.proc is not None:
            _terminate(self.proc)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def restart(self) -> None:
        self.stop()
        self.start()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def logged(self, *texts: str, timeout: float = 5.0) -> bool:
        """Whether the log holds every one of *texts* within *timeout*
        seconds: access lines reach it up to a tenth of a second late."""
        try:
            wait_until(lambda: all(t in self.log_text() for t in texts), timeout, repr(texts))
        except TimeoutError:
            return False
        return True

    def client(self) -> regclient.RegistryClient:
        return regclient.RegistryClient(self.url)

    # -- the on-disk store ---------------------------------------------------
    def blob_path(self, digest: str) -> Path:
        algo, hex_ = digest.split(":", 1)
        return self.cache_dir / "blobs" / algo / hex_[:2] / hex_

    def tmp_files(self) -> list[Path]:
        tmp = self.cache_dir / "tmp"
        return sorted(p for p in tmp.rglob("*") if p.is_file()) if tmp.exists() else []


# --------------------------------------------------------------------------
# skopeo
# --------------------------------------------------------------------------


class Skopeo:
    """Runs skopeo with a private auth file and registries.conf, and the Go proxy env."""

    def __init__(self, workdir: Path) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        registries_conf = workdir / "registries.conf"
        registries_conf.write_text("unqualified-search-registries = []\n")
        self.env = {
            **os.environ,
            **GO_PROXY_ENV,
            "REGISTRY_AUTH_FILE": str(workdir / "auth.json"),  # absent: no stored creds
            "CONTAINERS_REGISTRIES_CONF": str(registries_conf),
        }

    def argv(self, *args: str) -> list[str]:
        return ["skopeo", *args]

    def run(
        self, *args: str, check: bool = True, timeout: float = 300
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            self.argv(*args),
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"skopeo {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}\n{proc.stdout}"
            )
        return proc

    def popen(self, *args: str, stdout: Any = subprocess.PIPE) -> subprocess.Popen[str]:
        return subprocess.Popen(
            self.argv(*args),
            env=self.env,
            stdout=stdout,
            stderr=subprocess.PIPE,
            text=True,
            stdin=subprocess.DEVNULL,
        )

    @staticmethod
    def copy_args(
        src: str, dest: str, *, all_images: bool = False, creds: tuple[str, str] | None = None
    ) -> list[str]:
        args = ["copy", "--quiet", "--src-tls-verify=false", "--retry-times=0"]
        if creds:
            args.append(f"--src-creds={creds[0]}:{creds[1]}")
        else:
            args.append("--src-no-creds")
        if all_images:
            args.append("--all")
        return [*args, src, dest]

    def pull(
        self,
        src: str,
        dest_dir: Path,
        *,
        all_images: bool = False,
        creds: tuple[str, str] | None = None,
        check: bool = True,
        timeout: float = 300,
    ) -> subprocess.CompletedProcess[str]:
        """``skopeo copy SRC dir:DEST`` (or ``oci:DEST:pulled`` with ``--all``)."""
        dest_dir.parent.mkdir(parents=True, exist_ok=True)
        return self.run(
            *self.copy_args(src, dest_of(dest_dir, all_images), all_images=all_images, creds=creds),
            check=check,
            timeout=timeout,
        )


def dest_of(dest_dir: Path, all_images: bool) -> str:
    return f"oci:{dest_dir}:pulled" if all_images else f"dir:{dest_dir}"


def tree_digests(directory: Path) -> dict[str, str]:
    """relative path -> sha256 of every file under *directory*."""
    out = {}
    for p in sorted(directory.rglob("*")):
        if p.is_file():
            h = hashlib.sha256()
            with open(p, "rb") as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
            out[str(p.relative_to(directory))] = h.hexdigest()
    return out


# --------------------------------------------------------------------------
# docker-registry with Basic auth (htpasswd), like a private registry
# --------------------------------------------------------------------------


def htpasswd_line(user: str, password: str) -> str:
    """One ``user:$2b$...`` line: docker-registry accepts bcrypt only."""
    import bcrypt  # a test extra; imported here so other tests run without it

    hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()
    return f"{user}:{hashed}"


class BasicAuthClient(regclient.RegistryClient):
    """A :class:`regclient.RegistryClient` that sends Basic credentials up front."""

    def get(
        self, path: str, method: str = "GET", headers: dict[str, str] | None = None
    ) -> regclient.Response:
        headers = dict(headers or {})
        if self.username is not None:
            creds = f"{self.username}:{self.password}".encode()
            headers.setdefault("Authorization", "Basic " + base64.b64encode(creds).decode())
        return regclient.request(self.base_url + path, method, headers)


class HtpasswdRegistry(UpstreamRegistry):
    """:class:`UpstreamRegistry` with ``auth.htpasswd`` instead of token auth:
    every request needs Basic credentials (*creds*, pull and push), anonymous
    ones get ``401`` with ``WWW-Authenticate: Basic``."""

    def __init__(self, workdir: Path, creds: tuple[str, str], port: int | None = None) -> None:
        super().__init__(
            workdir,
            token_realm="",
            service="",
            issuer="",
            rootcert=Path(),
            push_creds=creds,
            read_creds=creds,
            port=port,
        )
        self.htpasswd_path = workdir / "htpasswd"
        self.htpasswd_path.write_text(htpasswd_line(*creds) + "\n")
        config = yaml.safe_load(self.config_path.read_text())
        config["auth"] = {"htpasswd": {"realm": "regproxy-tests", "path": str(self.htpasswd_path)}}
        self.config_path.write_text(yaml.safe_dump(config))

    def client(self, creds: tuple[str, str] | None = None) -> regclient.RegistryClient:
        user, password = creds if creds else (None, None)
        return BasicAuthClient(self.url, user, password)
