"""Whole regproxy nodes under twistd, clustered on Swift and PostgreSQL, for
the end-to-end cluster tests (``test_cluster.py``).

Synchronous, like ``tests/integration/harness.py`` whose :class:`RegProxy`
each node is: real processes on free 127.0.0.1 ports, blocking clients in
threads of their own.

- :class:`UpstreamFront` stands between the nodes and the upstream registry:
  it counts every request as it starts (no access log to wait for), slows
  chosen blobs down so that a download is surely in flight, and tells which
  node's socket asked for each blob (:attr:`Exchange.node`).
- :class:`ClusterNode` is one node: a :class:`RegProxy` with ``cache.storage``,
  ``cache.index`` and ``cluster`` keys.
- :class:`Cluster` is the nodes, the haproxy in front of them and the bucket.
- :func:`fetch` is one blob GET whose body is hashed as it arrives, telling
  a complete body from an aborted one.
"""

from __future__ import annotations

import hashlib
import http.client
import http.server
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psycopg
from integration.harness import RegProxy, free_port, tail, wait_until

from registryproxy.cluster.bucket import key
from registryproxy.cluster.engineconfig import S3Settings
from registryproxy.cluster.s3 import make_client
from registryproxy.names import Digest

from . import engines

#: request and response headers that belong to one connection, not forwarded
_HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
}
_CHUNK = 64 * 1024
#: the nodes' heartbeat interval, and the silence after which a node is gone
#: (seconds; shorter than the defaults, 2 and 10, so that the tests wait less)
HEARTBEAT = 1.0
NODE_TIMEOUT = 5.0


# --------------------------------------------------------------------------
# the upstream, counted and slowed
# --------------------------------------------------------------------------


@dataclass
class Exchange:
    """One request the front passed on, updated while its body flows."""

    method: str
    path: str
    headers: dict[str, str]
    #: the asking socket's port (the node's end of the connection)
    client_port: int
    #: for a blob GET: the name of the node that asked, if known
    node: str | None = None
    status: int = 0
    #: response body bytes sent on to the node so far
    sent: int = 0
    #: the response was sent whole
    done: bool = False
    #: the node's connection broke before the end
    broken: bool = False
    #: time.monotonic() when the whole body had been sent
    finished_at: float | None = None

    @property
    def digest(self) -> str:
        return self.path.rsplit("/", 1)[-1].split("?", 1)[0]

    @property
    def is_blob_get(self) -> bool:
        """A blob download (a 401 is the token challenge, not a download)."""
        return self.method == "GET" and "/blobs/" in self.path and self.status != 401


class UpstreamFront:
    """A small HTTP reverse proxy in front of the upstream registry.

    Every request is recorded as an :class:`Exchange` the moment its response
    starts; ``throttle[digest] = bytes_per_second`` slows that blob's bodies;
    a request whose path contains a string in ``refuse`` is answered 404
    here, the upstream not asked (to see whether a node still holds it).
    ``identify(port)``, if set, names the process whose socket on *port* asks
    for a blob (:meth:`Cluster.identify`)."""

    def __init__(self, target: str) -> None:
        self.target = target  # host:port
        self.identify: Callable[[int], str | None] | None = None
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.exchanges: list[Exchange] = []
        self.throttle: dict[str, float] = {}
        self.refuse: set[str] = set()
        self._lock = threading.Lock()
        self._server: http.server.ThreadingHTTPServer | None = None

    def start(self) -> None:
        front = self

        class Handler(_FrontHandler):
            owner = front

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        threading.Thread(
            target=self._server.serve_forever, name="upstream-front", daemon=True
        ).start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def record(self, exchange: Exchange) -> None:
        with self._lock:
            self.exchanges.append(exchange)

    def mark(self) -> int:
        with self._lock:
            return len(self.exchanges)

    def since(self, mark: int = 0) -> list[Exchange]:
        with self._lock:
            return self.exchanges[mark:]

    def blob_gets(self, digest: str | None = None, since: int = 0) -> list[Exchange]:
        """Blob downloads since *since*: of *digest*, or of any blob."""
        return [
            e for e in self.since(since) if e.is_blob_get and (digest is None or e.digest == digest)
        ]


class _FrontHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    owner: UpstreamFront

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass

    def do_GET(self) -> None:  # noqa: N802
        self._forward()

    def do_HEAD(self) -> None:  # noqa: N802
        self._forward()

    def _forward(self) -> None:
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
        exchange = Exchange(self.command, self.path, headers, self.client_address[1])
        if "/blobs/" in self.path and self.owner.identify is not None:
            exchange.node = self.owner.identify(exchange.client_port)
        if any(part in self.path for part in self.owner.refuse):
            exchange.status = 404
            self.owner.record(exchange)
            self.send_response(404)
            self.send_header("Content-Type", "application/json")
            body = b'{"errors": [{"code": "MANIFEST_UNKNOWN", "message": "refused by the test"}]}'
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)
            exchange.done = True
            return
        upstream = http.client.HTTPConnection(self.owner.target, timeout=60)
        try:
            upstream.request(self.command, self.path, headers=headers)
            response = upstream.getresponse()
            exchange.status = response.status
            self.owner.record(exchange)
            length = response.getheader("Content-Length")
            body = b""
            if self.command != "HEAD" and length is None:
                body = response.read()
                length = str(len(body))
            self.send_response(response.status)
            for name, value in response.getheaders():
                if name.lower() not in _HOP_BY_HOP and name.lower() != "content-length":
                    self.send_header(name, value)
            if length is not None:
                self.send_header("Content-Length", length)
            self.end_headers()
            if self.command == "HEAD":
                exchange.done = True
                return
            if body:
                self.wfile.write(body)
                exchange.sent = len(body)
            else:
                self._stream(response, exchange)
            exchange.done = True
            exchange.finished_at = time.monotonic()
        except OSError:
            exchange.broken = True
            self.close_connection = True
        finally:
            upstream.close()

    def _stream(self, response: http.client.HTTPResponse, exchange: Exchange) -> None:
        rate = self.owner.throttle.get(exchange.digest)
        began = time.monotonic()
        while chunk := response.read(_CHUNK if rate is None else min(_CHUNK, int(rate / 20) or 1)):
            self.wfile.write(chunk)
            exchange.sent += len(chunk)
            rate = self.owner.throttle.get(exchange.digest)  # lifted on the way: full speed
            if rate:
                ahead = exchange.sent / rate - (time.monotonic() - began)
                if ahead > 0:
                    time.sleep(ahead)


# --------------------------------------------------------------------------
# clients
# --------------------------------------------------------------------------


@dataclass
class Fetched:
    """What a client got: the status, how many body bytes and their sha256,
    and whether the body came whole (``Content-Length`` reached, then EOF)."""

    url: str
    status: int = 0
    length: int = 0
    sha256: str = ""
    complete: bool = False
    #: why the body stopped short ("" if it did not)
    error: str = ""
    #: time.monotonic() when the first body bytes arrived
    first_byte_at: float | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def is_whole(self, digest: str, size: int) -> bool:
        """A complete 200 carrying the very blob."""
        return (
            self.status == 200
            and self.complete
            and self.length == size
            and f"sha256:{self.sha256}" == digest
        )

    @property
    def x_cache(self) -> str | None:
        return self.headers.get("x-cache")


def fetch(
    url: str,
    path: str,
    method: str = "GET",
    headers: dict[str, str] | None = None,
    timeout: float = 30.0,
    on_headers: Callable[[Fetched], None] | None = None,
    receive_buffer: int | None = None,
) -> Fetched:
    """One request, its body hashed as it arrives (never all in memory).
    *receive_buffer*: this socket's (small) receive buffer, so that a client
    that stops reading (in *on_headers*) soon stops the server sending too."""
    parts = urlsplit(url)
    got = Fetched(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        if receive_buffer is not None:
            conn.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
            conn.sock.settimeout(timeout)
            conn.sock.connect((parts.hostname, parts.port))
        conn.request(method, path, headers=headers or {})
        response = conn.getresponse()
        got.status = response.status
        got.headers = {k.lower(): v for k, v in response.getheaders()}
        if on_headers is not None:
            on_headers(got)
        h = hashlib.sha256()
        while True:
            chunk = response.read1(1 << 20) if method != "HEAD" else b""
            if not chunk:
                break
            if got.first_byte_at is None:
                got.first_byte_at = time.monotonic()
            h.update(chunk)
            got.length += len(chunk)
        got.sha256 = h.hexdigest()
        expected = got.headers.get("content-length")
        got.complete = method == "HEAD" or expected is None or int(expected) == got.length
        if not got.complete:
            got.error = f"ended after {got.length} of {expected} bytes"
    except (OSError, http.client.HTTPException) as e:
        got.error = f"{type(e).__name__}: {e}"
    finally:
        conn.close()
    return got


# --------------------------------------------------------------------------
# the nodes
# --------------------------------------------------------------------------


class ClusterNode(RegProxy):
    """A :class:`RegProxy` that is one node of a cluster: its own cache
    directory, admin, proxy and internal (``cluster.listen``) ports."""

    def __init__(self, workdir: Path, name: str, shared: dict[str, Any]) -> None:
        self.name = name
        self.cluster_port = free_port()
        config = {
            **shared,
            "cache": {**shared.get("cache", {}), "directory": str(workdir / "cache")},
            "cluster": {
                **shared.get("cluster", {}),
                "node": name,
                "listen": f"tcp:{self.cluster_port}:interface=127.0.0.1",
                "advertise": f"http://127.0.0.1:{self.cluster_port}",
            },
        }
        super().__init__(workdir, config)

    def last_run_log(self) -> str:
        """The log of this node's latest start, without the earlier ones'."""
        return self.log_text().rsplit("\n=== ", 1)[-1]

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.proc.poll() is None else None

    def socket_inodes(self) -> set[str]:
        """The inodes of the sockets this node's process has open."""
        pid = self.pid
        if pid is None:
            return set()
        found = set()
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                found.add(target[len("socket:[") : -1])
        return found


def _tcp_inode(local_port: int, remote_port: int) -> str | None:
    """The inode of the loopback TCP socket from *local_port* to *remote_port*."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, remote, inode = fields[1], fields[2], fields[9]
            if (
                int(local.rsplit(":", 1)[1], 16) == local_port
                and int(remote.rsplit(":", 1)[1], 16) == remote_port
            ):
                return inode
    return None


def s3_settings_of(endpoint: engines.S3Endpoint, bucket: str) -> S3Settings:
    return S3Settings(
        bucket=bucket,
        endpoint=endpoint.url,
        region=endpoint.region,
        access_key=endpoint.access_key,
        secret_key=endpoint.secret_key,
        connect_timeout=2,
        read_timeout=10,
    )


class Cluster:
    """Nodes on one bucket and one database, behind one haproxy."""

    def __init__(
        self,
        workdir: Path,
        s3: engines.S3Endpoint,
        bucket: str,
        dsn: str,
        upstream_url: str,
        make_haproxy: Callable[[Sequence[str]], engines.HAProxy],
        extra_config: dict[str, Any] | None = None,
    ) -> None:
        self.workdir = workdir
        self.bucket = bucket
        self.s3 = make_client(s3_settings_of(s3, bucket), 4)
        self.dsn = dsn
        self.heartbeat = HEARTBEAT
        self.shared: dict[str, Any] = {
            "cache": {
                "tag_ttl": 3600,
                "storage": {
                    "s3": {
                        "endpoint": s3.url,
                        "bucket": bucket,
                        "region": s3.region,
                        "access_key": s3.access_key,
                        "secret_key": s3.secret_key,
                    }
                },
                "index": {"postgresql": {"dsn": dsn}},
            },
            "cluster": {"heartbeat": HEARTBEAT, "node_timeout": NODE_TIMEOUT},
            "upstreams": {"docker.io": {"url": upstream_url}},
            "default_upstream": "docker.io",
            **(extra_config or {}),
        }
        self.nodes: list[ClusterNode] = []
        self._make_haproxy = make_haproxy
        self.haproxy: engines.HAProxy | None = None

    # -- membership ----------------------------------------------------------
    def add_nodes(self, count: int) -> list[ClusterNode]:
        """*count* more nodes, started side by side."""
        new = [
            ClusterNode(self.workdir / f"node-{i}", f"node-{i}", self.shared)
            for i in range(len(self.nodes) + 1, len(self.nodes) + count + 1)
        ]
        self.nodes.extend(new)
        errors: list[BaseException] = []

        def start(node: ClusterNode) -> None:
            try:
                node.start()
            except BaseException as e:  # noqa: B036 (raised again below, in the caller)
                errors.append(e)

        threads = [threading.Thread(target=start, args=(n,)) for n in new]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        return new

    def restart(self, node: ClusterNode, timeout: float = 30.0) -> None:
        """Start *node* again, trying until it starts (while the heartbeat of
        the process it replaces is fresh, its name is taken)."""

        def started() -> bool:
            try:
                node.start()
            except RuntimeError:
                return False
            return True

        wait_until(started, timeout, f"{node.name} to start again", 1.0)

    def backends(self, nodes: Iterable[ClusterNode] | None = None) -> list[str]:
        return [n.host_port for n in (self.nodes if nodes is None else nodes)]

    def start_haproxy(self) -> engines.HAProxy:
        self.haproxy = self._make_haproxy(self.backends())
        self.wait_haproxy_up()
        return self.haproxy

    def wait_haproxy_up(self, timeout: float = 10.0) -> None:
        assert self.haproxy is not None
        haproxy = self.haproxy
        wait_until(
            lambda: set(haproxy.server_states().values()) == {"UP"},
            timeout,
            "haproxy to see every node UP",
        )

    @property
    def url(self) -> str:
        assert self.haproxy is not None
        return self.haproxy.url

    def stop(self) -> None:
        for node in self.nodes:
            node.kill()

    def identify(self, port: int, remote_port: int) -> str | None:
        """The name of the node whose socket from *port* to *remote_port* is open."""
        inode = _tcp_inode(port, remote_port)
        if inode is None:
            return None
        return next((n.name for n in self.nodes if inode in n.socket_inodes()), None)

    def node(self, name: str | None) -> ClusterNode | None:
        return next((n for n in self.nodes if n.name == name), None)

    def wait_converged(self, timeout: float = 15.0) -> None:
        """Until every running node has a fresh heartbeat in the database, and
        then one heartbeat interval more, in which each node reads them all
        back: the nodes pick the same owner for a digest only then."""
        running = {n.name for n in self.nodes if n.running}

        def fresh() -> set[str]:
            with psycopg.connect(self.dsn, autocommit=True) as conn:
                rows = conn.execute(
                    "SELECT name FROM regproxy_nodes"
                    " WHERE last_seen > now() - make_interval(secs => %s)",
                    (2 * self.heartbeat,),
                ).fetchall()
            return {name for (name,) in rows}

        wait_until(
            lambda: running <= fresh(), timeout, f"fresh heartbeats of {sorted(running)}", 0.2
        )
        time.sleep(self.heartbeat + 0.2)

    # -- the bucket ----------------------------------------------------------
    def object_size(self, digest: str) -> int | None:
        """The size of the bucket's object for *digest*, or None."""
        from botocore.exceptions import ClientError

        try:
            head = self.s3.head_object(Bucket=self.bucket, Key=blob_key(digest))
        except ClientError as e:
            if e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404:
                return None
            raise
        return int(head["ContentLength"])

    def object_sha256(self, digest: str) -> str:
        body = self.s3.get_object(Bucket=self.bucket, Key=blob_key(digest))["Body"]
        h = hashlib.sha256()
        for chunk in iter(lambda: body.read(1 << 20), b""):
            h.update(chunk)
        return "sha256:" + h.hexdigest()

    def log_tails(self, lines: int = 40) -> str:
        return "\n".join(
            f"--- {n.name} {n.log_path}\n{tail(n.log_path, lines)}" for n in self.nodes
        )


def blob_key(digest: str) -> str:
    """The bucket's key for *digest*: ``blobs/sha256/<hex>``."""
    return key(Digest.parse(digest))
