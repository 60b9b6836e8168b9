"""The benchmark's HTTP clients: bounded in count and in time, 127.0.0.1 only.

* :func:`download`: one GET read into a reused buffer (``recv_into``), so the
  client costs little beside the server it measures.
* :func:`download_many`: that, from N threads released at once.
* :func:`requests`: one small request again and again over keep-alive
  connections (asyncio), as fast as answered or at a fixed rate.
"""

from __future__ import annotations

import asyncio
import itertools
import socket
import ssl
import statistics
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

_BUFFER = 1 << 20


@dataclass
class Download:
    status: int
    size: int  #: body bytes received
    expected: int | None  #: Content-Length
    seconds: float  #: connect to last byte
    headers: dict[str, str] = field(default_factory=dict)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.status == 200 and self.size == self.expected


def _request(method: str, host_port: str, path: str, headers: Sequence[tuple[str, str]]) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host_port}"]
    lines += [f"{k}: {v}" for k, v in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _parse_head(head: bytes) -> tuple[int, dict[str, str]]:
    status_line, *rest = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in rest:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), headers


def _connect(host: str, port: int, timeout: float, tls: ssl.SSLContext | None) -> socket.socket:
    sock = socket.create_connection((host, port), timeout=timeout)
    if tls is None:
        return sock
    try:
        return tls.wrap_socket(sock, server_hostname=host)  # takes over the descriptor
    except BaseException:
        sock.close()
        raise


def download(
    url: str,
    path: str,
    timeout: float = 60.0,
    deadline: float | None = None,
    tls: ssl.SSLContext | None = None,
) -> Download:
    """GET *path* from *url* (``http://127.0.0.1:PORT``, or ``https://`` with
    *tls*), body discarded.

    *timeout* bounds each socket operation, *deadline* (``time.monotonic()``)
    the whole download."""
    host_port = url.partition("://")[2]
    host, port = host_port.rsplit(":", 1)
    start = time.monotonic()
    buf = bytearray(_BUFFER)
    view = memoryview(buf)
    status, got, expected = 0, 0, None
    headers: dict[str, str] = {}
    try:
        with _connect(host, int(port), timeout, tls) as sock:
            sock.sendall(_request("GET", host_port, path, [("Connection", "close")]))
            head = b""
            while b"\r\n\r\n" not in head:
                if len(head) > 65536:
                    raise ConnectionError("response headers too long")
                n = sock.recv_into(view)
                if not n:
                    raise ConnectionError("connection closed before the response headers")
                head += view[:n]
            head, _, body = head.partition(b"\r\n\r\n")
            status, headers = _parse_head(head)
            if "content-length" in headers:
                expected = int(headers["content-length"])
            got = len(body)
            while expected is None or got < expected:
                n = sock.recv_into(view)
                if not n:
                    break
                got += n
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"download still running at its deadline ({got} bytes)")
    except OSError as e:
        return Download(status, got, expected, time.monotonic() - start, headers, repr(e))
    return Download(status, got, expected, time.monotonic() - start, headers)


def download_many(
    url: str, path: str, clients: int, timeout: float
) -> tuple[float, list[Download]]:
    """*clients* threads download *path* at once; returns (wall seconds, results)."""
    results: list[Download | None] = [None] * clients
    barrier = threading.Barrier(clients + 1, timeout=30)
    deadline = [0.0]

    def one(i: int) -> None:
        barrier.wait()
        results[i] = download(url, path, deadline=deadline[0])

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    deadline[0] = time.monotonic() + timeout
    start = time.monotonic()
    barrier.wait()
    for t in threads:
        t.join(max(0.0, deadline[0] + 60 - time.monotonic()))
    wall = time.monotonic() - start
    return wall, [r or Download(0, 0, None, wall, error="client thread hung") for r in results]


# -- many small requests -------------------------------------------------------


@dataclass
class LoadResult:
    sent: int
    ok: int
    errors: int
    seconds: float  #: first send to last answer
    latencies: list[float]  #: seconds, request written -> response read, successes only
    late: int  #: fixed rate: requests sent more than 5 ms after their slot
    #: when each of *latencies* was sent (``time.monotonic()``, the same
    #: clock in every process here), to tell which work it met
    sent_at: list[float] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.ok / self.seconds if self.seconds else 0.0

    def percentile(self, p: float) -> float:
        if not self.latencies:
            return float("nan")
        data = sorted(self.latencies)
        return data[min(len(data) - 1, int(p / 100 * len(data)))]


async def _load(
    host: str,
    port: int,
    request: bytes,
    head_only: bool,
    duration: float,
    connections: int,
    rate: float | None,
    stop_early: threading.Event | None,
) -> LoadResult:
    loop = asyncio.get_running_loop()
    start = loop.time() + 0.05
    stop = start + duration
    slots = iter(range(int(rate * duration))) if rate else itertools.count()
    latencies: list[float] = []
    sent_at: list[float] = []
    counts = {"sent": 0, "ok": 0, "errors": 0, "late": 0}
    last_end = [start]

    async def worker() -> None:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            for i in slots:
                now = loop.time()
                if stop_early is not None and stop_early.is_set():
                    break
                if rate:
                    due = start + i / rate
                    if now > stop:
                        break  # a server slower than the rate: its window is over
                    if due > now:
                        await asyncio.sleep(due - now)
                    elif now - due > 0.005:
                        counts["late"] += 1
                elif now >= stop:
                    break
                elif now < start:
                    await asyncio.sleep(start - now)
                sent = loop.time()
                counts["sent"] += 1
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                status, headers = _parse_head(head[:-4])
                length = int(headers.get("content-length", "0"))
                if length and not head_only:
                    await reader.readexactly(length)
                end = loop.time()
                last_end[0] = max(last_end[0], end)
                if status == 200:
                    counts["ok"] += 1
                    latencies.append(end - sent)
                    sent_at.append(sent)
                else:
                    counts["errors"] += 1
                if headers.get("connection", "").lower() == "close":
                    writer.close()
                    reader, writer = await asyncio.open_connection(host, port)
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            counts["errors"] += 1
        finally:
            writer.close()

    tasks = [asyncio.ensure_future(worker()) for _ in range(connections)]
    _done, pending = await asyncio.wait(tasks, timeout=duration + 15)
    for task in pending:
        task.cancel()
    counts["errors"] += len(pending)
    return LoadResult(
        counts["sent"],
        counts["ok"],
        counts["errors"],
        last_end[0] - start,
        latencies,
        counts["late"],
        sent_at,
    )


def requests(
    url: str,
    method: str,
    path: str,
    headers: Sequence[tuple[str, str]],
    duration: float,
    rate: float | None = None,
    connections: int = 16,
    stop_early: threading.Event | None = None,
) -> LoadResult:
    """The same request over *connections* keep-alive connections.

    Without *rate*, closed loop for *duration* seconds: each connection sends
    its next request as soon as it has an answer (the most a server answers).
    With *rate*, open loop: ``rate * duration`` requests, one every ``1/rate``
    s whatever the answers (at most *connections* in flight); those not sent
    within *duration* are dropped.  Latency runs
    from writing a request to reading its whole answer; *stop_early*, once
    set, ends the run before *duration*."""
    host_port = url.removeprefix("http://")
    host, port = host_port.rsplit(":", 1)
    request = _request(method, host_port, path, headers)
    return asyncio.run(
        _load(host, int(port), request, method == "HEAD", duration, connections, rate, stop_early)
    )


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")
