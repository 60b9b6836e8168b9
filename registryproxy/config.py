"""YAML configuration -> typed, validated :class:`Config`.

One generic walker checks the YAML against the attrs classes below, so a new
key is one new attribute, and every mistake is reported as one message that
names the key (``cache.tag_ttl: expected a number, got 'soon'``).
"""

from __future__ import annotations

import collections.abc
import types
import typing
from collections.abc import Mapping
from typing import Any, TypeVar, Union
from urllib.parse import urlsplit

import attrs
import yaml

from .names import is_valid_registry_host


class ConfigError(Exception):
    """A configuration problem, with a message meant for the operator."""


@attrs.frozen
class ProxyConfig:
    #: twisted endpoint string for the /v2/ registry API
    listen: str = "tcp:5000"


@attrs.frozen
class CacheConfig:
    #: where blobs and the index live; created if missing
    directory: str = "regproxy-cache"
    #: seconds a tag -> digest answer is trusted before an upstream HEAD
    tag_ttl: float = 3600.0


@attrs.frozen
class UpstreamConfig:
    #: base URL of the registry, e.g. https://registry-1.docker.io
    url: str
    username: str | None = None
    password: str | None = attrs.field(default=None, repr=False)
    #: seconds to wait for a TCP (and TLS) connection
    connect_timeout: float = 10.0
    #: seconds to wait for response headers, and the longest silence mid-body
    read_timeout: float = 60.0

    def __attrs_post_init__(self) -> None:
        parts = urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"url: expected http(s)://host[:port], got {self.url!r}")
        if (self.username is None) != (self.password is None):
            raise ValueError("username and password go together: give both or neither")


DOCKER_HUB = UpstreamConfig(url="https://registry-1.docker.io")


@attrs.frozen
class Config:
    proxy: ProxyConfig = ProxyConfig()
    cache: CacheConfig = CacheConfig()
    #: the built-in Docker Hub entry, replaced by one of the same name
    upstreams: Mapping[str, UpstreamConfig] = attrs.field(
        factory=dict, converter=lambda given: {"docker.io": DOCKER_HUB, **given}
    )
    default_upstream: str = "docker.io"

    def __attrs_post_init__(self) -> None:
        if self.default_upstream not in self.upstreams:
            raise ValueError(
                f"default_upstream: {self.default_upstream!r} is not one of the "
                f"upstreams ({', '.join(sorted(self.upstreams))})"
            )


T = TypeVar("T")


def load_config(path: str | None) -> Config:
    """Read and validate the YAML file at *path*; ``None`` gives the defaults."""
    if path is None:
        return Config()
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError(f"cannot read config file {path!r}: {e.strerror}") from None
    return parse_config(text, source=path)


class _StrictLoader(yaml.SafeLoader):
    """A SafeLoader that refuses a key given twice instead of keeping the last."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)  # type: ignore[no-untyped-call]
            if key in seen:
                mark = key_node.start_mark
                raise ConfigError(f"line {mark.line + 1}: key {key!r} is given twice")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def parse_config(text: str, source: str = "<config>") -> Config:
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 (a SafeLoader)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError(f"{source}: not valid YAML{where}: {problem}") from None
    if data is None:
        data = {}
    try:
        return _build(Config, data, "")
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def _describe(value: Any) -> str:
    return f"{type(value).__name__} {value!r}" if not isinstance(value, dict) else "a mapping"


def _key(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _convert(tp: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        (inner,) = [o for o in options if o is not type(None)]
        return _convert(inner, value, path)
    if origin in (collections.abc.Mapping, dict):
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {_describe(value)}")
        _, value_type = typing.get_args(tp)
        out = {}
        for name, item in value.items():
            if not isinstance(name, str) or not is_valid_registry_host(name):
                raise ConfigError(
                    f"{path}: {name!r} is not a registry host name (host or host:port)"
                )
            out[name] = _convert(value_type, item, _key(path, name))
        return out
    if attrs.has(tp):
        return _build(tp, value, path)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {_describe(value)}")
        if value < 0:
            raise ConfigError(f"{path}: expected a number >= 0, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected a whole number, got {_describe(value)}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {_describe(value)}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {_describe(value)}")
        return value
    raise TypeError(f"no config conversion for {tp!r}")  # pragma: no cover


def _build(cls: type[T], data: Any, path: str) -> T:
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'config'}: expected a mapping, got {_describe(data)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in attrs.fields(cls)}  # type: ignore[arg-type]
    for name in data:
        if name not in fields:
            known = ", ".join(sorted(fields))
            raise ConfigError(f"{_key(path, str(name))}: unknown key (known here: {known})")
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _convert(hints[name], data[name], _key(path, name))
        elif f.default is attrs.NOTHING:
            raise ConfigError(f"{_key(path, name)}: required key is missing")
    try:
        return cls(**kwargs)
    except ValueError as e:
        raise ConfigError(f"{path}: {e}" if path else str(e)) from None
