#!/usr/bin/env python3
"""The hot path: a cached manifest by tag, regproxy beside its two floors.

Usage, from a venv with regproxy installed (its ``twistd`` runs the proxy)::

    .venv/bin/python bench/hotpath.py [--seconds S] [--profile FILE]

One upstream docker-registry and, on 127.0.0.1, three servers of the same
manifest bytes, measured in the same run with the same client (16 keep-alive
connections, flat out, then 1,000 requests/s for the p99):

* **regproxy**, the manifest cached (the most frequent request a mirror
  answers: every pull starts with one);
* **twisted.web**: a bare ``Resource`` answering fixed bytes with no logic and
  no access log, the floor of any server built on twisted.web;
* **nginx**: the file served with ``sendfile``, the machine's limit.

``--profile FILE`` also runs regproxy under cProfile (twistd's ``--profile``)
and writes its stats to FILE: read them with ``python -m pstats FILE``.
"""

from __future__ import annotations

import argparse
import contextlib
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import load, servers  # noqa: E402
from bench.run import _mkdir, build_image, manifest_path, say, start_upstream  # noqa: E402
from tests.integration import harness, images, regclient  # noqa: E402

ACCEPT = ("Accept", ", ".join(images.MANIFEST_TYPES))

_BARE = """
import sys
from twisted.internet import reactor
from twisted.web.resource import Resource
from twisted.web.server import Site

body = open(sys.argv[2], "rb").read()
media_type = sys.argv[3].encode()

class Fixed(Resource):
    isLeaf = True
    def render_GET(self, request):
        request.setHeader(b"Content-Type", media_type)
        request.setHeader(b"Docker-Content-Digest", b"sha256:" + b"0" * 64)
        return body
    render_HEAD = render_GET

site = Site(Fixed())
site.log = lambda request: None
reactor.listenTCP(int(sys.argv[1]), site, interface="127.0.0.1")
reactor.run()
"""


class BareWeb:
    """A bare twisted.web server of one file's bytes (the framework's floor)."""

    def __init__(self, source: Path, media_type: str) -> None:
        self.port = harness.free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _BARE, str(self.port), str(source), media_type],
            stdin=subprocess.DEVNULL,
        )

        def up() -> bool:
            try:
                return regclient.request(self.url + "/v2/", timeout=2).status == 200
            except OSError:
                return False

        harness.wait_until(up, 20, f"twisted.web on {self.port}")

    def stop(self) -> None:
        harness._terminate(self.proc)


class ProfiledRegProxy(servers.RegProxy):
    """regproxy under twistd's cProfile, its stats written to *stats* at exit."""

    def __init__(self, workdir: Path, config: dict[str, object], stats: Path) -> None:
        super().__init__(workdir, config)
        self.twistd_options = [f"--profile={stats}", "--profiler=cprofile", "--savestats"]


def measure(
    url: str, pid: int | None, path: str, seconds: float, headers: list[tuple[str, str]]
) -> dict[str, float]:
    """Flat out (with the server's CPU time per answer, if its *pid* is
    known), then at 1,000 requests/s for the p99."""
    warm = load.requests(url, "GET", path, headers, 1.0)
    assert warm.ok and not warm.errors, f"{url}{path} is not answered"
    cpu = servers.cpu_seconds(pid)
    flat = load.requests(url, "GET", path, headers, seconds)
    cpu = servers.cpu_seconds(pid) - cpu
    paced = load.requests(url, "GET", path, headers, seconds, rate=1000)
    return {
        "req/s": flat.rate,
        "us cpu": cpu / max(1, flat.ok) * 1e6,
        "errors": flat.errors + paced.errors,
        "p99 ms at 1000/s": paced.percentile(99) * 1000,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="each measurement's length")
    parser.add_argument("--profile", type=Path, help="also profile regproxy into this file")
    parser.add_argument(
        "--access-log", default="twistd", help="regproxy's proxy.access_log (twistd, off, a file)"
    )
    args = parser.parse_args(argv)
    harness.require_binary("docker-registry", "docker-registry")
    harness.require_binary("skopeo", "skopeo")
    with (
        tempfile.TemporaryDirectory(prefix="regproxy-bench-hotpath-") as name,
        contextlib.ExitStack() as stack,
    ):
        tmp = Path(name)
        skopeo = harness.Skopeo(tmp / "skopeo")
        image = build_image(tmp / "layouts", "small", [{"data/small.bin": 4096}])
        upstream = start_upstream(tmp, stack, skopeo, [image])
        path = manifest_path(image)
        config = {
            "upstreams": {"docker.io": {"url": upstream.url}},
            "proxy": {"access_log": args.access_log},
        }
        proxy = (
            ProfiledRegProxy(_mkdir(tmp / "regproxy"), config, args.profile.resolve())
            if args.profile
            else servers.RegProxy(_mkdir(tmp / "regproxy"), config)
        )
        proxy.start()
        stack.callback(proxy.stop)
        manifest = image.layout / "manifest.json"
        nginx = servers.Nginx(_mkdir(tmp / "nginx"), images.OCI_MANIFEST)
        nginx.publish(path, manifest)
        nginx.start()
        stack.callback(nginx.stop)
        bare = BareWeb(manifest, images.OCI_MANIFEST)
        stack.callback(bare.stop)
        results = {}
        for label, url, pid in (
            ("regproxy", proxy.url, proxy.pid),
            ("twisted.web, bare", bare.url, bare.proc.pid),
            ("nginx", nginx.url, nginx.pid),
        ):
            say(f"measuring: {label}")
            results[label] = measure(url, pid, path, args.seconds, [ACCEPT])
    nginx_rate = results["nginx"]["req/s"]
    print(f"\ncached manifest by tag, GET, {args.seconds:g} s each, 16 connections")
    print(
        f"{'':20} {'req/s':>9} {'vs nginx':>9} {'CPU us/answer':>14} "
        f"{'p99 ms at 1000/s':>17} {'errors':>7}"
    )
    for label, r in results.items():
        print(
            f"{label:20} {r['req/s']:9,.0f} {r['req/s'] / nginx_rate:8.2f}x {r['us cpu']:14.0f} "
            f"{r['p99 ms at 1000/s']:17.2f} {r['errors']:7.0f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
