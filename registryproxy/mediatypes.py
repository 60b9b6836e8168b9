"""Manifest media types and the client's ``Accept``.

dockerd sends six separate ``Accept`` lines, containerd one comma list; both
must come out as the same ordered list of types.

What regproxy caches for a tag is what the registry stores for it, never a
conversion made for one client: upstreams are always asked with every modern
manifest type (:data:`MODERN`), and each client's ``Accept`` is met locally
(:func:`acceptable`, and a platform manifest picked from a cached list for a
client that takes no lists).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence

DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
#: the media types of multi-platform manifests
LISTS = (OCI_INDEX, DOCKER_LIST)
#: every manifest type a modern client understands: asked of every upstream,
#: so that it never answers with a platform fallback or a schema1 conversion
MODERN = (
    OCI_INDEX,
    DOCKER_LIST,
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
)
#: the platform a registry picks from a list for a client that takes none
DEFAULT_PLATFORM = ("linux", "amd64")


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


def upstream_accept(accepted: Sequence[str]) -> list[str]:
    """What to ask an upstream for, whatever this client takes: every modern
    type, plus any other exact type the client names (artifact manifests),
    so the answer is always what the registry stores."""
    extra = [a for a in accepted if "*" not in a and a != "application/json" and a not in MODERN]
    return [*MODERN, *extra]


def acceptable(media_type: str, accepted: Sequence[str]) -> bool:
    """Whether a client that sent *accepted* takes *media_type*: it names the
    type, ``*/*`` or ``application/*``, or sends no Accept or only
    ``application/json`` (curl, old tools: they get what is stored)."""
    if not accepted or list(accepted) == ["application/json"]:
        return True
    media_type = media_type.lower()
    major = media_type.split("/", 1)[0]
    return any(a in (media_type, "*/*", f"{major}/*") for a in accepted)


def default_platform(body: bytes) -> str | None:
    """The digest of the linux/amd64 manifest a list names (the first such,
    as Distribution picks), or None."""
    try:
        descriptors = json.loads(body).get("manifests")
    except (ValueError, AttributeError):
        return None
    if not isinstance(descriptors, list):
        return None  # an upstream's list may be anything: no platform in it
    for d in descriptors:
        if not isinstance(d, dict) or not isinstance(d.get("platform"), dict):
            continue
        platform = d["platform"]
        if (platform.get("os"), platform.get("architecture")) == DEFAULT_PLATFORM:
            digest = d.get("digest")
            return digest if isinstance(digest, str) else None
    return None
