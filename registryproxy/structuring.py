"""YAML- or JSON-shaped data -> attrs values, with cattrs.

The config file (:mod:`registryproxy.config`) and the admin API's request
bodies are structured by converters made here, so a field is declared once,
on its attrs class.  Stricter than cattrs' defaults: a number is not a string
that looks like one, a list is not a string, a count is not negative, and a
field whose repr hides it (a secret) is never echoed.  A mistake is reported
as one line naming its key, in the words of the format read
(:data:`YAML`: ``cache.tag_ttl: expected a number, got str 'soon'``;
:data:`JSON`: ``body.tag_ttl: expected a number or null, got a string``).
The JSON Schema keywords a field's ``metadata["openapi"]`` gives (the
OpenAPI document shows them) are enforced too.
"""

from __future__ import annotations

import math
import re
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
        self.got = got


class StructureError(ValueError):
    """Data that does not fit its class; the message names the key."""


def describe(value: Any) -> str:
    return f"{type(value).__name__} {value!r}" if not isinstance(value, dict) else "a mapping"


def json_type(value: Any) -> str:
    """*value*'s JSON type, with its article; never the value itself (a
    request body may carry a password)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "an object" if isinstance(value, dict) else "a list"


@attrs.frozen
class Words:
    """How mistakes are told: in the terms of the format that was read."""

    #: what a whole number, a flag and a mapping are called
    count: str
    flag: str
    mapping: str
    #: a value as a mistake shows it
    describe: Callable[[Any], str]
    #: a value whose field's repr hides it (a secret) as a mistake shows it
    conceal: Callable[[Any], str]
    #: whether an optional value's mistake says that null is taken too
    say_null: bool
    #: a key that no field has, given the known ones
    unknown: Callable[[str, str], Mistake]
    #: a required field left out
    missing: Callable[[str], Mistake]


#: the config file's words: ``tag_ttl: expected a number, got str 'soon'``
YAML = Words(
    count="a whole number",
    flag="true or false",
    mapping="a mapping",
    describe=describe,
    conceal=lambda value: f"{type(value).__name__} (not shown)",
    say_null=False,
    unknown=lambda name, known: Mistake(f"unknown key (known here: {known})", name),
    missing=lambda name: Mistake("required key is missing", name),
)
#: a JSON body's words, which never echo a value of the wrong type:
#: ``body.tag_ttl: expected a number or null, got a string``
JSON = Words(
    count="an integer",
    flag="a boolean",
    mapping="an object",
    describe=json_type,
    conceal=json_type,
    say_null=True,
    unknown=lambda name, known: Mistake(f"unknown field {name!r} (known: {known})"),
    missing=lambda name: Mistake(f"required field {name!r} is missing"),
)


def join(path: str, key: str) -> str:
    return f"{path}.{key}" if path and key else path or key


def _scalars(words: Words) -> dict[type, Hook]:
    """Strict hooks for numbers, whole numbers, flags and strings."""

    def number(value: Any, _: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise Mismatch("a number", words.describe(value))
        try:
            number = float(value)
        except OverflowError:  # a whole number of hundreds of digits
            raise Mistake("too large a number") from None
        # YAML's .inf and .nan: a deadline of .inf never comes, and every
        # comparison with .nan is false
        if not math.isfinite(number):
            raise Mismatch("a finite number", repr(value))
        if number < 0:
            raise Mismatch("a number >= 0", repr(value))
        return number

    def count(value: Any, _: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise Mismatch(words.count, words.describe(value))
        if value < 0:
            raise Mismatch(f"{words.count} >= 0", repr(value))
        return value

    def flag(value: Any, _: Any) -> bool:
        if not isinstance(value, bool):
            raise Mismatch(words.flag, words.describe(value))
        return value

    def text(value: Any, _: Any) -> str:
        if not isinstance(value, str):
            raise Mismatch("a string", words.describe(value))
        return value

    return {float: number, int: count, bool: flag, str: text}


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


def make_converter(words: Words = YAML) -> cattrs.Converter:
    """A converter with the strict hooks above for attrs classes of scalars,
    tuples (from lists), optional values and unions of them, telling its
    mistakes in *words*."""
    converter = cattrs.Converter(forbid_extra_keys=True, detailed_validation=True)
    for tp, hook in _scalars(words).items():
        converter.register_structure_hook(tp, hook)

    def union(tp: Any) -> Hook:
        options = [o for o in typing.get_args(tp) if o is not type(None)]
        nullable = len(options) < len(typing.get_args(tp))
        say_null = nullable and words.say_null

        def structure(value: Any, _: Any) -> Any:
            if value is None and nullable:
                return None
            mismatches = []
            for option in options:
                try:
                    return converter.structure(value, option)
                except Mismatch as e:
                    mismatches.append(e)
            if len(mismatches) == 1 and not say_null:
                raise mismatches[0]  # its own error
            expected = [m.expected for m in mismatches] + (["null"] if say_null else [])
            got = mismatches[0].got if len(mismatches) == 1 else words.describe(value)
            raise Mismatch(" or ".join(expected), got)

        return structure

    def sequence(tp: Any) -> Hook:
        item = typing.get_args(tp)[0]

        def structure(value: Any, _: Any) -> tuple[Any, ...]:
            if not isinstance(value, list):
                raise Mismatch("a list", words.describe(value))
            return tuple(each(value, lambda v: converter.structure(v, item), tp))

        return structure

    converter.register_structure_hook_factory(_is_union, union)
    converter.register_structure_hook_factory(_is_tuple, sequence)
    converter.register_structure_hook_factory(
        attrs.has, lambda cls: attrs_hook(converter, cls, words=words)
    )
    return converter


def attrs_hook(
    converter: cattrs.Converter, cls: type, also_known: tuple[str, ...] = (), words: Words = YAML
) -> Hook:
    """Structure *cls* from a mapping of its fields (and the keys *also_known*,
    which the caller's hook takes away first); a field whose repr hides it
    (a secret) is reported by its type alone."""
    fields = attrs.fields(attrs.resolve_types(cls))
    special = {f.name: _field_hook(converter, f, words) for f in fields}
    overrides = {name: override(struct_hook=hook) for name, hook in special.items() if hook}
    generated: Hook = make_dict_structure_fn(cls, converter, **overrides)  # type: ignore[arg-type]
    known = ", ".join(sorted([*(f.name for f in fields), *also_known]))

    def structure(value: Any, _: Any) -> Any:
        if not isinstance(value, dict):
            raise Mismatch(words.mapping, words.describe(value))
        try:
            return generated(value, cls)
        except ClassValidationError as e:
            for error in e.exceptions:
                if isinstance(error, ForbiddenExtraKeysError):
                    # the first unknown key as written, before any other mistake
                    name = next(key for key in value if key in error.extra_fields)
                    raise words.unknown(str(name), known) from None
            first = e.exceptions[0]
            if isinstance(first, KeyError):
                notes = getattr(first, "__notes__", ())
                name = next(n.name for n in notes if isinstance(n, AttributeValidationNote))
                raise words.missing(name) from None
            raise

    return structure


#: the JSON Schema keywords of a field's metadata["openapi"] that are enforced
_KEYWORDS = {"minLength", "maxLength", "pattern", "minItems", "items"}


def _field_hook(
    converter: cattrs.Converter, field: attrs.Attribute[Any], words: Words
) -> Hook | None:
    """*field*'s own hook if it needs one: to hide a secret (a field whose
    repr hides it) or to enforce its metadata's keywords."""
    keywords = field.metadata.get("openapi", {})
    secret = field.repr is not True
    tp: Any = field.type
    if not secret and not keywords.keys() & _KEYWORDS:
        return None

    def structure(value: Any, _: Any) -> Any:
        try:
            result = converter.structure(value, tp)
        except Mismatch as e:
            if not secret:
                raise
            # never echo a secret, even a mistyped one
            raise Mismatch(e.expected, words.conceal(value)) from None
        _check_keywords(result, keywords)
        return result

    return structure


def matches(pattern: str, value: str) -> bool:
    """JSON Schema's (ECMA 262) reading of *pattern*, whose ``$`` does not
    match before a final newline as Python's does."""
    return re.search(re.sub(r"\$$", r"\\Z", pattern), value) is not None


def _check_keywords(value: Any, keywords: dict[str, Any]) -> None:
    """Raise Mistake if the structured *value* breaks one of the JSON Schema
    *keywords* (those of :data:`_KEYWORDS`; a pattern's description says
    what it wants).  Never echoes the value."""
    if isinstance(value, str):
        shortest = keywords.get("minLength", 0)
        if len(value) < shortest:
            raise Mistake(
                "must not be empty" if shortest == 1 else f"shorter than {shortest} characters"
            )
        if len(value) > keywords.get("maxLength", math.inf):
            raise Mistake(f"longer than {keywords['maxLength']} characters")
        if "pattern" in keywords and not matches(keywords["pattern"], value):
            hint = keywords.get("description", f"the pattern {keywords['pattern']}")
            raise Mistake(f"not valid: expected {hint}")
    elif isinstance(value, tuple):
        if len(value) < keywords.get("minItems", 0):
            raise Mistake(f"give at least {keywords['minItems']} item(s) or leave it out")
        items = keywords.get("items", {})
        each(value, lambda item: _check_keywords(item, items), tuple)


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
    except (ValueError, BaseValidationError) as e:
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
    if isinstance(error, Mistake):
        return f"{join(path, error.key) or root}: {error}"
    if isinstance(error, ValueError):
        return f"{path}: {error}" if path else str(error)
    raise error
