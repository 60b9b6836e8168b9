"""An https upstream with a private CA: trusted through ca_file, refused without it."""

from __future__ import annotations

import json

import pytest_twisted
from tlscerts import make_ca_and_server_cert
from twisted.internet.ssl import PrivateCertificate


@pytest_twisted.ensureDeferred
async def test_private_ca_upstream(make_fake_registry, make_proxy, tmp_path):
    ca_pem, server_pem = make_ca_and_server_cert()
    tls = PrivateCertificate.loadPEM(server_pem.decode()).options()
    registry = await make_fake_registry(tls=tls)
    digest, body = registry.add_image("team/app", "1", [b"over tls"])
    (tmp_path / "ca.pem").write_bytes(ca_pem)

    trusting = await make_proxy(
        "http://127.0.0.1:9",
        cache_dir=tmp_path / "a",
        upstreams={"internal.example": {"url": registry.url, "ca_file": str(tmp_path / "ca.pem")}},
    )
    reply = await trusting.get("/v2/internal.example/team/app/manifests/1")
    assert (reply.code, reply.body) == (200, body)

    untrusting = await make_proxy(
        "http://127.0.0.1:9",
        cache_dir=tmp_path / "b",
        upstreams={"internal.example": {"url": registry.url}},
    )
    reply = await untrusting.get("/v2/internal.example/team/app/manifests/1")
    assert reply.code == 502
    assert "internal.example" in json.loads(reply.body)["errors"][0]["message"]
