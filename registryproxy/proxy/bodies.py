"""The /v2/ port's request bodies: none for the pull API, a small form for
the token endpoint's OAuth2 password grant."""

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
    return _refusal(error)


def _refusal(error: RegistryError) -> Refusal:
    return Refusal(
        error.status,
        error.body(),
        {b"Content-Type": b"application/json; charset=utf-8", _API_VERSION[0]: _API_VERSION[1]},
    )


#: the largest token request form read (user, password, scopes)
MAX_FORM = 16384


def login_bodies(
    method: bytes, path: bytes, headers: Headers, length: int | None
) -> Refusal | None:
    """With ``proxy.auth``: a ``POST /token`` form of up to MAX_FORM bytes
    is read, and nothing else."""
    if method == b"POST" and path.split(b"?", 1)[0] == b"/token":
        if length is None or length > MAX_FORM:
            return _refusal(
                RegistryError(
                    413, "UNSUPPORTED", f"a token request is a form of at most {MAX_FORM} bytes"
                )
            )
        return None
    return no_bodies(method, path, headers, length)
