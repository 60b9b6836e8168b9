"""Which repositories an upstream serves: its ``allow`` and ``deny`` lists,
and its ``max_blob_size``.

Pure functions over the patterns of ``upstreams.<name>.allow`` / ``deny``.
A pattern is ``REPOSITORY[:TAG]``:

* REPOSITORY is ``/``-separated segments, as a repository name on that
  upstream (no registry host; Docker Hub's official images are
  ``library/<name>``).  In a segment, ``*`` matches any run of characters
  but ``/``; a segment that is ``**`` matches any number of segments, none
  too (``myorg/**`` is ``myorg`` and everything under it, ``**/cache`` a
  ``cache`` at any depth, ``**`` everything).
* TAG, optional, is a tag with ``*`` matching any run of characters.  A
  manifest asked for by tag has one; nothing else does (a manifest or
  referrers by digest, a blob, a tag list).  A rule with a tag part applies
  to manifests by tag: a ``deny`` rule with a tag does not refuse the
  repository's digests and blobs, and an ``allow`` rule with a tag admits
  its repository for them (a client that may pull ``app:1`` needs its
  blobs, asked for by digest).
* On an upstream with ``library_prefix`` (Docker Hub), a pattern of one
  segment is read as a name of one segment is: ``alpine`` is
  ``library/alpine``, ``*:latest`` every official image's ``latest``
  (``**:latest``: every repository's).
* Digests are no part of a pattern: deny a repository or a tag.

``deny`` wins over ``allow``; no ``allow`` at all admits every repository,
an empty one none.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence

import attrs

from ..errors import RegistryError
from ..names import is_valid_name, is_valid_tag


@attrs.frozen
class Rule:
    """One compiled pattern."""

    text: str
    repository: re.Pattern[str]
    tag: re.Pattern[str] | None

    def matches(self, repository: str, tag: str | None) -> bool:
        """Whether the rule names this repository and, if it has a tag part, this tag."""
        if self.repository.fullmatch(repository) is None:
            return False
        return self.tag is None or (tag is not None and self.tag.fullmatch(tag) is not None)

    def admits(self, repository: str, tag: str | None) -> bool:
        """As an allow rule: :meth:`matches`, but with no tag asked (a digest,
        a blob, a tag list) a rule with a tag admits its repository."""
        if self.repository.fullmatch(repository) is None:
            return False
        return self.tag is None or tag is None or self.tag.fullmatch(tag) is not None


def _segment_regex(segment: str) -> str:
    return "[^/]*".join(re.escape(part) for part in segment.split("*"))


@functools.lru_cache(maxsize=4096)
def compile_pattern(text: str, library_prefix: bool = False) -> Rule:
    """The rule a pattern means; ValueError (its message saying what is wrong)
    if none.  *library_prefix*: a one-segment pattern means ``library/...``."""
    if not isinstance(text, str) or not text:
        raise ValueError(f"expected a pattern like library/* or myorg/**:1.*, got {text!r}")
    if "@" in text:
        raise ValueError(
            f"{text!r}: a pattern names repositories and tags, not digests: "
            "deny the repository or a tag"
        )
    repository, colon, tag = text.partition(":")
    segments: list[str] = []
    for segment in repository.split("/"):
        if segment == "**":
            if segments and segments[-1] == "**":
                continue  # a/**/**/b is a/**/b
        elif "**" in segment:
            raise ValueError(f"{text!r}: ** must be a whole path segment (a/**/b), or write *")
        segments.append(segment)
    if library_prefix and len(segments) == 1 and segments[0] != "**":
        segments.insert(0, "library")
    # a * may stand for any run of characters: "a" is the most permissive one
    example = "/".join("a" if s == "**" else s.replace("*", "a") for s in segments)
    if not is_valid_name(example):
        raise ValueError(
            f"{text!r} is no repository pattern: lowercase path segments "
            "of letters, digits and separators (. _ __ -), with * or ** as wildcards"
        )
    tag_pattern = None
    if colon:
        if "**" in tag:
            raise ValueError(f"{text!r}: ** spans path segments, and a tag has none: write *")
        if not is_valid_tag(tag.replace("*", "a")):
            raise ValueError(
                f"{text!r}: {tag!r} is no tag pattern: letters, digits, _ . - "
                "(not first: . -), up to 128, with * as a wildcard"
            )
        tag_pattern = re.compile(_segment_regex(tag))
    return Rule(text, re.compile(_repository_regex(segments)), tag_pattern)


def _repository_regex(segments: Sequence[str]) -> str:
    out: list[str] = []
    separate = False  # whether a / goes before the next segment
    last = len(segments) - 1
    for i, segment in enumerate(segments):
        if segment == "**":
            if i == last:
                out.append("(?:/[^/]+)*" if i else "[^/]+(?:/[^/]+)*")
            else:
                out.append("/" if separate else "")
                out.append("(?:[^/]+/)*")
                separate = False
        else:
            out.append("/" if separate else "")
            out.append(_segment_regex(segment))
            separate = True
    return "".join(out)


def check_patterns(patterns: Sequence[str] | None, key: str) -> None:
    """Compile each pattern, raising ValueError naming *key* and the index of
    the first bad one."""
    for i, pattern in enumerate(patterns or ()):
        try:
            compile_pattern(pattern)
        except ValueError as e:
            raise ValueError(f"{key}[{i}]: {e}") from None


def refused_by(
    upstream: str,
    allow: Sequence[str] | None,
    deny: Sequence[str],
    repository: str,
    tag: str | None = None,
    library_prefix: bool = False,
) -> str | None:
    """Why the rules of *upstream* refuse *repository* (and *tag*, for a
    manifest by tag), naming the rule, or None if they let it through;
    *library_prefix*: the upstream's (see :func:`compile_pattern`)."""
    what = f"{upstream}/{repository}" + (f":{tag}" if tag is not None else "")
    for pattern in deny:
        if compile_pattern(pattern, library_prefix).matches(repository, tag):
            return f"{what} is denied by upstreams.{upstream}.deny {_quote(pattern)}"
    if allow is None or any(
        compile_pattern(p, library_prefix).admits(repository, tag) for p in allow
    ):
        return None
    listed = ", ".join(_quote(p) for p in allow) or "(empty)"
    return f"{what} is not in upstreams.{upstream}.allow ({listed})"


def oversize(
    upstream: str, limit: int | None, shown: object, digest: str, size: int | None
) -> RegistryError | None:
    """The ``403 DENIED`` for a blob of *size* bytes over *limit* (the
    upstream's ``max_blob_size``, given as *shown*), or None."""
    if limit is None or size is None or size <= limit:
        return None
    return RegistryError(
        403,
        "DENIED",
        f"blob {digest} is {size} bytes, over upstreams.{upstream}.max_blob_size "
        f"({_quote(str(shown))}, {limit} bytes) on this regproxy: ask its operator",
    )


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
