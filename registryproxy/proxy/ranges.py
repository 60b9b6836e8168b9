"""A single HTTP byte range (RFC 9110), the only kind registry clients send."""

from __future__ import annotations

import re

from ..errors import RegistryError

_RANGE = re.compile(r"bytes=(\d*)-(\d*)")


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """``(start, end_exclusive)``, or None for the whole blob.

    Raises a 416 :class:`RegistryError` for a range outside the blob or one
    we cannot parse (several ranges, other units, garbage).
    """
    if header is None:
        return None
    match = _RANGE.fullmatch(header.strip())
    if match is None or match.group(1) == match.group(2) == "":
        raise _unsatisfiable(size, f"cannot parse Range {header!r}: send one range, bytes=A-B")
    first, last = match.groups()
    if first == "":
        suffix = int(last)
        if suffix == 0:
            raise _unsatisfiable(size, f"Range {header!r} asks for no bytes")
        return max(0, size - suffix), size
    start = int(first)
    end = size if last == "" else min(int(last) + 1, size)
    if start >= size or end <= start:
        raise _unsatisfiable(size, f"Range {header!r} is outside the blob of {size} bytes")
    return start, end


def _unsatisfiable(size: int, message: str) -> RegistryError:
    return RegistryError(
        416, "RANGE_INVALID", message, headers={"Content-Range": f"bytes */{size}"}
    )
