"""Hostile clients beside real pulls: slow headers, idle connections,
clients that never read, request bodies.  The pulls all succeed, and once
the hostile clients are gone the regproxy process's descriptors and memory
are back near where they were."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from . import harness
from .images import Image
from .test_faults import process_numbers
from .test_skopeo import assert_pulled

pytestmark = pytest.mark.integration
MiB = 1024 * 1024
#: how long the hostile clients go on: several of each of their timeouts
#: (header_timeout 2 s, idle_timeout and send_timeout 3 s below)
SECONDS = 10.0


def _connect(port: int, rcvbuf: int | None = None) -> socket.socket:
    sock = socket.socket()
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(5)
    sock.connect(("127.0.0.1", port))
    return sock


def slowloris(port: int, deadline: float, count: int, cut: list[int]) -> None:
    """*count* connections sending a header line each second, never ending."""
    socks = [_connect(port) for _ in range(count)]
    for sock in socks:
        sock.sendall(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n")
    while time.monotonic() < deadline and socks:
        time.sleep(1)
        for sock in list(socks):
            try:
                sock.sendall(b"X-Slow: yes\r\n")
            except OSError:
                cut[0] += 1
                socks.remove(sock)
                sock.close()
    for sock in socks:
        sock.close()


def idle(port: int, deadline: float, count: int) -> None:
    socks = [_connect(port) for _ in range(count)]
    time.sleep(max(0.0, deadline - time.monotonic()))
    for sock in socks:
        sock.close()


def never_read(port: int, deadline: float, path: str, count: int) -> None:
    """*count* clients asking for a big blob and reading none of it."""
    while time.monotonic() < deadline:
        socks = [_connect(port, rcvbuf=4096) for _ in range(count)]
        for sock in socks:
            sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        time.sleep(min(6.0, max(0.0, deadline - time.monotonic())))
        for sock in socks:
            sock.close()


def bodies(port: int, deadline: float, answers: list[bytes]) -> None:
    """Pushes of 2 GB and GETs with bodies, sent as fast as regproxy takes them."""
    heads = [
        b"PUT /v2/library/x/blobs/uploads/1 HTTP/1.1\r\nContent-Length: 2000000000\r\n\r\n",
        b"GET /v2/ HTTP/1.1\r\nContent-Length: 300000000\r\n\r\n",
        b"POST /v2/library/x/blobs/uploads/ HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
    ]
    junk = b"x" * 65536
    n = 0
    while time.monotonic() < deadline:
        with _connect(port) as sock:
            sock.sendall(heads[n % len(heads)])
            try:
                for _ in range(100):
                    sock.sendall(junk)
            except OSError:
                pass
            try:
                answers.append(sock.recv(12))
            except OSError as e:
                answers.append(repr(e).encode())
        n += 1


def test_hostile_clients_beside_real_pulls(
    test_images: dict[str, Image],
    regproxy: Callable[..., harness.RegProxy],
    skopeo: harness.Skopeo,
    upstream_pull: Callable[..., Path],
    workdir: Path,
) -> None:
    proxy = regproxy(
        extra_config={
            "proxy": {
                "header_timeout": 2,
                "idle_timeout": 3,
                "send_timeout": 3,
                "max_connections": 400,
            }
        }
    )
    assert proxy.proc is not None
    pid = proxy.proc.pid
    pulled = [test_images[name] for name in ("multilayer", "dockerimg")]
    big = test_images["big"]
    for image in (*pulled, big):  # warm the cache, then measure the baseline
        skopeo.pull(image.docker_ref(proxy.host_port), workdir / "warm" / image.name)
    time.sleep(1)
    fds_before, rss_before = process_numbers(pid)

    deadline = time.monotonic() + SECONDS
    largest = max(big.layers, key=lambda blob: blob.size)
    cut, answers, failures = [0], [], []
    threads = [
        threading.Thread(target=slowloris, args=(proxy.port, deadline, 150, cut)),
        threading.Thread(target=idle, args=(proxy.port, deadline, 100)),
        threading.Thread(
            target=never_read,
            args=(proxy.port, deadline, f"/v2/{big.repository}/blobs/{largest.digest}", 20),
        ),
        threading.Thread(target=bodies, args=(proxy.port, deadline, answers)),
    ]
    for thread in threads:
        thread.start()
    pulls = 0
    while time.monotonic() < deadline:
        for image in pulled:
            dest = workdir / "pulls" / f"{image.name}-{pulls}"
            result = skopeo.pull(image.docker_ref(proxy.host_port), dest, check=False)
            if result.returncode != 0:
                failures.append(result.stderr[-500:])
            else:
                assert_pulled(dest, image, upstream_pull(image), all_images=False)
            pulls += 1
    for thread in threads:
        thread.join(30)
    assert not any(thread.is_alive() for thread in threads)
    assert failures == [], failures
    assert pulls >= 4

    # the last hostile connections are closed or timed out within 4 s (the
    # assertion below says by how much they were not)
    with contextlib.suppress(TimeoutError):
        harness.wait_until(lambda: process_numbers(pid)[0] <= fds_before + 10, 4, "closes")
    fds_after, rss_after = process_numbers(pid)
    print(
        f"\nhostile: {pulls} pulls beside them; slowloris cut {cut[0]}/150; "
        f"{len(answers)} body requests; fds {fds_before} -> {fds_after}; "
        f"RSS {rss_before} -> {rss_after} KiB"
    )
    assert cut[0] >= 140  # each cut off by the header deadline, long before SECONDS
    assert answers and all(a[:12] in (b"HTTP/1.1 405", b"HTTP/1.1 413") for a in answers), set(
        answers
    )
    assert fds_after <= fds_before + 10, (fds_before, fds_after)
    assert rss_after <= rss_before + 50 * 1024, (rss_before, rss_after)
    assert "Traceback" not in proxy.log_text()
