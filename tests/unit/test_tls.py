"""An https upstream with a private CA: trusted through ca_file, refused without it."""

from __future__ import annotations

import datetime
import json

import pytest_twisted
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet.ssl import PrivateCertificate


def make_ca_and_server_cert() -> tuple[bytes, bytes]:
    """(CA certificate PEM, server key+certificate PEM for 'localhost')."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "regproxy test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    server = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ) + cert.public_bytes(serialization.Encoding.PEM)
    return ca.public_bytes(serialization.Encoding.PEM), server


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
