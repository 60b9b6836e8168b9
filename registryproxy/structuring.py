"""YAML- or JSON-shaped data -> attrs values, with cattrs.

The config file (:mod:`registryproxy.config`) and the admin API's request
bodies are structured by converters made here, so a field is declared once,
on its attrs class.  Stricter than cattrs' defaults: a number is not a string
that looks like one, a list is not a string, a count is not negative, and a
field whose repr hides it (a secret) is never echoed.  A mistake is reported
as one line naming its key: ``cache.tag_ttl: expected a number, got str 'soon'``.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Callable
from typing import Any, TypeVar, Union

import attrs
import cattrs
from cattrs.errors import (
    AttributeValidationNote,
    BaseValidationError,
    ClassValidationError,
    ForbiddenExtraKeysError,
    IterableValidationError,
    IterableValidationNote,
)
from cattrs.gen import make_dict_structure_fn, override

T = TypeVar("T")
Hook = Callable[[Any, Any], Any]


class Mistake(ValueError):
    """A value refused, at *key* below where it was found ("" for right there)."""

    def __init__(self, message: str, key: str = "") -> None:
        super().__init__(message)
        self.key = key


class Mismatch(Mistake):
    """A value of the wrong kind: ``expected a number, got str 'soon'``."""

    def __init__(self, expected: str, got: str) -> None:
        super().__init__(f"expected {expected}, got {got}")
        self.expected = expected


class StructureError(ValueError):
    """Data that does not fit its class; the message names the key."""


def describe(value: Any) -> str:
    return f"{type(value).__name__} {value!r}" if not isinstance(value, dict) else "a mapping"


def join(path: str, key: str) -> str:
    return f"{path}.{key}" if path and key else path or key


def _number(value: Any, _: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise Mismatch("a number", describe(value))
    if value < 0:
        raise Mismatch("a number >= 0", repr(value))
    return float(value)


def _count(value: Any, _: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise Mismatch("a whole number", describe(value))
    if value < 0:
        raise Mismatch("a whole number >= 0", repr(value))
    return value


def _flag(value: Any, _: Any) -> bool:
    if not isinstance(value, bool):
        raise Mismatch("true or false", describe(value))
    return value


def _text(value: Any, _: Any) -> str:
    if not isinstance(value, str):
        raise Mismatch("a string", describe(value))
    return value


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (Union, types.UnionType)


def _is_tuple(tp: Any) -> bool:
    return typing.get_origin(tp) is tuple


def each(items: Any, structure: Callable[[Any], Any], cls: type) -> list[Any]:
    """*structure* applied to each of *items* (a list or a dict's items); the
    first that fails is raised with a note naming its index or key."""
    pairs = items.items() if isinstance(items, dict) else enumerate(items)
    out = []
    for where, item in pairs:
        try:
            out.append(structure(item))
        except Exception as e:
            e.add_note(IterableValidationNote(f"@ {where!r}", where, cls))
            raise IterableValidationError(f"While structuring {cls!r}", [e], cls) from None
    return out


def make_converter() -> cattrs.Converter:
    """A converter with the strict hooks above for attrs classes of scalars,
    tuples (from lists), optional values and unions of them."""
    converter = cattrs.Converter(forbid_extra_keys=True, detailed_validation=True)
    converter.register_structure_hook(float, _number)
    converter.register_structure_hook(int, _count)
    converter.register_structure_hook(bool, _flag)
    converter.register_structure_hook(str, _text)

    def union(tp: Any) -> Hook:
        options = [o for o in typing.get_args(tp) if o is not type(None)]
        nullable = len(options) < len(typing.get_args(tp))

        def structure(value: Any, _: Any) -> Any:
            if value is None and nullable:
                return None
            if len(options) == 1:
                return converter.structure(value, options[0])  # its own errors
            expected = []
            for option in options:
                try:
                    return converter.structure(value, option)
                except Mismatch as e:
                    expected.append(e.expected)
            raise Mismatch(" or ".join(expected), describe(value))

        return structure

    def sequence(tp: Any) -> Hook:
        item = typing.get_args(tp)[0]

        def structure(value: Any, _: Any) -> tuple[Any, ...]:
            if not isinstance(value, list):
                raise Mismatch("a list", describe(value))
            return tuple(each(value, lambda v: converter.structure(v, item), tp))

        return structure

    converter.register_structure_hook_factory(_is_union, union)
    converter.register_structure_hook_factory(_is_tuple, sequence)
    converter.register_structure_hook_factory(attrs.has, lambda cls: attrs_hook(converter, cls))
    return converter


def attrs_hook(converter: cattrs.Converter, cls: type, also_known: tuple[str, ...] = ()) -> Hook:
    """Structure *cls* from a mapping of its fields (and the keys *also_known*,
    which the caller's hook takes away first); a field whose repr hides it
    (a secret) is reported by its type alone."""
    fields = attrs.fields(attrs.resolve_types(cls))
    hidden = {
        f.name: override(struct_hook=_unshown(converter, f.type))
        for f in fields
        if f.repr is not True
    }
    generated: Hook = make_dict_structure_fn(cls, converter, **hidden)  # type: ignore[arg-type]
    known = ", ".join(sorted([*(f.name for f in fields), *also_known]))

    def structure(value: Any, _: Any) -> Any:
        if not isinstance(value, dict):
            raise Mismatch("a mapping", describe(value))
        try:
            return generated(value, cls)
        except ClassValidationError as e:
            for error in e.exceptions:
                if isinstance(error, ForbiddenExtraKeysError):
                    # the first unknown key as written, before any other mistake
                    name = next(key for key in value if key in error.extra_fields)
                    raise Mistake(f"unknown key (known here: {known})", str(name)) from None
            raise

    return structure


def _unshown(converter: cattrs.Converter, tp: Any) -> Hook:
    def structure(value: Any, _: Any) -> Any:
        try:
            return converter.structure(value, tp)
        except Mismatch:
            # never echo a secret, even a mistyped one
            raise Mismatch("a string", f"{type(value).__name__} (not shown)") from None

    return structure


def structure(
    converter: cattrs.Converter,
    data: Any,
    cls: type[T],
    path: str = "",
    root: str = "config",
) -> T:
    """*data* as a *cls*, or StructureError naming the first key at fault
    below *path* (*root* when that is the top)."""
    try:
        return converter.structure(data, cls)
    except (ValueError, KeyError, BaseValidationError) as e:
        raise StructureError(_message(e, path, root)) from None


def _message(error: BaseException, path: str, root: str) -> str:
    """The one line that says where *error* is and what is wrong there."""
    if isinstance(error, BaseValidationError):
        first = error.exceptions[0]
        for note in getattr(first, "__notes__", ()):
            if isinstance(note, AttributeValidationNote):
                path = join(path, note.name)
            elif isinstance(note, IterableValidationNote):
                index = note.index
                path = f"{path}[{index}]" if isinstance(index, int) else join(path, index)
        return _message(first, path, root)
    if isinstance(error, KeyError):
        return f"{path}: required key is missing"
    if isinstance(error, Mistake):
        return f"{join(path, error.key) or root}: {error}"
    if isinstance(error, ValueError):
        return f"{path}: {error}" if path else str(error)
    raise error
