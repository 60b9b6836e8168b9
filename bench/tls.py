#!/usr/bin/env python3
"""Warm blob throughput over TLS beside plain TCP (sendfile), in one run.

Usage, from a venv with regproxy installed (its ``twistd`` runs the proxy)::

    .venv/bin/python bench/tls.py [--size MIB] [--runs N] [--keep]

Two regproxy processes with the same configuration but their port: one on
``tcp:`` (a cached blob leaves with ``sendfile``), one on ``ssl:`` with a
private CA (a cached blob is read into memory and encrypted by OpenSSL on the
reactor thread).  Their upstream is nginx serving the blob file as
``/v2/library/big/blobs/<digest>``.  Each proxy fetches the blob once (cold,
not measured), then each answers *runs* warm GETs, taking turns; the client
reads with ``recv_into`` (over TLS it decrypts, on the other core).  Prints
the median MB/s, regproxy's CPU seconds per GB sent, and TLS / plain.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import ssl
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import load, servers  # noqa: E402
from bench.run import CpuWatch  # noqa: E402
from tests.integration import harness  # noqa: E402
from tests.tlscerts import CA  # noqa: E402

MiB = 1024 * 1024
MB = 1_000_000
REPOSITORY = "library/big"


def write_blob(path: Path, size: int) -> str:
    """*size* random bytes in *path*; their digest."""
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        for offset in range(0, size, MiB):
            chunk = os.urandom(min(MiB, size - offset))
            digest.update(chunk)
            f.write(chunk)
    return f"sha256:{digest.hexdigest()}"


def write_certificates(directory: Path) -> tuple[Path, Path]:
    """(CA file, key + certificate file for 127.0.0.1)."""
    ca = CA.make("regproxy bench CA")
    (directory / "ca.pem").write_bytes(ca.pem)
    (directory / "server.pem").write_bytes(ca.issue(ips=["127.0.0.1"]))
    return directory / "ca.pem", directory / "server.pem"


def fetch(
    proxy: servers.RegProxy, path: str, size: int, tls: ssl.SSLContext | None
) -> tuple[float, float, str | None]:
    """One GET: (MB/s, regproxy CPU seconds, X-Cache)."""
    cpu = servers.cpu_seconds(proxy.pid)
    got = load.download(proxy.url, path, deadline=time.monotonic() + 300, tls=tls)
    used = servers.cpu_seconds(proxy.pid) - cpu
    if not got.ok or got.size != size:
        raise RuntimeError(f"GET {proxy.url}{path}: {got}")
    return size / got.seconds / MB, used, got.headers.get("x-cache")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=1024, help="blob MiB (1024)")
    parser.add_argument("--runs", type=int, default=5, help="warm GETs per proxy (5)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args(argv)
    size = args.size * MiB
    work = Path(tempfile.mkdtemp(prefix="regproxy-bench-tls-"))
    running: list[servers.RegProxy | servers.Nginx] = []
    try:
        blob = work / "blob"
        digest = write_blob(blob, size)
        path = f"/v2/{REPOSITORY}/blobs/{digest}"
        upstream = servers.Nginx(work / "nginx", "application/vnd.oci.image.manifest.v1+json")
        upstream.publish(path, blob)
        upstream.start()
        running.append(upstream)
        ca_file, server_pem = write_certificates(work)
        tls = ssl.create_default_context(cafile=str(ca_file))
        tls_listen = f"ssl:{harness.free_port()}:interface=127.0.0.1:privateKey={server_pem}"
        proxies = {}
        for name, listen in (("plain", {}), ("tls", {"listen": tls_listen})):
            proxy = servers.RegProxy(
                work / name,
                {
                    "proxy": {**listen, "access_log": "off"},
                    "upstreams": {"docker.io": {"url": upstream.url}},
                    "default_upstream": "docker.io",
                },
            )
            proxy.start()
            running.append(proxy)
            proxies[name] = proxy
        contexts = {"plain": None, "tls": tls}
        for name, proxy in proxies.items():
            print(f"{name}: cold fetch of {args.size} MiB", file=sys.stderr)
            fetch(proxy, path, size, contexts[name])
        rates: dict[str, list[float]] = {name: [] for name in proxies}
        cpu: dict[str, float] = dict.fromkeys(proxies, 0.0)
        watch = CpuWatch()
        for run in range(args.runs):
            for name, proxy in proxies.items():
                rate, used, cache = fetch(proxy, path, size, contexts[name])
                if cache != "HIT":
                    raise RuntimeError(f"{name}: warm GET answered X-Cache: {cache}")
                rates[name].append(rate)
                cpu[name] += used
                print(f"run {run + 1} {name}: {rate:.0f} MB/s", file=sys.stderr)
        sent = args.runs * size / 1e9
        print(f"warm {args.size} MiB blob, {args.runs} GETs each, one client, median:")
        print(f"{'':8}{'MB/s':>8}{'regproxy CPU s/GB':>20}")
        for name in proxies:
            median = statistics.median(rates[name])
            print(f"{name:8}{median:8.0f}{cpu[name] / sent:20.2f}")
        ratio = statistics.median(rates["tls"]) / statistics.median(rates["plain"])
        print(f"tls / plain: {ratio:.2f}")
        # the proxies are this script's children, not reaped: not "ours" to CpuWatch
        other, share = watch.others()
        mine = sum(cpu.values())
        share *= max(0.0, other - mine) / max(1e-9, other)
        print(f"other processes on this machine meanwhile: {share:.0%} of its CPU")
        return 0
    finally:
        for server in reversed(running):
            server.stop()
        if args.keep:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
