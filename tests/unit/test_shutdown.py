"""A stop (SIGTERM) closes both ports, lets the downloads and prefetches in
flight finish for ``proxy.shutdown_grace``, then aborts the rest: their
clients get an aborted connection, never a short 200, and nothing partial is
kept."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest_twisted
from fakeregistry import Fault
from proxyharness import partial_get, settle, until
from twisted.internet import reactor
from twisted.internet.threads import deferToThread

from registryproxy.cache.index import Index
from registryproxy.tap import Options, _Closing, makeService

SIZE = 2 * 1024 * 1024 + 3
#: the grace of a stop, and a download that ends well within it (0.4 s)
GRACE = 1.2
QUICK = 512 * 1024
TWISTD = str(Path(sys.executable).parent / "twistd")


def write_config(tmp_path: Path, registry_url: str, grace: float, port: int = 0) -> Path:
    path = tmp_path / "regproxy.yaml"
    config = {
        "proxy": {"listen": f"tcp:{port}:interface=127.0.0.1", "shutdown_grace": grace},
        "admin": {"listen": "tcp:0:interface=127.0.0.1"},
        "cache": {"directory": str(tmp_path / "cache")},
        "upstreams": {"docker.io": {"url": registry_url, "read_timeout": 30, "min_rate": None}},
    }
    path.write_text(json.dumps(config))
    return path


async def started(tmp_path: Path, registry_url: str, grace: float) -> tuple[Any, Any, list[int]]:
    """regproxy as twistd runs it, in this reactor: (its service, its proxy, its two ports)."""
    options = Options()
    options.parseOptions(["--config", str(write_config(tmp_path, registry_url, grace))])
    service = makeService(options, reactor)
    ports: list[int] = []
    service.privilegedStartService()
    service.startService()
    for child in service:
        if getattr(child, "_waitingForPort", None) is not None:
            ports.append(await _port(child))
    proxy = next(child for child in service if isinstance(child, _Closing))._proxy
    return service, proxy, ports


async def _port(listener: Any) -> int:
    port: list[Any] = []
    listener._waitingForPort.addCallback(lambda p: port.append(p) or p)
    await until(lambda: port)
    return port[0].getHost().port


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


def get(port: int, path: str) -> Any:
    return deferToThread(partial_get, f"http://127.0.0.1:{port}", path)


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@pytest_twisted.ensureDeferred
async def test_a_stop_lets_downloads_finish_for_the_grace_then_aborts_the_rest(
    tmp_path, fake_registry
):
    quick = os.urandom(QUICK)
    quickly = fake_registry.blob_faults[fake_registry.add_blob(quick)] = Fault.slow(64 * 1024, 0.05)
    stuck = os.urandom(SIZE)  # half, then silence
    fake_registry.blob_faults[fake_registry.add_blob(stuck)] = Fault.stall(after=SIZE // 2)
    layer = os.urandom(QUICK)  # a prefetch's
    fake_registry.add_image("library/app", "1", [layer])
    prefetched = fake_registry.blob_faults[digest_of(layer)] = Fault.slow(64 * 1024, 0.05)
    service, proxy, (port, admin_port) = await started(tmp_path, fake_registry.url, GRACE)
    quick_get = get(port, f"/v2/library/x/blobs/{digest_of(quick)}")
    stuck_get = get(port, f"/v2/library/x/blobs/{digest_of(stuck)}")
    proxy.control.prefetch("docker.io", "library/app", "1", None)
    await until(lambda: proxy.blobs.downloading == 3)
    began = reactor.seconds()
    stopped = service.stopService()
    await settle(0.1)
    assert refused(port) and refused(admin_port)  # no new connection on either port
    quickly.delay = prefetched.delay = 0  # the rest at once: within the grace, loaded or not
    # a download that ends within the grace is served whole, and kept
    assert await quick_get == (200, quick, False)
    # one that does not is aborted: its client never gets a short 200 that looks whole
    status, body, short = await stuck_get
    assert (status, short) == (200, True)
    assert body == stuck[: len(body)] and len(body) < SIZE
    await stopped
    assert GRACE - 0.2 <= reactor.seconds() - began < GRACE + 6
    (job,) = proxy.control.prefetch_jobs()
    assert job.state == "done"
    cache = tmp_path / "cache"
    index = Index(str(cache / "index.db"))
    try:
        kept = index.blob_sizes([digest_of(quick), digest_of(layer), digest_of(stuck)])
    finally:
        index.close()
    assert kept == {digest_of(quick): len(quick), digest_of(layer): len(layer)}
    assert os.listdir(cache / "tmp") == []  # nothing partial kept
    assert fake_registry.count("GET", "/blobs/") == 4  # config, layer, quick, stuck


@pytest_twisted.ensureDeferred
async def test_a_stop_with_nothing_in_flight_does_not_wait(tmp_path, fake_registry):
    service, proxy, (port, _) = await started(tmp_path, fake_registry.url, grace=30)
    # a keep-alive connection, idle between requests, does not hold the stop up
    idle = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        idle.sendall(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await deferToThread(idle.recv, 4096)).startswith(b"HTTP/1.1 200")
        assert len(proxy.site.connections) == 1
        began = reactor.seconds()
        await service.stopService()
        assert reactor.seconds() - began < 2
    finally:
        idle.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            return True
    except OSError:
        return False


@pytest_twisted.ensureDeferred
async def test_sigterm_mid_download_finishes_or_aborts_keeps_nothing_partial_and_exits(
    tmp_path, fake_registry
):
    """The real twistd (``pip install .`` first): SIGTERM while one download
    is about to end and another is stuck half-way.  The first is served
    whole and kept; after the grace the other's client connection is
    aborted, its temporary file removed, nothing published; the process exits."""
    quick = os.urandom(QUICK)
    trickle = fake_registry.blob_faults[fake_registry.add_blob(quick)] = Fault.slow(64 * 1024, 0.05)
    stuck = os.urandom(SIZE)
    fake_registry.blob_faults[fake_registry.add_blob(stuck)] = Fault.stall(after=SIZE // 2)
    port = free_port()
    config = write_config(tmp_path, fake_registry.url, GRACE, port=port)
    log = tmp_path / "regproxy.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [TWISTD, "-n", "--pidfile=", "regproxy", "--config", str(config)],
            cwd=tmp_path,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        await until(lambda: process.poll() is not None or answers(port), timeout=30)
        assert process.poll() is None, log.read_text()
        stuck_get = deferToThread(
            partial_get, f"http://127.0.0.1:{port}", f"/v2/x/blobs/{digest_of(stuck)}", 1, 0, True
        )
        temp = tmp_path / "cache" / "tmp"
        await until(lambda: any(f.stat().st_size >= SIZE // 2 for f in temp.iterdir()))
        quick_get = get(port, f"/v2/x/blobs/{digest_of(quick)}")
        await until(lambda: fake_registry.count("GET", "/blobs/") == 2)
        process.send_signal(signal.SIGTERM)
        trickle.delay = 0  # the rest at once: within the grace on a loaded machine too
        assert await quick_get == (200, quick, False)
        status, body, short = await stuck_get
        assert (status, short) == (200, True)  # aborted: never a short body that looks whole
        assert body == stuck[: len(body)]
        # twistd, its shutdown done, ends by the signal it got
        assert await deferToThread(process.wait, 30) == -signal.SIGTERM
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    text = log.read_text()
    assert (
        f"still running after {GRACE:.1f}s: 1 downloads" in text
        and "regproxy is shutting down" in text
    ), text
    assert text.rstrip().endswith("Server Shut Down."), text
    assert os.listdir(temp) == []
    index = Index(str(tmp_path / "cache" / "index.db"))
    try:
        kept = index.blob_sizes([digest_of(quick), digest_of(stuck)])
    finally:
        index.close()
    assert kept == {digest_of(quick): len(quick)}
    assert not list((tmp_path / "cache" / "blobs").rglob(digest_of(stuck).split(":")[1]))
