#!/usr/bin/env python3
"""Python's cost of one cached manifest answer, regproxy beside bare twisted.web.

Usage, from a venv with regproxy and its test extras installed::

    .venv/bin/python bench/answercost.py [--requests N] [--access-log twistd|off]

Both servers are driven in this process through an in-memory transport (no
sockets, no kernel): the same keep-alive ``GET`` of a cached manifest by tag,
N times, timed by this thread's CPU clock, in 5 alternating rounds (the least of
each counts: other load on the machine only adds).  What remains is the Python each
answer costs, the part regproxy controls; ``bench/hotpath.py`` measures the
whole thing over real sockets beside nginx.  Less noisy than throughput on a
busy machine, so steps of the hot path can be told apart.  The proxy's
upstream is the tests' in-process FakeRegistry on 127.0.0.1 (asked once).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # the fake registry's own imports

from fakeregistry import FakeRegistry  # noqa: E402
from twisted.internet import reactor  # noqa: E402
from twisted.internet.address import IPv4Address  # noqa: E402
from twisted.internet.defer import ensureDeferred  # noqa: E402
from twisted.internet.testing import StringTransport  # noqa: E402
from twisted.logger import globalLogBeginner, textFileLogObserver  # noqa: E402
from twisted.web.resource import Resource  # noqa: E402
from twisted.web.server import Site  # noqa: E402

from registryproxy.config import parse_config  # noqa: E402
from registryproxy.tap import build_proxy  # noqa: E402

ACCEPT = (
    "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json, "
    "application/vnd.docker.distribution.manifest.v2+json, "
    "application/vnd.docker.distribution.manifest.list.v2+json"
)
PATH = "/v2/library/app/manifests/1"
ROUNDS = 5


class _Fixed(Resource):
    isLeaf = True

    def __init__(self, body: bytes, media_type: bytes) -> None:
        super().__init__()
        self.body, self.media_type = body, media_type

    def render_GET(self, request: Any) -> bytes:
        request.setHeader(b"Content-Type", self.media_type)
        request.setHeader(b"Docker-Content-Digest", b"sha256:" + b"0" * 64)
        return self.body


class Driven:
    """One keep-alive connection to *site* over an in-memory transport;
    *split*: each request in two reads, which regproxy never answers before
    twisted.web parses it (its whole path)."""

    def __init__(self, site: Any, request: bytes, split: bool = False) -> None:
        site.doStart()  # as a listening port does: opens the access log
        self.site, self.request, self.split = site, request, split
        address = IPv4Address("TCP", "127.0.0.1", 40000)
        self.protocol = site.buildProtocol(address)
        self.transport = StringTransport(peerAddress=address)
        self.protocol.makeConnection(self.transport)
        self.last = b""

    def cost(self, count: int) -> float:
        """CPU seconds per answer over *count* answers."""
        protocol, transport, request = self.protocol, self.transport, self.request
        reads = [request[:-2], request[-2:]] if self.split else [request]
        start = time.thread_time()
        for _ in range(count):
            for read in reads:
                protocol.dataReceived(read)
            transport.clear()
        seconds = (time.thread_time() - start) / count
        for read in reads:
            protocol.dataReceived(read)
        self.last = transport.value()
        transport.clear()
        return seconds

    def close(self) -> None:
        self.protocol.connectionLost(None)
        self.site.doStop()


async def measure(count: int, access_log: str, tmp: Path) -> dict[str, float]:
    registry = await FakeRegistry.start(reactor)
    registry.add_image("library/app", "1", [b"layer"], "oci")
    config = parse_config(
        json.dumps(
            {
                "cache": {"directory": str(tmp / "cache"), "tag_ttl": 3600},
                "upstreams": {"docker.io": {"url": registry.url}},
                "proxy": {"access_log": access_log},
            }
        )
    )
    proxy = build_proxy(config, reactor)
    request = (
        f"GET {PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: bench\r\nAccept: {ACCEPT}\r\n\r\n"
    ).encode()
    # the first answer goes upstream: let it land in the cache
    protocol = proxy.site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40001))
    transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 40001))
    protocol.makeConnection(transport)
    protocol.dataReceived(request)
    for _ in range(500):
        if transport.value().count(b"\r\n\r\n") and b"200 OK" in transport.value():
            break
        await _later(0.01)
    head, _, body = transport.value().partition(b"\r\n\r\n")
    assert b"200 OK" in head, head
    media_type = next(
        line.split(b": ", 1)[1] for line in head.split(b"\r\n") if line.startswith(b"Content-Type")
    )
    bare_site = Site(_Fixed(body, media_type))
    bare_site.log = lambda request: None  # type: ignore[method-assign]
    driven = {
        "regproxy": Driven(proxy.site, request),
        "whole path": Driven(proxy.site, request, split=True),
        "bare": Driven(bare_site, request),
    }
    costs: dict[str, list[float]] = {name: [] for name in driven}
    for _ in range(ROUNDS):  # alternating, the least of each: other load only adds
        for name, one in driven.items():
            one.cost(200)  # warm up
            costs[name].append(one.cost(count // ROUNDS))
            await _later(0)  # a reactor turn: the access log written
    for name in ("regproxy", "whole path"):
        assert b"X-Cache: HIT" in driven[name].last, driven[name].last[:400]
    for one in driven.values():
        one.close()
    for name, values in costs.items():
        print(f"  {name} by round (us): {', '.join(f'{v * 1e6:.0f}' for v in values)}")
    return {name: min(values) for name, values in costs.items()}


def _later(seconds: float) -> Any:
    from twisted.internet.task import deferLater

    return deferLater(reactor, seconds, lambda: None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--access-log", default="twistd", help="proxy.access_log")
    args = parser.parse_args(argv)
    # what twistd does: every log event formatted into a file
    globalLogBeginner.beginLoggingTo(
        [textFileLogObserver(open("/dev/null", "w"))],  # noqa: SIM115
        redirectStandardIO=False,
    )
    results: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="regproxy-answercost-") as name:

        async def run() -> None:
            results.update(await measure(args.requests, args.access_log, Path(name)))

        def go() -> None:
            d = ensureDeferred(run())
            d.addErrback(lambda f: (f.printTraceback(), None)[1])
            d.addBoth(lambda _: reactor.stop())  # type: ignore[attr-defined]

        reactor.callWhenRunning(go)  # type: ignore[attr-defined]
        reactor.run()  # type: ignore[attr-defined]
    if not results:
        return 1
    print(
        f"cached manifest GET, in process, {args.requests:,} answers, access_log {args.access_log}"
    )
    print(f"  regproxy          {results['regproxy'] * 1e6:7.1f} us CPU per answer")
    print(f"  its whole path    {results['whole path'] * 1e6:7.1f} us CPU per answer")
    print(f"  twisted.web bare  {results['bare'] * 1e6:7.1f} us CPU per answer")
    print(f"  regproxy / bare   {results['regproxy'] / results['bare']:7.2f}x")
    print(f"  whole path / bare {results['whole path'] / results['bare']:7.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
