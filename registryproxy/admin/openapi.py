"""The admin API's OpenAPI 3.1 document, derived from attrs classes.

:func:`schema_of` makes the schemas, with descriptions and keywords from the
fields' metadata: of what the routes answer from the backend's classes, of
request bodies from the classes the routes structure them into
(:mod:`registryproxy.admin.bodies`), of an upstream's settings from
:class:`~registryproxy.config.UpstreamConfig`.  A field is declared once, and
a new config key is a new API field.
"""

from __future__ import annotations

import copy
import types
import typing
from typing import Any, Union

import attrs

from .. import names
from .backend import FsckResult, Pin, PrefetchJob, PurgeResult, RepositoryDetail, RepositorySummary
from .bodies import IMAGE, PinRequest, PrefetchRequest, UpstreamSettings

# The grammar of registryproxy.names, anchored for JSON Schema.
NAME_PATTERN = f"^{names._NAME.pattern}$"
TAG_PATTERN = f"^{names._TAG.pattern}$"
DIGEST_PATTERN = f"^{names._DIGEST.pattern}$"
HOST_PATTERN = f"^{names._REGISTRY_HOST.pattern}$"
#: a row of the listing: upstream/repository
LAST_PATTERN = f"^{names._REGISTRY_HOST.pattern}/{names._NAME.pattern}$"
#: the most repositories a page of the listing holds: its rows are built and
#: encoded on the reactor thread (about 10 µs each), so that a page costs the
#: reactor some 10 ms at most, however large the cache (all of 20,000: 140 ms)
MAX_PAGE = 1000
#: the longest search (``q``) taken: longer than any upstream/repository
MAX_SEARCH = 512
#: epoch seconds, or an ISO 8601 time (UTC when it names no zone)
TIME_PATTERN = r"^([0-9]+(\.[0-9]+)?|[0-9]{4}-[0-9]{2}-[0-9]{2}([T ][0-9:.]+)?(Z|[+-][0-9:]+)?)$"


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {**schema, "type": [schema["type"], "null"]}


def schema_of(tp: Any, body: bool = False) -> dict[str, Any]:
    """JSON Schema for a type hint: scalars, tuples, optional values and
    unions of them, and attrs classes (each field's schema with what its
    ``metadata["openapi"]`` adds).  An answer has every field; a request
    *body* (read by :mod:`.bodies`) may leave out those with a default, has
    no other keys, and its numbers are >= 0."""
    if typing.get_origin(tp) in (Union, types.UnionType):
        options = [t for t in typing.get_args(tp) if t is not type(None)]
        schema: dict[str, Any] = {}
        for option in options:  # several: a size, bytes or "2GiB"
            inner = schema_of(option, body)
            schema = {**schema, **inner, "type": [*schema.get("type", []), inner["type"]]}
        if type(None) in typing.get_args(tp):
            schema["type"].append("null")
        return schema if len(schema["type"]) > 1 else {**schema, "type": schema["type"][0]}
    if typing.get_origin(tp) is tuple:
        return {"type": "array", "items": schema_of(typing.get_args(tp)[0], body)}
    if attrs.has(tp):
        fields = attrs.fields(attrs.resolve_types(tp))
        optional = tuple(f.name for f in fields if body and f.default is not attrs.NOTHING)
        properties = {f.name: _with_metadata(schema_of(f.type, body), f) for f in fields}
        schema = _object(properties, optional)
        return {**schema, "additionalProperties": False} if body else schema
    minimum = {"minimum": 0} if body else {}
    if tp is float:
        return {"type": "number", **minimum}
    if tp is int:
        return {"type": "integer", **minimum}
    if tp is bool:
        return {"type": "boolean"}
    if tp is str:
        return {"type": "string"}
    raise TypeError(f"no JSON schema for {tp!r}")  # pragma: no cover


def _with_metadata(schema: dict[str, Any], field: attrs.Attribute[Any]) -> dict[str, Any]:
    """*schema* of *field*'s type with what its metadata adds (to its items too)."""
    extra = field.metadata.get("openapi", {})
    if "items" in extra:
        return {**schema, **extra, "items": {**schema["items"], **extra["items"]}}
    return {**schema, **extra}


def _with_descriptions(schema: dict[str, Any], **descriptions: str) -> dict[str, Any]:
    """*schema* of an object whose class (the cache's, FsckReport) has no
    ``metadata["openapi"]``, with descriptions of some of its properties."""
    properties = schema["properties"]
    for name, description in descriptions.items():
        properties[name] = {**properties[name], "description": description}
    return schema


_TIME = {"type": "number", "description": "Unix epoch seconds"}
_IMAGE = {**schema_of(str), **IMAGE["openapi"]}
_ERROR = {
    "type": "object",
    "properties": {
        "error": {
            "type": "object",
            "properties": {
                "code": {"type": "string", "examples": ["BAD_REQUEST"]},
                "message": {"type": "string", "description": "what went wrong and what to do"},
            },
            "required": ["code", "message"],
        }
    },
    "required": ["error"],
}


def _object(properties: dict[str, Any], optional: tuple[str, ...] = ()) -> dict[str, Any]:
    required = [name for name in properties if name not in optional]
    return {
        "type": "object",
        "properties": properties,
        **({"required": required} if required else {}),
    }


_UPSTREAM_SETTINGS = {
    **schema_of(UpstreamSettings, body=True),
    "description": (
        "An upstream's keys as under upstreams.<name> in the YAML config "
        "(etc/regproxy.yaml), validated the same way."
    ),
}


_UPSTREAM_SHOWN = {
    "type": "object",
    "description": (
        'The upstream\'s settings as in the YAML, secrets replaced by "<set>", '
        "plus whether it is a preset and the default upstream."
    ),
    "properties": {
        **{name: {} for name in _UPSTREAM_SETTINGS["properties"]},
        "url": {"type": "string"},
        "preset": {"type": "boolean"},
        "default": {"type": "boolean"},
    },
    "required": ["url", "preset", "default"],
}

SCHEMAS: dict[str, Any] = {
    "Error": _ERROR,
    "Health": _object({"status": {"type": "string", "enum": ["ok"]}}),
    "Readiness": _object(
        {"ready": {"type": "boolean"}, "checks": {"type": "object"}}, optional=("checks",)
    ),
    "Stats": {
        "type": "object",
        "description": "Counters since start-up; every key may be missing if not measured.",
        "properties": {
            "requests": {"type": "integer"},
            "hits": {"type": "integer"},
            "misses": {"type": "integer"},
            "hit_ratio": {"type": ["number", "null"]},
            "bytes_from_cache": {"type": "integer"},
            "bytes_from_upstream": {"type": "integer"},
            "upstream_requests": {
                "type": "object",
                "description": "{upstream: {kind: count}}",
                "additionalProperties": {
                    "type": "object",
                    "additionalProperties": {"type": "integer"},
                },
            },
            "errors": {
                "type": "object",
                "description": "{HTTP status: count}",
                "additionalProperties": {"type": "integer"},
            },
            "upstream_errors": {
                "type": "object",
                "description": (
                    "Error responses to clients {upstream: count}; "
                    '"none": requests not routed to an upstream'
                ),
                "additionalProperties": {"type": "integer"},
            },
            "top_pulls": {
                "type": "array",
                "description": (
                    "The most pulled images (manifest GETs) since start-up, most first "
                    "(at most 20), as asked for: upstream/repository:tag or @digest"
                ),
                "items": _object({"image": {"type": "string"}, "pulls": {"type": "integer"}}),
            },
            "fetches_in_flight": {"type": "integer"},
            "fetching": {
                "type": "array",
                "description": "Blob downloads in progress on this node (at most 50)",
                "items": _object(
                    {
                        "digest": {"type": "string"},
                        "written": {"type": "integer", "description": "bytes so far"},
                        "size": {"type": ["integer", "null"]},
                        "origin": {"type": "string", "enum": ["upstream", "peer", "shared"]},
                        "clients": {"type": "integer", "description": "readers following it"},
                        "repositories": {
                            "type": "array",
                            "items": {"type": "string"},
                            "description": "upstream/repository pairs it is read for (5 at most)",
                        },
                    }
                ),
            },
            "upstreams": {
                "type": "object",
                "description": "{upstream: its circuit breaker, and when it last answered}",
                "additionalProperties": _object(
                    {"breaker_open": {"type": "boolean"}, "last_answer": _nullable(_TIME)}
                ),
            },
            "cache": {
                "type": "object",
                "properties": {
                    **{
                        name: {"type": "integer"}
                        for name in (
                            "size_bytes",
                            "blobs",
                            "manifests",
                            "tags",
                            "repositories",
                            "free_disk_bytes",
                        )
                    },
                    "max_bytes": {
                        "type": ["integer", "null"],
                        "description": "cache.max_size in bytes; null: no budget",
                    },
                },
            },
            "ratelimit_remaining": {
                "type": "object",
                "description": "Docker Hub's ratelimit-remaining header as last seen, by upstream",
            },
            "prefetch": {"type": "array", "items": _ref("PrefetchJob")},
        },
    },
    "History": _object(
        {
            "interval": {"type": "number", "description": "seconds between hour samples"},
            "day_interval": {"type": "number", "description": "seconds between day samples"},
            "hour": {"type": "array", "items": _ref("Sample")},
            "day": {"type": "array", "items": _ref("Sample")},
        }
    ),
    "Sample": _object(
        {
            "time": _TIME,
            **{
                name: {"type": "integer", "description": "counted since start-up"}
                for name in (
                    "requests",
                    "hits",
                    "misses",
                    "bytes_from_cache",
                    "bytes_from_upstream",
                )
            },
        }
    ),
    "RecentErrors": _object(
        {
            "errors": {
                "type": "array",
                "description": "oldest first, the last 200 at most",
                "items": _object(
                    {
                        "time": _TIME,
                        "status": {"type": "integer"},
                        "client": {"type": "string"},
                        "method": {"type": "string"},
                        "path": {"type": "string"},
                    }
                ),
            }
        }
    ),
    "RepositorySummary": schema_of(RepositorySummary),
    "RepositoryList": _object(
        {"repositories": {"type": "array", "items": _ref("RepositorySummary")}}
    ),
    "RepositoryDetail": schema_of(RepositoryDetail),
    "PurgeResult": schema_of(PurgeResult),
    "PrefetchRequest": schema_of(PrefetchRequest, body=True),
    "PrefetchJob": schema_of(PrefetchJob),
    "PrefetchJobList": _object({"jobs": {"type": "array", "items": _ref("PrefetchJob")}}),
    "FsckResult": _with_descriptions(
        schema_of(FsckResult),
        checked="blobs re-hashed",
        quarantined=(
            "digests of the blobs whose bytes did not match, moved to quarantine/ "
            "(with the manifests listing them; the next pull fetches them again)"
        ),
        indexed="blobs in the store that the index did not know, now indexed",
        forgotten="index entries whose file was gone, now forgotten",
    ),
    "Pin": schema_of(Pin),
    "PinList": _object({"pins": {"type": "array", "items": _ref("Pin")}}),
    "PinRequest": schema_of(PinRequest, body=True),
    "UpstreamSettings": _UPSTREAM_SETTINGS,
    "Upstream": _UPSTREAM_SHOWN,
    "UpstreamList": _object(
        {"upstreams": {"type": "object", "additionalProperties": _ref("Upstream")}}
    ),
}

_STATUS_TEXT = {
    200: "OK",
    201: "Created",
    202: "Accepted",
    204: "Deleted",
    400: "Bad input: the message names the parameter or field",
    401: "Missing or wrong bearer token",
    404: "No such thing",
    409: "Conflicts with the current state",
    413: "Request body too large",
    500: "Internal error; see regproxy's log",
    503: "Not ready, or a cluster's index (PostgreSQL) does not answer: try again shortly",
}


def _json(schema: str) -> dict[str, Any]:
    return {"application/json": {"schema": _ref(schema)}}


def _operation(
    op_id: str,
    summary: str,
    ok: dict[int, str | None],
    errors: tuple[int, ...] = (),
    parameters: tuple[dict[str, Any], ...] = (),
    body: str | None = None,
    secured: bool = True,
    description: str | None = None,
    ok_content: dict[str, Any] | None = None,
    ok_headers: dict[str, Any] | None = None,
) -> dict[str, Any]:
    responses: dict[str, Any] = {}
    for status, schema in ok.items():
        responses[str(status)] = {"description": _STATUS_TEXT[status]}
        if ok_content is not None:
            responses[str(status)]["content"] = ok_content
        elif schema is not None:
            responses[str(status)]["content"] = _json(schema)
        if ok_headers is not None:
            responses[str(status)]["headers"] = ok_headers
    # every route refuses unknown query parameters, and a cluster node's
    # may find its index not answering
    codes = (set(errors) | {400, 500, 503}) - set(ok)
    if secured:
        codes.add(401)
    if body:
        codes.add(413)
    for status in sorted(codes):
        responses[str(status)] = {"description": _STATUS_TEXT[status], "content": _json("Error")}
    if 401 in codes:
        responses["401"]["headers"] = {
            "WWW-Authenticate": {"schema": {"type": "string"}, "description": "Bearer"}
        }
    op: dict[str, Any] = {"operationId": op_id, "summary": summary, "responses": responses}
    if description:
        op["description"] = description
    if parameters:
        op["parameters"] = list(parameters)
    if body:
        op["requestBody"] = {"required": True, "content": _json(body)}
    if not secured:
        op["security"] = []
    return op


def _path(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "path",
        "required": True,
        "schema": schema,
        "description": description,
    }


def _query(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"name": name, "in": "query", "schema": schema, "description": description}


_UPSTREAM = _path(
    "upstream",
    {"type": "string", "pattern": HOST_PATTERN},
    "The upstream's name (its registry host, e.g. docker.io, ghcr.io, localhost:5000)",
)
_REPOSITORY = _path(
    "repository",
    {"type": "string", "pattern": NAME_PATTERN, "maxLength": names.MAX_NAME_LENGTH},
    "The repository as cached, with its slashes (library/alpine, owner/name); no library/ is added",
)
_NAME = _path("name", {"type": "string", "pattern": HOST_PATTERN}, "The upstream's name")
_OLDER_THAN = _query(
    "older_than",
    {"type": "string", "pattern": TIME_PATTERN},
    "Only manifests fetched before this time: epoch seconds or ISO 8601 (UTC if no zone)",
)
_UNUSED_SINCE = _query(
    "unused_since",
    {"type": "string", "pattern": TIME_PATTERN},
    "Only manifests not served since this time: epoch seconds or ISO 8601 (UTC if no zone)",
)
#: the listing's parameters (admin/app.py reads them)
_PAGING = (
    _query(
        "n",
        {"type": "integer", "minimum": 1, "maximum": MAX_PAGE, "default": MAX_PAGE},
        "Page size: at most this many repositories",
    ),
    _query(
        "last",
        {"type": "string", "pattern": LAST_PATTERN},
        "upstream/repository of the last row seen: the page after it, in name order "
        "(what the Link header's next page carries)",
    ),
    _query(
        "sort",
        {"type": "string", "enum": ["name", "size"], "default": "name"},
        "name: by upstream, then repository; size: largest first, ties by name "
        "(the first n only: no last, no Link)",
    ),
    _query(
        "q",
        {"type": "string", "maxLength": MAX_SEARCH},
        "Only repositories whose upstream/repository contains this text "
        "(ASCII letters in any case; % and _ are plain characters)",
    ),
)
_PAGING_NOTE = (
    f"In pages of n ({MAX_PAGE} at most), as the registry's catalog API pages: while more "
    'remain (in name order), the Link header is <URL of the next page>; rel="next".'
)
_LINK = {
    "Link": {
        "schema": {"type": "string"},
        "description": '<the next page, with last set>; rel="next", while more remain',
    }
}
_PURGE_NOTE = (
    "Purging manifests removes the blobs nothing else cached lists; a blob being "
    "served right now is not cut off."
)


def _paths() -> dict[str, Any]:
    return {
        "/healthz": {
            "get": _operation(
                "healthz", "Liveness: the process answers", {200: "Health"}, secured=False
            )
        },
        "/readyz": {
            "get": _operation(
                "readyz",
                "Readiness: storage writable and the default upstream answered recently",
                {200: "Readiness", 503: "Readiness"},
                description="503 carries the same body as 200, with ready false.",
            )
        },
        "/metrics": {
            "get": _operation(
                "metrics",
                "Prometheus metrics (text exposition format)",
                {200: None},
                ok_content={"text/plain": {"schema": {"type": "string"}}},
            )
        },
        "/api/v1/openapi.json": {
            "get": _operation(
                "openapi",
                "This document",
                {200: None},
                ok_content={"application/json": {"schema": {"type": "object"}}},
            )
        },
        "/api/v1/stats": {
            "get": _operation("stats", "Counters, cache size, rate limits", {200: "Stats"})
        },
        "/api/v1/history": {
            "get": _operation(
                "history",
                "The counters sampled over the last hour and day (in memory, since start-up)",
                {200: "History"},
            )
        },
        "/api/v1/errors": {
            "get": _operation(
                "recent_errors",
                "The last error responses to registry clients: time, status, client, request",
                {200: "RecentErrors"},
            )
        },
        "/api/v1/cache": {
            "get": _operation(
                "list_repositories",
                "The cached repositories, a page at a time",
                {200: "RepositoryList"},
                parameters=_PAGING,
                description=_PAGING_NOTE,
                ok_headers=_LINK,
            ),
            "delete": _operation(
                "purge_cache",
                "Purge the whole cache, or what is older or unused",
                {200: "PurgeResult"},
                parameters=(
                    _query(
                        "all",
                        {"type": "boolean"},
                        "true: purge everything (alone; the explicit confirmation)",
                    ),
                    _OLDER_THAN,
                    _UNUSED_SINCE,
                ),
                description=(
                    "Give all=true alone to empty the cache, or older_than and/or "
                    "unused_since. " + _PURGE_NOTE
                ),
            ),
        },
        "/api/v1/cache/{upstream}": {
            "get": _operation(
                "list_upstream_repositories",
                "The cached repositories of one upstream, a page at a time",
                {200: "RepositoryList"},
                errors=(404,),
                parameters=(_UPSTREAM, *_PAGING),
                description=_PAGING_NOTE,
                ok_headers=_LINK,
            ),
            "delete": _operation(
                "purge_upstream",
                "Purge what is cached from one upstream",
                {200: "PurgeResult"},
                errors=(404,),
                parameters=(_UPSTREAM, _OLDER_THAN, _UNUSED_SINCE),
                description=_PURGE_NOTE,
            ),
        },
        "/api/v1/cache/{upstream}/{repository}": {
            "get": _operation(
                "show_repository",
                "One cached repository: tags, manifests, blobs, times",
                {200: "RepositoryDetail"},
                errors=(404,),
                parameters=(_UPSTREAM, _REPOSITORY),
            ),
            "delete": _operation(
                "purge_repository",
                "Purge one repository, one of its tags or one manifest",
                {200: "PurgeResult"},
                errors=(404,),
                parameters=(
                    _UPSTREAM,
                    _REPOSITORY,
                    _query(
                        "tag",
                        {"type": "string", "pattern": TAG_PATTERN},
                        "Only this tag (and the manifests only it kept)",
                    ),
                    _query(
                        "digest",
                        {"type": "string", "pattern": DIGEST_PATTERN},
                        "Only this manifest",
                    ),
                    _OLDER_THAN,
                    _UNUSED_SINCE,
                ),
                description="Give tag or digest, not both. " + _PURGE_NOTE,
            ),
        },
        "/api/v1/prefetch": {
            "get": _operation("list_prefetch", "Prefetch jobs", {200: "PrefetchJobList"}),
            "post": _operation(
                "prefetch",
                "Warm the cache with an image, in the background",
                {202: "PrefetchJob"},
                errors=(404, 409),
                body="PrefetchRequest",
                description="The Location header names the job.",
                ok_headers={
                    "Location": {
                        "schema": {"type": "string"},
                        "description": "/api/v1/prefetch/{id}",
                        "required": True,
                    }
                },
            ),
        },
        "/api/v1/prefetch/{id}": {
            "get": _operation(
                "show_prefetch",
                "One prefetch job",
                {200: "PrefetchJob"},
                errors=(404,),
                parameters=(_path("id", {"type": "string", "maxLength": 200}, "The job's id"),),
            )
        },
        "/api/v1/fsck": {
            "post": _operation(
                "fsck",
                "Re-hash every stored blob; quarantine those that do not match their digest",
                {200: "FsckResult"},
                errors=(409,),
                description=(
                    "Answers when done, which on a large store takes a while (it reads "
                    "every byte). The fsck runs to its end even if the client goes away; "
                    "its outcome is in regproxy's log. 409 if one is already running, or "
                    "if the store is not the local file store."
                ),
            )
        },
        "/api/v1/pins": {
            "get": _operation(
                "list_pins",
                "Pinned images: those eviction never removes",
                {200: "PinList"},
            ),
            "put": _operation(
                "put_pin",
                "Pin an image",
                {200: "Pin", 201: "Pin"},
                body="PinRequest",
                description=(
                    "Persisted, used at once. Idempotent: 201 when newly pinned, 200 when "
                    "it already was (by the config file or this API). 400 if the image is "
                    "not one docker would pull."
                ),
            ),
            "delete": _operation(
                "delete_pin",
                "Unpin an image",
                {204: None},
                errors=(404, 409),
                parameters=(
                    {
                        **_query("image", _IMAGE, "The image to unpin, as pinned or as typed"),
                        "required": True,
                    },
                ),
                description=(
                    "404 if it is not pinned; 409 if the config file (cache.pinned) pins "
                    "it: take it out there."
                ),
            ),
        },
        "/api/v1/upstreams": {
            "get": _operation(
                "list_upstreams", "Every upstream, presets included", {200: "UpstreamList"}
            )
        },
        "/api/v1/upstreams/{name}": {
            "get": _operation(
                "show_upstream",
                "One upstream",
                {200: "Upstream"},
                errors=(404,),
                parameters=(_NAME,),
            ),
            "put": _operation(
                "put_upstream",
                "Add an upstream, or replace all its settings",
                {200: "Upstream", 201: "Upstream"},
                errors=(409,),
                parameters=(_NAME,),
                body="UpstreamSettings",
                description=(
                    "Validated like the YAML, persisted, used from the next request. "
                    "201 when added, 200 when replaced. A preset's keys left out keep "
                    "the preset's values."
                ),
            ),
            "patch": _operation(
                "patch_upstream",
                "Change some settings of an upstream",
                {200: "Upstream"},
                errors=(404, 409),
                parameters=(_NAME,),
                body="UpstreamSettings",
                description="Keys left out keep their values; null resets a key that may be null.",
            ),
            "delete": _operation(
                "delete_upstream",
                "Remove an upstream",
                {204: None},
                errors=(404, 409),
                parameters=(_NAME,),
                description="409 if it is the default upstream or another's fallback.",
            ),
        },
    }


def document() -> dict[str, Any]:
    """The OpenAPI document, a fresh copy each time."""
    return copy.deepcopy(
        {
            "openapi": "3.1.0",
            "info": {
                "title": "regproxy admin API",
                "version": "1",
                "description": (
                    "Inspect and steer a running regproxy. JSON in and out; every error "
                    'is {"error": {"code", "message"}}. All times are Unix epoch seconds.'
                ),
            },
            "components": {
                "schemas": SCHEMAS,
                "securitySchemes": {
                    "bearer": {
                        "type": "http",
                        "scheme": "bearer",
                        "description": "admin.token from regproxy's config",
                    }
                },
            },
            "security": [{"bearer": []}],
            "paths": _paths(),
        }
    )
