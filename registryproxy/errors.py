"""Registry errors in the distribution-spec JSON form.

Every error a client can see is a :class:`RegistryError`; the proxy turns it
into ``{"errors": [{"code": ..., "message": ...}]}`` with its HTTP status.
"""

from __future__ import annotations

import json
from typing import Any

import attrs
from twisted.python.failure import Failure


@attrs.define
class RegistryError(Exception):
    status: int
    code: str
    message: str
    detail: Any = None
    headers: dict[str, str] = attrs.field(factory=dict)

    def __str__(self) -> str:
        return f"{self.status} {self.code}: {self.message}"

    def body(self) -> bytes:
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.detail is not None:
            error["detail"] = self.detail
        return json.dumps({"errors": [error]}).encode()


#: our statuses for an upstream that is down, failing, silent or rate-limiting
UPSTREAM_TROUBLE = frozenset({429, 502, 503, 504})


def name_invalid(name: str) -> RegistryError:
    return RegistryError(
        400,
        "NAME_INVALID",
        f"invalid repository name {name!r}: use lowercase path components "
        "of letters, digits and single separators (. _ __ -)",
    )


def digest_invalid(digest: str) -> RegistryError:
    return RegistryError(
        400,
        "DIGEST_INVALID",
        f"invalid digest {digest!r}: expected sha256:<64 hex> or sha512:<128 hex>",
    )


def unsupported(what: str) -> RegistryError:
    return RegistryError(
        405, "UNSUPPORTED", f"{what} is not supported: regproxy is a read-only pull-through cache"
    )


def describe_failure(error: BaseException | Failure) -> str:
    """A short phrase for what went wrong, for a log line or an error message.

    A connection-level failure that only wraps others (``ResponseFailed``,
    ``ResponseNeverReceived``: a list of ``reasons``) is described by its
    first reason. The exception's type names the kind of failure
    (``ConnectionRefusedError: ...``), except for a bare ``RuntimeError`` or
    ``Exception``, whose message is ours and says it all.
    """
    if isinstance(error, Failure):
        return describe_failure(error.value) if error.value is not None else "unknown failure"
    reasons = getattr(error, "reasons", None)
    if reasons:
        first = reasons[0]
        if isinstance(first, Failure):
            first = first.value
        if isinstance(first, BaseException):
            return describe_failure(first)
    text = str(error).strip()
    name = type(error).__name__
    if not text or text == name:
        return name
    return text if type(error) in (RuntimeError, Exception) else f"{name}: {text}"
