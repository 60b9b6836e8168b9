"""Manifest media types and the client's ``Accept``.

dockerd sends six separate ``Accept`` lines, containerd one comma list; both
must come out as the same ordered list of types.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence


def parse_accept(lines: Iterable[bytes | str]) -> list[str]:
    """Every media type named in every Accept line, in order, without parameters."""
    types: list[str] = []
    for line in lines:
        text = line.decode("latin-1") if isinstance(line, bytes) else line
        for item in text.split(","):
            media_type = item.split(";", 1)[0].strip().lower()
            if media_type and media_type not in types:
                types.append(media_type)
    return types


def acceptable(media_type: str, accepted: Sequence[str]) -> bool:
    """Whether a client that sent *accepted* takes *media_type* (no Accept takes anything)."""
    if not accepted:
        return True
    media_type = media_type.lower()
    major = media_type.split("/", 1)[0]
    return any(a in (media_type, "*/*", f"{major}/*") for a in accepted)
