"""proxy.listen as ssl: and proxy.client_ca, checked as the config is read."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cryptography import x509
from tlscerts import CA

from registryproxy.config import Config, ConfigError, parse_config
from registryproxy.proxy.tls import parse_listen


def load(proxy: dict[str, object]) -> Config:
    return parse_config(json.dumps({"proxy": proxy}))


@pytest.fixture
def files(tmp_path: Path) -> Path:
    ca = CA.make()
    pem = ca.issue()
    split = pem.index(b"-----BEGIN CERTIFICATE-----")
    (tmp_path / "key.pem").write_bytes(pem[:split])
    (tmp_path / "cert.pem").write_bytes(pem[split:])
    (tmp_path / "both.pem").write_bytes(pem)
    (tmp_path / "ca.pem").write_bytes(ca.pem)
    (tmp_path / "other-key.pem").write_bytes(ca.issue()[:split])
    (tmp_path / "expired.pem").write_bytes(ca.issue(expired=True))
    (tmp_path / "text").write_text("hello\n")
    return tmp_path


def test_the_issues_shape_loads(files):
    listen = f"ssl:5443:privateKey={files}/key.pem:certKey={files}/cert.pem"
    config = load({"listen": listen, "client_ca": f"{files}/ca.pem"})
    assert (config.proxy.listen, config.proxy.client_ca) == (listen, f"{files}/ca.pem")
    tls = parse_listen(listen)
    assert tls is not None
    assert (tls.tcp, tls.private_key, tls.cert, tls.chain) == (
        "tcp:5443",
        f"{files}/key.pem",
        f"{files}/cert.pem",
        None,
    )


def test_tcp_parts_pass_through_and_the_key_file_may_hold_the_certificate(files):
    tls = parse_listen(
        f"ssl:port=5443:interface=\\:\\:1:backlog=9:privateKey={files}/both.pem"
        f":extraCertChain={files}/ca.pem"
    )
    assert tls is not None
    assert (tls.tcp, tls.cert, tls.chain) == (
        "tcp:port=5443:interface=\\:\\:1:backlog=9",
        f"{files}/both.pem",
        f"{files}/ca.pem",
    )
    assert parse_listen("tcp:5000") is None


@pytest.mark.parametrize(
    ("proxy", "message"),
    [
        (
            {"listen": "ssl:5443:privateKey={d}/missing.pem:certKey={d}/cert.pem"},
            "proxy: listen: cannot read privateKey '{d}/missing.pem': No such file or directory",
        ),
        (
            {"listen": "ssl:5443:privateKey={d}/key.pem:certKey={d}/text"},
            "proxy: listen: no PEM certificate in certKey '{d}/text'",
        ),
        (
            {"listen": "ssl:5443:privateKey={d}/other-key.pem:certKey={d}/cert.pem"},
            "proxy: listen: the private key in '{d}/other-key.pem' does not match the "
            "certificate in '{d}/cert.pem'",
        ),
        (
            {"listen": "ssl:5443:privateKey={d}/expired.pem"},
            "proxy: listen: the certificate in '{d}/expired.pem' expired on {expiry}",
        ),
        (
            {"listen": "ssl:5443:privateKey={d}/key.pem:certKey={d}/cert.pem:sslmethod=TLS"},
            "proxy: listen: 'ssl:5443:privateKey={d}/key.pem:certKey={d}/cert.pem:sslmethod=TLS'"
            ": 'sslmethod' is not supported here (use port, interface, backlog, privateKey, "
            "certKey, extraCertChain)",
        ),
        (
            {"listen": "ssl:5443:certKey={d}/cert.pem"},
            "proxy: listen: 'ssl:5443:certKey={d}/cert.pem': privateKey=FILE is missing",
        ),
        (
            {
                "listen": "ssl:5443:privateKey={d}/key.pem:certKey={d}/cert.pem",
                "client_ca": "{d}/text",
            },
            "proxy: client_ca: no PEM certificate in CA file '{d}/text'",
        ),
        (
            {"listen": "tcp:5000", "client_ca": "{d}/ca.pem"},
            "proxy: client_ca: clients show certificates only over TLS: listen on "
            "'ssl:PORT:privateKey=KEY:certKey=CERT', or remove client_ca",
        ),
    ],
    ids=[
        "unreadable",
        "no-cert",
        "mismatch",
        "expired",
        "unsupported",
        "no-key",
        "bad-ca",
        "ca-without-tls",
    ],
)
def test_one_line_naming_the_key(files, proxy, message):
    with pytest.raises(ConfigError) as raised:
        load({key: value.format(d=files) for key, value in proxy.items()})
    expired = (files / "expired.pem").read_bytes()
    expiry = x509.load_pem_x509_certificate(expired).not_valid_after_utc
    assert str(raised.value) == "<config>: " + message.format(d=files, expiry=expiry)
