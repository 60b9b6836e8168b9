"""A small token server in the manner of auth.docker.io, for integration tests.

Distribution's ``auth.token`` sends clients here with a 401 ``WWW-Authenticate:
Bearer realm=...,service=...,scope=...``. We answer ``GET /token?service=...
&scope=repository:NAME:pull[,push]`` (optionally with HTTP Basic credentials)
and the OAuth2 ``POST /token`` form (``grant_type=password``) that containerd
prefers, with an RS256 JWT whose header carries the signing certificate in
``x5c``; the registry trusts that certificate through ``rootcertbundle``.

Who gets what, as on Docker Hub:

- anonymous: ``pull`` on every repository except ``private/...`` (empty actions);
- a known user with the right password: ``pull`` everywhere, plus ``push`` if the
  account may push;
- a wrong password: 401, no token.

It runs in a daemon thread of the test process (no reactor needed); it also runs
standalone: ``python tokenserver.py --port 0 --service S --issuer I --cert-out F``.
"""

from __future__ import annotations

import base64
import datetime
import json
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

PRIVATE_PREFIX = "private/"


@dataclass(frozen=True)
class Account:
    password: str
    can_push: bool = False


@dataclass
class TokenRequest:
    """One request the server answered, for tests to inspect."""

    method: str
    account: str | None  # None: anonymous
    scopes: list[str]
    status: int
    granted: list[dict[str, Any]] = field(default_factory=list)


def _make_signing_cert() -> tuple[rsa.RSAPrivateKey, x509.Certificate]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "regproxy test token signer")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def parse_scope(scope: str) -> tuple[str, str, list[str]] | None:
    """``repository:library/x:pull,push`` -> ``("repository", "library/x", ["pull", "push"])``."""
    kind, sep, rest = scope.partition(":")
    name, sep2, actions = rest.rpartition(":")
    if not sep or not sep2 or not name:
        return None
    return kind, name, [a for a in actions.split(",") if a]


class TokenServer:
    def __init__(
        self,
        service: str = "registry.test",
        issuer: str = "tokenserver.test",
        accounts: dict[str, Account] | None = None,
        expires_in: int = 300,
    ) -> None:
        self.service = service
        self.issuer = issuer
        self.accounts = dict(accounts or {})
        #: seconds a token lives; tests may lower it to exercise refreshes
        self.expires_in = expires_in
        self.requests: list[TokenRequest] = []
        self._lock = threading.Lock()
        self._key, self._cert = _make_signing_cert()
        self._x5c = [base64.b64encode(self._cert.public_bytes(serialization.Encoding.DER)).decode()]
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------
    @property
    def cert_pem(self) -> bytes:
        return self._cert.public_bytes(serialization.Encoding.PEM)

    def write_cert(self, path: Path) -> Path:
        path.write_bytes(self.cert_pem)
        return path

    def start(self, port: int = 0) -> None:
        server = self

        class Handler(_Handler):
            token_server = server

        self._httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, name="tokenserver", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    @property
    def port(self) -> int:
        assert self._httpd is not None, "token server not started"
        return self._httpd.server_address[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def realm(self) -> str:
        return f"{self.url}/token"

    def requests_since(self, index: int) -> list[TokenRequest]:
        with self._lock:
            return self.requests[index:]

    def mark(self) -> int:
        """An index to pass to :meth:`requests_since` later."""
        with self._lock:
            return len(self.requests)

    # -- policy ------------------------------------------------------------
    def authenticate(self, username: str | None, password: str | None) -> tuple[bool, str | None]:
        """(ok, account): ``(True, None)`` is anonymous."""
        if username is None:
            return True, None
        account = self.accounts.get(username)
        if account is None or account.password != password:
            return False, username
        return True, username

    def grant(self, account: str | None, scopes: list[str]) -> list[dict[str, Any]]:
        access = []
        for scope in scopes:
            parsed = parse_scope(scope)
            if parsed is None:
                continue
            kind, name, wanted = parsed
            if kind != "repository":
                access.append({"type": kind, "name": name, "actions": []})
                continue
            allowed: set[str] = set()
            if account is not None:
                allowed.add("pull")
                if self.accounts[account].can_push:
                    allowed.update(("push", "*", "delete"))
            elif not name.startswith(PRIVATE_PREFIX):
                allowed.add("pull")
            access.append(
                {"type": "repository", "name": name, "actions": [a for a in wanted if a in allowed]}
            )
        return access

    def issue(self, account: str | None, access: list[dict[str, Any]]) -> dict[str, Any]:
        now = int(time.time())
        claims = {
            "iss": self.issuer,
            "sub": account or "",
            "aud": self.service,
            "exp": now + self.expires_in,
            "nbf": now - 10,
            "iat": now,
            "jti": uuid.uuid4().hex,
            "access": access,
        }
        token = jwt.encode(claims, self._key, algorithm="RS256", headers={"x5c": self._x5c})
        issued_at = datetime.datetime.fromtimestamp(now, datetime.UTC)
        return {
            "token": token,
            "access_token": token,
            "expires_in": self.expires_in,
            "issued_at": issued_at.strftime("%Y-%m-%dT%H:%M:%SZ"),
        }

    def _record(self, request: TokenRequest) -> None:
        with self._lock:
            self.requests.append(request)


class _Handler(BaseHTTPRequestHandler):
    token_server: TokenServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass  # keep pytest output clean; tests read TokenServer.requests

    def _reply(
        self, status: int, body: dict[str, Any], extra: dict[str, str] | None = None
    ) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def _basic(self) -> tuple[str | None, str | None]:
        header = self.headers.get("Authorization", "")
        if not header.lower().startswith("basic "):
            return None, None
        try:
            user, _, password = base64.b64decode(header[6:]).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            return "", ""
        return user, password

    def _answer(
        self, method: str, user: str | None, password: str | None, q: dict[str, list[str]]
    ) -> None:
        ts = self.token_server
        scopes = [s for value in q.get("scope", []) for s in value.split(" ") if s]
        service = (q.get("service") or [ts.service])[0]
        if service != ts.service:
            ts._record(TokenRequest(method, user, scopes, 400))
            self._reply(400, {"details": f"unknown service {service!r}"})
            return
        ok, account = ts.authenticate(user, password)
        if not ok:
            ts._record(TokenRequest(method, user, scopes, 401))
            self._reply(
                401,
                {"details": "incorrect username or password"},
                {"WWW-Authenticate": 'Basic realm="tokenserver"'},
            )
            return
        access = ts.grant(account, scopes)
        ts._record(TokenRequest(method, account, scopes, 200, access))
        self._reply(200, ts.issue(account, access))

    def do_GET(self) -> None:  # noqa: N802
        parts = urlsplit(self.path)
        if parts.path != "/token":
            self._reply(404, {"details": "not found"})
            return
        user, password = self._basic()
        self._answer("GET", user, password, parse_qs(parts.query))

    def do_POST(self) -> None:  # noqa: N802
        parts = urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        form = parse_qs(self.rfile.read(length).decode())
        if parts.path != "/token":
            self._reply(404, {"details": "not found"})
            return
        grant_type = (form.get("grant_type") or [""])[0]
        if grant_type != "password":
            # We hand out no refresh tokens; a 400 makes clients use GET.
            self._reply(400, {"error": "unsupported_grant_type"})
            return
        user = form["username"][0] if form.get("username") else None
        password = form["password"][0] if form.get("password") else None
        self._answer("POST", user, password, form)


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--service", default="registry.test")
    parser.add_argument("--issuer", default="tokenserver.test")
    parser.add_argument("--cert-out", type=Path, required=True)
    parser.add_argument("--account", action="append", default=[], help="user:password[:push]")
    args = parser.parse_args()
    accounts = {}
    for spec in args.account:
        user, password, *rest = spec.split(":")
        accounts[user] = Account(password, can_push=rest == ["push"])
    server = TokenServer(args.service, args.issuer, accounts)
    server.write_cert(args.cert_out)
    server.start(args.port)
    print(server.url, flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        server.stop()


if __name__ == "__main__":
    main()
