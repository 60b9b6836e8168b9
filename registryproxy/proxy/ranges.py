"""A single HTTP byte range (RFC 9110), the only kind registry clients send."""

from __future__ import annotations

import re

from ..errors import RegistryError

_RANGE = re.compile(rb"bytes=([0-9]*)-([0-9]*)")
#: more digits than any blob's size has: such a number is "past the end"
_DIGITS = 20


def _number(digits: bytes) -> int:
    """The value of *digits*, or ``10**20`` for anything that long (past any
    blob, and never a long conversion: Python refuses ints of 4,300 digits)."""
    digits = digits.lstrip(b"0") or b"0"
    return int(digits) if len(digits) < _DIGITS else 10**_DIGITS


def parse_range(header: bytes | None, size: int) -> tuple[int, int] | None:
    """``(start, end_exclusive)``, or None for the whole blob.

    Raises a 416 :class:`RegistryError` for a range outside the blob or one
    we cannot parse (several ranges, other units, garbage).
    """
    if header is None:
        return None
    match = _RANGE.fullmatch(header.strip())
    if match is None or match.group(1) == match.group(2) == b"":
        raise _unsatisfiable(size, f"cannot parse Range {_show(header)}: send one range, bytes=A-B")
    first, last = match.groups()
    if first == b"":
        suffix = _number(last)
        if suffix == 0:
            raise _unsatisfiable(size, f"Range {_show(header)} asks for no bytes")
        return max(0, size - suffix), size
    start = _number(first)
    end = size if last == b"" else min(_number(last) + 1, size)
    if start >= size or end <= start:
        raise _unsatisfiable(size, f"Range {_show(header)} is outside the blob of {size} bytes")
    return start, end


def _show(header: bytes, limit: int = 80) -> str:
    """The header as a message shows it: quoted, cut short if long."""
    text = header.decode("latin-1")
    return repr(text if len(text) <= limit else text[:limit] + "...")


def _unsatisfiable(size: int, message: str) -> RegistryError:
    return RegistryError(
        416, "RANGE_INVALID", message, headers={"Content-Range": f"bytes */{size}"}
    )
