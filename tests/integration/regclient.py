"""Plain HTTP against a registry or the proxy, with Bearer-token handling.

Blocking urllib on purpose: integration tests are synchronous and drive
subprocesses; this is for the few direct requests a test makes itself (a blob
GET to read ``X-Cache``, the reference manifest bytes). Proxies from the
environment are ignored: everything here is on 127.0.0.1.
"""

from __future__ import annotations

import base64
import json
import re
import urllib.error
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass, field
from email.message import Message
from urllib.parse import urlencode

_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass
class Response:
    status: int
    headers: Message
    body: bytes
    url: str = ""

    def header(self, name: str) -> str | None:
        return self.headers.get(name)

    def json(self) -> object:
        return json.loads(self.body)


def request(
    url: str,
    method: str = "GET",
    headers: dict[str, str] | Iterable[tuple[str, str]] | None = None,
    timeout: float = 30.0,
) -> Response:
    """One request, any status: an HTTP error is a :class:`Response` too."""
    req = urllib.request.Request(url, method=method)
    for k, v in headers.items() if isinstance(headers, dict) else headers or ():
        req.add_header(k, v)
    try:
        with _opener.open(req, timeout=timeout) as resp:
            return Response(resp.status, resp.headers, resp.read(), url)
    except urllib.error.HTTPError as e:
        with e:
            return Response(e.code, e.headers, e.read(), url)


_CHALLENGE_PARAM = re.compile(r'(\w+)="([^"]*)"')


def parse_bearer_challenge(header: str) -> dict[str, str]:
    """``Bearer realm="...",service="...",scope="..."`` -> dict."""
    scheme, _, params = header.partition(" ")
    if scheme.lower() != "bearer":
        return {}
    return dict(_CHALLENGE_PARAM.findall(params))


@dataclass
class RegistryClient:
    """Talks to ``base_url`` (``http://127.0.0.1:PORT``), answering token challenges."""

    base_url: str
    username: str | None = None
    password: str | None = None
    _tokens: dict[str, str] = field(default_factory=dict)

    def _token(self, challenge: dict[str, str]) -> str:
        key = challenge.get("scope", "")
        query = {"service": challenge.get("service", "")}
        if challenge.get("scope"):
            query["scope"] = challenge["scope"]
        headers = {}
        if self.username is not None:
            creds = f"{self.username}:{self.password}".encode()
            headers["Authorization"] = "Basic " + base64.b64encode(creds).decode()
        resp = request(challenge["realm"] + "?" + urlencode(query), headers=headers)
        if resp.status != 200:
            raise RuntimeError(f"token request failed: {resp.status} {resp.body!r}")
        token = resp.json()["token"]  # type: ignore[index]
        self._tokens[key] = token
        return token

    def get(
        self, path: str, method: str = "GET", headers: dict[str, str] | None = None
    ) -> Response:
        """``path`` starts with ``/v2/``."""
        url = self.base_url + path
        headers = dict(headers or {})
        resp = request(url, method, headers)
        if resp.status == 401:
            challenge = parse_bearer_challenge(resp.header("WWW-Authenticate") or "")
            if challenge.get("realm"):
                headers["Authorization"] = "Bearer " + self._token(challenge)
                resp = request(url, method, headers)
        return resp

    def manifest(
        self, repository: str, reference: str, accept: Iterable[str], method: str = "GET"
    ) -> Response:
        return self.get(
            f"/v2/{repository}/manifests/{reference}", method, {"Accept": ", ".join(accept)}
        )

    def blob(self, repository: str, digest: str, method: str = "GET") -> Response:
        return self.get(f"/v2/{repository}/blobs/{digest}", method)
