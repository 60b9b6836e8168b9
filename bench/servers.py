"""The servers a benchmark run compares, on 127.0.0.1 ports.

The upstream and the peer are the integration tests' :class:`harness.UpstreamRegistry`
(CNCF Distribution, ``docker-registry``): the upstream behind the tests' token
server, as Docker Hub is, and the peer with a ``proxy: remoteurl:`` section
instead, which makes it Distribution's own pull-through cache.  regproxy itself is
:class:`harness.RegProxy` as is.  nginx serves the very same files from disk
with ``sendfile``: what this machine can do when the server costs nothing.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path

import yaml

from tests.integration import harness, regclient, tokenserver

#: the token server's account that may push (the bench pushes its images with it)
PUSH_CREDS = ("pusher", "pushpass")


def token_server() -> tokenserver.TokenServer:
    """Docker Hub's token auth in miniature: anonymous pulls get a token too.
    Tokens live an hour, so that none expires in the middle of a measurement."""
    server = tokenserver.TokenServer(
        accounts={PUSH_CREDS[0]: tokenserver.Account(PUSH_CREDS[1], can_push=True)},
        expires_in=3600,
    )
    server.start()
    return server


class Registry(harness.UpstreamRegistry):
    """``docker-registry``: with *tokens*, an upstream behind token auth like
    Docker Hub's; with *remote_url* instead, Distribution's pull-through cache
    of that registry (the peer), open to anonymous clients."""

    def __init__(
        self,
        workdir: Path,
        tokens: tokenserver.TokenServer | None = None,
        remote_url: str | None = None,
    ) -> None:
        assert (tokens is None) != (remote_url is None)
        super().__init__(
            workdir,
            token_realm=tokens.realm if tokens else "unused",
            service=tokens.service if tokens else "unused",
            issuer=tokens.issuer if tokens else "unused",
            rootcert=tokens.write_cert(workdir / "token-signer.pem") if tokens else Path(),
            push_creds=PUSH_CREDS,
            read_creds=PUSH_CREDS,
        )
        config = yaml.safe_load(self.config_path.read_text())
        # Requests are counted from the access log: no second line for each.
        config["log"]["level"] = "warn"
        if remote_url is not None:
            del config["auth"]
            config["proxy"] = {"remoteurl": remote_url}
            # The peer at its fastest: no access log either.
            config["log"]["accesslog"] = {"disabled": True}
        self.config_path.write_text(yaml.safe_dump(config))

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.running and self.proc is not None else None

    def restart(self) -> None:
        """Stop and start again, keeping what is stored."""
        self.stop()
        self.start()

    def restart_empty(self) -> None:
        """Stop, forget everything stored, start again."""
        self.stop()
        shutil.rmtree(self.storage_dir, ignore_errors=True)
        self.storage_dir.mkdir(parents=True)
        self.start()

    def has_blob(self, repository: str, digest: str) -> bool:
        """Stored and linked into *repository*: what a proxy serves without
        asking its remote (Distribution commits a fetched blob in the
        background, after the client that missed has had its bytes)."""
        algorithm, hex_ = digest.split(":", 1)
        link = "docker/registry/v2/repositories/{}/_layers/{}/{}/link"
        return (self.storage_dir / link.format(repository, algorithm, hex_)).exists()

    def upstream_bytes(self, since: int) -> tuple[int, int]:
        """(response bytes, requests) in the access log after offset *since*."""
        lines = self.requests(since)
        return sum(line.size for line in lines), len(lines)

    def blob_bytes(self, since: int) -> int:
        """Bytes of blob GETs in the access log after offset *since*."""
        return sum(line.size for line in self.requests(since) if line.is_blob)


class RegProxy(harness.RegProxy):
    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.running and self.proc is not None else None

    def restart(self) -> None:
        self.stop()
        self.start()

    def restart_empty(self) -> None:
        self.stop()
        shutil.rmtree(self.cache_dir, ignore_errors=True)
        self.start()

    def has_blob(self, repository: str, digest: str) -> bool:
        return self.blob_path(digest).exists()


_NGINX_CONF = """\
# regproxy bench: static files with sendfile, the machine's limit.
worker_processes auto;
# The files live in a private (0700) temp dir.
user root;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 10000000;
    client_body_temp_path {prefix}/tmp/body;
    proxy_temp_path {prefix}/tmp/proxy;
    fastcgi_temp_path {prefix}/tmp/fastcgi;
    uwsgi_temp_path {prefix}/tmp/uwsgi;
    scgi_temp_path {prefix}/tmp/scgi;
    server {{
        listen 127.0.0.1:{port};
        root {prefix}/root;
        location = /v2/ {{ default_type application/json; return 200 '{{}}'; }}
        location ~ /manifests/ {{ types {{ }} default_type {manifest_type}; }}
        location ~ /blobs/ {{ types {{ }} default_type application/octet-stream; }}
    }}
}}
"""


class Nginx:
    """nginx serving files laid out as registry paths (``/v2/<repo>/blobs/<digest>``):
    enough for skopeo to pull an image by tag, with no logic at all."""

    def __init__(self, workdir: Path, manifest_type: str) -> None:
        self.workdir = workdir
        self.port = harness.free_port()
        self.root = workdir / "root"
        self.root.mkdir(parents=True, exist_ok=True)
        (workdir / "tmp").mkdir(exist_ok=True)
        self.config_path = workdir / "nginx.conf"
        self.config_path.write_text(
            _NGINX_CONF.format(prefix=workdir, port=self.port, manifest_type=manifest_type)
        )
        self.log_path = workdir / "error.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def host_port(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host_port}"

    def publish(self, url_path: str, source: Path) -> None:
        """Serve *source* (hard-linked, not copied) at *url_path*."""
        target = self.root / url_path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            os.link(source, target)

    def start(self, timeout: float = 20.0) -> None:
        binary = harness.require_binary("nginx", "nginx-light")
        argv = [binary, "-p", str(self.workdir), "-c", str(self.config_path), "-e"]
        argv += [str(self.log_path), "-g", "daemon off;"]
        with open(self.workdir / "stdout.log", "ab") as out:
            self.proc = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )

        def up() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"nginx exited with {self.proc.returncode}:\n{harness.tail(self.log_path)}"
                )
            try:
                return regclient.request(self.url + "/v2/", timeout=2).status == 200
            except OSError:
                return False

        harness.wait_until(up, timeout, f"nginx on {self.host_port}")

    def stop(self) -> None:
        if self.proc is not None:
            # SIGQUIT: graceful shutdown of the master and its workers.
            harness._terminate(self.proc, sig=signal.SIGQUIT)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.proc.poll() is None else None


# -- memory ------------------------------------------------------------------


def peak_rss(pid: int | None) -> int | None:
    """VmHWM of *pid* in bytes: its peak resident set since start or the last
    :func:`reset_peak_rss`."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def reset_peak_rss(pid: int | None) -> None:
    """Start VmHWM over from the current RSS (``5 > clear_refs``, as root)."""
    if pid is None:
        return
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU time of *pid* and its live children (nginx's workers)."""
    if pid is None:
        return 0.0
    total = 0.0
    pids = [pid]
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            pids += [int(c) for c in (task / "children").read_text().split()]
    except OSError:
        pass
    for p in pids:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total
