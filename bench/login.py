#!/usr/bin/env python3
"""What client authentication (proxy.auth) costs on the hot path.

Usage, from a venv with regproxy installed (its ``twistd`` runs the proxy)::

    .venv/bin/python bench/login.py [--seconds S]

One upstream docker-registry and two regproxies on 127.0.0.1: one without
``proxy.auth`` (the reference, measured in the same run) and one with it.
A cached manifest by tag, the most frequent request a mirror answers, is
asked flat out over 16 keep-alive connections, and at 1,000 requests/s
for the p99: without credentials (the reference), with a token from
regproxy's token endpoint (what docker, podman, skopeo and containerd send),
and with Basic credentials on every request (curl -u; bcrypt checks them
once, then a remembered HMAC).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import http.client
import json
import sys
import tempfile
from pathlib import Path

import bcrypt

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import servers  # noqa: E402
from bench.hotpath import measure  # noqa: E402
from bench.run import _mkdir, build_image, manifest_path, say, start_upstream  # noqa: E402
from tests.integration import harness, images  # noqa: E402

ACCEPT = ("Accept", ", ".join(images.MANIFEST_TYPES))
PASSWORD = "bench-password"


def token(url: str, path: str) -> str:
    """A token from regproxy's token endpoint, as clients get one."""
    host_port = url.removeprefix("http://")
    conn = http.client.HTTPConnection(host_port, timeout=30)
    repository = path.split("/manifests/")[0].removeprefix("/v2/")
    basic = base64.b64encode(f"bench:{PASSWORD}".encode()).decode()
    conn.request(
        "GET",
        f"/token?service=regproxy&scope=repository:{repository}:pull",
        headers={"Authorization": f"Basic {basic}"},
    )
    response = conn.getresponse()
    body = response.read()
    assert response.status == 200, body
    return str(json.loads(body)["token"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="each measurement's length")
    args = parser.parse_args(argv)
    harness.require_binary("docker-registry", "docker-registry")
    harness.require_binary("skopeo", "skopeo")
    with (
        tempfile.TemporaryDirectory(prefix="regproxy-bench-login-") as name,
        contextlib.ExitStack() as stack,
    ):
        tmp = Path(name)
        skopeo = harness.Skopeo(tmp / "skopeo")
        image = build_image(tmp / "layouts", "small", [{"data/small.bin": 4096}])
        upstream = start_upstream(tmp, stack, skopeo, [image])
        users = tmp / "htpasswd"
        # cost 10, htpasswd -B's default
        users.write_bytes(b"bench:" + bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(10)) + b"\n")
        upstream_config = {"upstreams": {"docker.io": {"url": upstream.url}}}
        plain = servers.RegProxy(_mkdir(tmp / "plain"), upstream_config)
        guarded = servers.RegProxy(
            _mkdir(tmp / "auth"),
            {**upstream_config, "proxy": {"auth": {"htpasswd": str(users)}}},
        )
        for proxy in (plain, guarded):
            proxy.start()
            stack.callback(proxy.stop)
        path = manifest_path(image)
        basic = base64.b64encode(f"bench:{PASSWORD}".encode()).decode()
        cases = [
            ("no proxy.auth (reference)", plain.url, [ACCEPT]),
            (
                "proxy.auth, Bearer token",
                guarded.url,
                [ACCEPT, ("Authorization", f"Bearer {token(guarded.url, path)}")],
            ),
            (
                "proxy.auth, Basic each request",
                guarded.url,
                [ACCEPT, ("Authorization", f"Basic {basic}")],
            ),
        ]
        results = {}
        for label, url, headers in cases:
            say(f"measuring: {label}")
            results[label] = measure(url, None, path, args.seconds, headers)
    reference = results[cases[0][0]]["req/s"]
    print(f"\ncached manifest by tag, {args.seconds:g} s each, 16 connections")
    print(f"{'':34} {'req/s':>9} {'vs ref':>7} {'p99 ms at 1000/s':>17} {'errors':>7}")
    for label, values in results.items():
        print(
            f"{label:34} {values['req/s']:9,.0f} {values['req/s'] / reference:6.2f}x "
            f"{values['p99 ms at 1000/s']:17.2f} {values['errors']:7.0f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
