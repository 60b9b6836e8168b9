"""The /v2/ port's request bodies: there are none to take."""

from __future__ import annotations

from twisted.web.http_headers import Headers

from ..errors import RegistryError, unsupported
from .connections import Refusal
from .resource import _API_VERSION


def no_bodies(method: bytes, path: bytes, headers: Headers, length: int | None) -> Refusal:
    """The /v2/ policy: the pull API takes no request bodies."""
    if method in (b"GET", b"HEAD"):
        error = RegistryError(
            413, "UNSUPPORTED", "regproxy takes no request bodies: it serves pulls only"
        )
    else:
        error = unsupported(f"{method.decode('latin-1')} {path.decode('latin-1')}")
    return Refusal(
        error.status,
        error.body(),
        {b"Content-Type": b"application/json; charset=utf-8", _API_VERSION[0]: _API_VERSION[1]},
    )
