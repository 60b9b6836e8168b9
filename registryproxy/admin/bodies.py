"""The admin API's JSON request bodies, each declared once as an attrs class.

The routes structure a body with the strict converter of
:mod:`registryproxy.structuring`, telling mistakes in JSON's words, and the
OpenAPI document derives its request schemas from the same classes
(:func:`~registryproxy.admin.openapi.schema_of`): the keywords in a field's
metadata are both shown and enforced.
"""

from __future__ import annotations

from typing import Any, TypeVar

import attrs

from ..config import UpstreamConfig
from ..structuring import JSON, StructureError, make_converter, structure
from .backend import AdminError, api

T = TypeVar("T")

#: the longest image reference taken
IMAGE_MAX_LENGTH = 1024
#: a field's metadata for an image reference
IMAGE = api(
    "An image as docker pull takes it: nginx, nginx:1.27, ghcr.io/owner/name:1.0, nginx@sha256:...",
    minLength=1,
    maxLength=IMAGE_MAX_LENGTH,
)
PLATFORM_PATTERN = r"^[a-z0-9_.-]+/[a-z0-9_.-]+(?:/[a-z0-9_.-]+)?$"


@attrs.frozen
class PrefetchRequest:
    image: str = attrs.field(metadata=IMAGE)
    platforms: tuple[str, ...] | None = attrs.field(
        default=None,
        metadata=api(
            "Which platforms of a multi-platform image; leave out for all",
            minItems=1,
            items={
                "pattern": PLATFORM_PATTERN,
                "description": "os/arch[/variant], e.g. linux/arm64/v8",
            },
        ),
    )


@attrs.frozen
class PinRequest:
    image: str = attrs.field(metadata=IMAGE)


class _Absent:
    """A field of :data:`UpstreamSettings` that the body leaves out."""

    def __repr__(self) -> str:
        return "<absent>"


_ABSENT: Any = _Absent()


def _some_of(cls: type, name: str) -> type:
    """*cls* with every field optional (:data:`_ABSENT` unless given), its
    type, repr and metadata kept: a body that sets some of *cls*'s keys."""
    fields = attrs.fields(attrs.resolve_types(cls))
    return attrs.make_class(
        name,
        {
            f.name: attrs.field(type=f.type, default=_ABSENT, repr=f.repr, metadata=f.metadata)
            for f in fields
        },
        frozen=True,
    )


#: an upstream's keys as in the YAML config, each optional: the body of a PUT
#: (whose keys left out keep a preset's values) and of a PATCH
UpstreamSettings = _some_of(UpstreamConfig, "UpstreamSettings")


def given(settings: Any) -> dict[str, Any]:
    """The keys an :data:`UpstreamSettings` body gave, YAML-shaped (lists,
    not tuples), for :func:`~registryproxy.config.upstream_from_settings`."""
    return {
        name: list(value) if isinstance(value, tuple) else value
        for name, value in attrs.asdict(settings, recurse=False).items()
        if value is not _ABSENT
    }


_converter = make_converter(JSON)


def parse(value: Any, cls: type[T]) -> T:
    """The JSON *value* as a *cls*, or AdminError(400) naming the first field
    at fault (``body.platforms[0]: not valid: ...``) without echoing it."""
    try:
        return structure(_converter, value, cls, "body")
    except StructureError as e:
        raise AdminError(400, str(e)) from None
