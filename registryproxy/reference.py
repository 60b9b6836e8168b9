"""Image references as people type them, read the way ``docker pull`` reads them.

``nginx`` is ``docker.io/library/nginx``; the first path component names a
registry only if it has a ``.`` or a ``:`` or is ``localhost``
(``ghcr.io/owner/name:1.0``, ``localhost:5000/x``); ``:tag`` and ``@digest``
are optional.  Standard library and :mod:`registryproxy.names` only, since the
command-line client uses it too.
"""

from __future__ import annotations

import attrs

from .names import is_valid_digest, is_valid_name, is_valid_registry_host, is_valid_tag

DOCKER_HUB = "docker.io"
#: Docker's legacy names for Docker Hub, normalised as ``docker`` does
_DOCKER_HUB_ALIASES = ("index.docker.io",)


@attrs.frozen
class ImageReference:
    #: the registry host, which is the upstream's name in regproxy
    upstream: str
    repository: str
    #: None when the user gave no tag (``docker pull`` would use ``latest``)
    tag: str | None = None
    digest: str | None = None

    @property
    def reference(self) -> str:
        """What to pull: the digest if given, else the tag, else ``latest``."""
        return self.digest or self.tag or "latest"

    def __str__(self) -> str:
        text = f"{self.upstream}/{self.repository}"
        if self.tag is not None:
            text += f":{self.tag}"
        if self.digest is not None:
            text += f"@{self.digest}"
        return text


def is_registry_host(component: str) -> bool:
    """Docker's rule for the first component of an image name."""
    return "." in component or ":" in component or component == "localhost"


def parse_image(text: str) -> ImageReference:
    """``ImageReference`` for *text*, or ValueError with a message for the user."""
    if not text:
        raise ValueError("empty image name: give one like nginx, nginx:1.27 or ghcr.io/owner/name")
    rest, at, digest = text.partition("@")
    if at and not is_valid_digest(digest):
        raise ValueError(
            f"image {text!r}: {digest!r} is not a digest (sha256:<64 hex> or sha512:<128 hex>)"
        )
    first, slash, remainder = rest.partition("/")
    if slash and is_registry_host(first):
        upstream, name = first, remainder
        if not is_valid_registry_host(upstream):
            raise ValueError(f"image {text!r}: {upstream!r} is not a registry host name")
    else:
        upstream, name = DOCKER_HUB, rest
    if upstream in _DOCKER_HUB_ALIASES:
        upstream = DOCKER_HUB
    # The tag is after the last colon of the last path component.
    head, _, last = name.rpartition("/")
    last, colon, tag = last.partition(":")
    name = f"{head}/{last}" if head else last
    if colon and not is_valid_tag(tag):
        raise ValueError(
            f"image {text!r}: {tag!r} is not a tag (letters, digits, _ . -; at most 128)"
        )
    if upstream == DOCKER_HUB and "/" not in name:
        name = f"library/{name}"
    if not is_valid_name(name):
        raise ValueError(
            f"image {text!r}: {name!r} is not a repository name: use lowercase path "
            "components of letters, digits and single separators (. _ __ -)"
        )
    return ImageReference(upstream, name, tag if colon else None, digest if at else None)
