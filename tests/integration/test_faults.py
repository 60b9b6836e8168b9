"""Faults that must leave nothing wrong behind, with real processes: regproxy
killed mid-download, a full disk, and a minute of load."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import random
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from . import harness
from .images import MANIFEST_TYPES, Image
from .shim import TCPShim
from .test_skopeo import assert_pulled, assert_stored, wait_tmp_empty

pytestmark = pytest.mark.integration
MiB = 1024 * 1024


def store_is_sound(proxy: harness.RegProxy) -> None:
    """Every file in the store hashes to its name, and tmp/ is empty."""
    wait_tmp_empty(proxy)
    for path in (proxy.cache_dir / "blobs").rglob("*"):
        if path.is_file():
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            assert digest == path.name, f"{path} does not hash to its name"


def test_regproxy_killed_mid_download_then_restarted(
    test_images: dict[str, Image],
    upstream_pull: Callable[..., Path],
    regproxy: Callable[..., harness.RegProxy],
    tcp_shim: Callable[..., TCPShim],
    skopeo: harness.Skopeo,
    workdir: Path,
) -> None:
    image = test_images["big"]
    layer = image.biggest_layer
    reference = upstream_pull(image)
    shim = tcp_shim()
    shim.rate = 20 * MiB  # bytes/s: slow enough to be caught mid-blob
    proxy = regproxy(shim.url)
    shim.on_response_bytes(16 * MiB, proxy.kill)
    result = skopeo.pull(image.docker_ref(proxy.host_port), workdir / "broken", check=False)
    assert result.returncode != 0
    assert shim.fired.wait(10) and not proxy.running
    partial = proxy.tmp_files()
    assert partial, "the kill should have caught a download half-written"

    shim.disarm()
    shim.rate = None
    proxy.start()
    assert proxy.tmp_files() == [], "leftovers of the interrupted write were not removed"
    assert not proxy.blob_path(layer.digest).exists()
    skopeo.pull(image.docker_ref(proxy.host_port), workdir / "whole")
    assert_pulled(workdir / "whole", image, reference, False)
    assert_stored(proxy, {layer.digest: layer})
    store_is_sound(proxy)


@pytest.mark.parametrize("fault", ["corrupt", "stall"])
def test_upstream_sends_wrong_bytes_or_stalls(
    fault: str,
    test_images: dict[str, Image],
    upstream_pull: Callable[..., Path],
    regproxy: Callable[..., harness.RegProxy],
    tcp_shim: Callable[..., TCPShim],
    skopeo: harness.Skopeo,
    workdir: Path,
) -> None:
    """Through a shim in front of the real registry: one flipped bit in the
    110 MiB layer, or a connection that goes silent halfway. The pull fails,
    nothing is cached, and the next pull is whole."""
    image = test_images["big"]
    layer = image.biggest_layer
    reference = upstream_pull(image)
    shim = tcp_shim()
    proxy = regproxy(shim.url, extra_config={"upstreams": {"docker.io": {"read_timeout": 2}}})
    if fault == "corrupt":
        shim.corrupt_at(64 * MiB)
    else:
        shim.stall_at(16 * MiB)
    started = time.monotonic()
    result = skopeo.pull(image.docker_ref(proxy.host_port), workdir / "broken", check=False)
    assert result.returncode != 0, "a pull of broken bytes succeeded"
    assert shim.fired.wait(10)
    assert time.monotonic() - started < 60
    wait_tmp_empty(proxy)
    assert not proxy.blob_path(layer.digest).exists()
    why = "does not match its digest" if fault == "corrupt" else "upstream sent nothing for 2s"
    assert why in proxy.log_text()

    shim.disarm()
    skopeo.pull(image.docker_ref(proxy.host_port), workdir / "whole")
    assert_pulled(workdir / "whole", image, reference, False)
    assert_stored(proxy, {layer.digest: layer})
    store_is_sound(proxy)


@pytest.fixture
def tmpfs(workdir: Path):
    """``tmpfs(mib)``: a fresh tmpfs of that size, unmounted afterwards."""
    mounted: list[Path] = []

    def mount(mib: int) -> Path:
        mountpoint = workdir / f"disk-{len(mounted)}"
        mountpoint.mkdir()
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={mib}m", "tmpfs", str(mountpoint)], check=True
        )
        mounted.append(mountpoint)
        return mountpoint

    yield mount
    for mountpoint in mounted:
        subprocess.run(["umount", "-l", str(mountpoint)], check=False)


@pytest.fixture
def small_disk(tmpfs: Callable[[int], Path]) -> Path:
    """A 48 MiB tmpfs: too small for the 110 MiB layer."""
    return tmpfs(48)


def test_full_disk_still_serves_every_byte(
    test_images: dict[str, Image],
    upstream_pull: Callable[..., Path],
    regproxy: Callable[..., harness.RegProxy],
    skopeo: harness.Skopeo,
    small_disk: Path,
    workdir: Path,
) -> None:
    image = test_images["big"]
    layer = image.biggest_layer
    reference = upstream_pull(image)
    proxy = regproxy(cache_dir=small_disk / "cache")
    for attempt in ("first", "second"):
        skopeo.pull(image.docker_ref(proxy.host_port), workdir / attempt)
        assert_pulled(workdir / attempt, image, reference, False)
    assert not proxy.blob_path(layer.digest).exists()
    store_is_sound(proxy)
    assert "passing it through uncached" in proxy.log_text()
    # passed through memory with backpressure: never the whole 110 MiB at once
    assert proxy.proc is not None
    status = Path(f"/proc/{proxy.proc.pid}/status").read_text()
    peak_kib = int(next(s for s in status.splitlines() if s.startswith("VmHWM")).split()[1])
    assert peak_kib < 110 * 1024, f"peak RSS {peak_kib} KiB"
    # the small blobs did fit, and are served from the cache
    small = {d: b for d, b in image.blobs.items() if d != layer.digest}
    assert_stored(proxy, small)


def test_disk_filling_up_mid_download_still_serves_every_byte(
    test_images: dict[str, Image],
    upstream_pull: Callable[..., Path],
    regproxy: Callable[..., harness.RegProxy],
    tcp_shim: Callable[..., TCPShim],
    skopeo: harness.Skopeo,
    tmpfs: Callable[[int], Path],
    workdir: Path,
) -> None:
    """The disk has room for the layer when its download starts, then
    something else fills it up: the pull still gets every byte, nothing
    partial is kept, and once there is room again the layer is cached."""
    image = test_images["big"]
    layer = image.biggest_layer
    reference = upstream_pull(image)
    disk = tmpfs(192)
    filler = disk / "filler"

    def fill_up() -> None:
        with open(filler, "wb") as f:
            free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
            os.posix_fallocate(f.fileno(), 0, free - 2 * MiB)

    shim = tcp_shim()
    shim.rate = 20 * MiB
    proxy = regproxy(shim.url, cache_dir=disk / "cache")
    shim.on_response_bytes(32 * MiB, fill_up)
    skopeo.pull(image.docker_ref(proxy.host_port), workdir / "first")
    assert shim.fired.is_set()
    assert_pulled(workdir / "first", image, reference, False)
    assert not proxy.blob_path(layer.digest).exists()
    store_is_sound(proxy)
    assert "the disk filled up while storing" in proxy.log_text()

    filler.unlink()
    shim.disarm()
    shim.rate = None
    skopeo.pull(image.docker_ref(proxy.host_port), workdir / "second")
    assert_pulled(workdir / "second", image, reference, False)
    assert_stored(proxy, {layer.digest: layer})
    store_is_sound(proxy)


# ---------------------------------------------------------------------------
# load: many clients, cached and uncached, for a bounded time
# ---------------------------------------------------------------------------

LOAD_SECONDS = float(os.environ.get("REGPROXY_LOAD_SECONDS", "20"))
CLIENTS = 100


def pull_image(port: int, image: Image, blob_limit: int) -> int:
    """Pull like a client: manifest by tag, then every blob up to *blob_limit*
    bytes, checking each digest. Returns the bytes received."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    received = 0
    try:
        conn.request(
            "GET",
            f"/v2/{image.repository}/manifests/{image.tag}",
            headers={"Accept": ", ".join(MANIFEST_TYPES)},
        )
        response = conn.getresponse()
        body = response.read()
        assert response.status == 200, (response.status, body[:200])
        assert "sha256:" + hashlib.sha256(body).hexdigest() == image.manifest_digest
        for digest, blob in image.blobs.items():
            if blob.size > blob_limit:
                continue
            conn.request("GET", f"/v2/{image.repository}/blobs/{digest}")
            response = conn.getresponse()
            data = response.read()
            assert response.status == 200, (digest, response.status)
            assert "sha256:" + hashlib.sha256(data).hexdigest() == digest, f"{digest} corrupt"
            received += len(data)
    finally:
        conn.close()
    return received


def process_numbers(pid: int) -> tuple[int, int]:
    """(open descriptors, resident KiB)."""
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    status = Path(f"/proc/{pid}/status").read_text()
    rss = int(next(line for line in status.splitlines() if line.startswith("VmRSS")).split()[1])
    return fds, rss


def test_a_minute_of_load(
    test_images: dict[str, Image],
    regproxy: Callable[..., harness.RegProxy],
) -> None:
    """100 clients pull a mix of images for LOAD_SECONDS while the cache is
    purged every few seconds (so pulls are cached and uncached): no failed
    pull, every byte right, and no descriptor or memory growth afterwards."""
    images = [test_images[name] for name in ("multilayer", "dockerimg", "big")]
    proxy = regproxy()
    assert proxy.proc is not None
    pid = proxy.proc.pid
    for image in images:  # warm up, then measure the baseline
        pull_image(proxy.port, image, 200 * MiB)
    time.sleep(1)
    fds_before, rss_before = process_numbers(pid)

    deadline = time.monotonic() + LOAD_SECONDS
    failures: list[str] = []
    pulls = [0]
    lock = threading.Lock()

    def client(n: int) -> None:
        rng = random.Random(n)
        while time.monotonic() < deadline and len(failures) < 10:
            image = rng.choice(images)
            try:
                # the big layer for a few clients only, or the run is all copying
                pull_image(proxy.port, image, 200 * MiB if n % 10 == 0 else 10 * MiB)
            except Exception as e:  # noqa: BLE001 - every failure is a finding
                with lock:
                    failures.append(f"client {n} {image.name}: {type(e).__name__}: {e}")
                return
            with lock:
                pulls[0] += 1

    def purger() -> None:
        while time.monotonic() < deadline:
            time.sleep(5)
            request = http.client.HTTPConnection("127.0.0.1", proxy.admin_port, timeout=30)
            try:
                request.request("DELETE", "/api/v1/cache?all=true")
                reply = request.getresponse()
                body = reply.read()
                if reply.status != 200:
                    failures.append(f"purge: {reply.status} {body[:200]!r}")
            finally:
                request.close()

    threads = [threading.Thread(target=client, args=(n,)) for n in range(CLIENTS)]
    threads.append(threading.Thread(target=purger))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(LOAD_SECONDS + 120)
    assert not any(thread.is_alive() for thread in threads), "clients hung"
    assert failures == [], failures
    assert pulls[0] >= CLIENTS

    time.sleep(2)  # let connections close
    fds_after, rss_after = process_numbers(pid)
    print(
        f"\nload: {CLIENTS} clients, {LOAD_SECONDS:g}s, {pulls[0]} pulls; "
        f"fds {fds_before} -> {fds_after}; RSS {rss_before} -> {rss_after} KiB"
    )
    assert fds_after <= fds_before + 20, (fds_before, fds_after)
    assert rss_after <= rss_before + 100 * 1024, (rss_before, rss_after)
    stats = json.loads(
        harness_get(proxy.admin_port, "/api/v1/stats"),
    )
    assert stats["fetches_in_flight"] == 0
    store_is_sound(proxy)


def harness_get(port: int, path: str) -> bytes:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", path)
        return conn.getresponse().read()
    finally:
        conn.close()
