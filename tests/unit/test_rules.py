"""The allow/deny pattern matcher: a table of cases, and hypothesis against a
plain recursive reference matcher."""

from __future__ import annotations

import fnmatch
import json

import pytest
from fuzzing import examples
from hypothesis import given, settings
from hypothesis import strategies as st

from registryproxy.config import ConfigError, UpstreamConfig, parse_config, upstream_from_settings
from registryproxy.upstream.rules import check_patterns, compile_pattern, oversize, refused_by

# -- the table -----------------------------------------------------------------

MATCHES = [
    # pattern, repository, tag (None: a digest, blob or tag list), matches
    ("library/*", "library/alpine", None, True),
    ("library/*", "library/alpine", "3.19", True),
    ("library/*", "library/a/b", None, False),
    ("library/*", "library", None, False),
    ("library/*", "other/alpine", None, False),
    ("myorg/**", "myorg", None, True),
    ("myorg/**", "myorg/app", None, True),
    ("myorg/**", "myorg/team/app", None, True),
    ("myorg/**", "myorgx/app", None, False),
    ("myorg/**", "other/myorg/app", None, False),
    ("**/cache", "cache", None, True),
    ("**/cache", "a/b/cache", None, True),
    ("**/cache", "a/b/cachex", None, False),
    ("a/**/b", "a/b", None, True),
    ("a/**/b", "a/x/y/b", None, True),
    ("a/**/b", "a/x/y/c", None, False),
    ("a/**/**/b", "a/b", None, True),
    ("**", "anything/at/all", None, True),
    ("app-*", "app-web", None, True),
    ("app-*", "app", None, False),
    ("*-app", "web-app", None, True),
    ("*/*", "a/b", None, True),
    ("*/*", "a", None, False),
    ("*/*", "a/b/c", None, False),
    # tag parts: only a manifest by tag has a tag
    ("*/app:latest", "me/app", "latest", True),
    ("*/app:latest", "me/app", "1.0", False),
    ("*/app:latest", "me/app", None, False),
    ("me/app:1.*", "me/app", "1.2.3", True),
    ("me/app:1.*", "me/app", "11", False),
    ("me/app:*-alpine", "me/app", "3-alpine", True),
    ("**:latest", "a/b/c", "latest", True),
    # regular expression characters in a name are themselves
    ("a.b/c", "axb/c", None, False),
    ("a.b/c", "a.b/c", None, True),
]


@pytest.mark.parametrize(("pattern", "repository", "tag", "expected"), MATCHES)
def test_matches(pattern, repository, tag, expected):
    assert compile_pattern(pattern).matches(repository, tag) is expected


def test_one_segment_patterns_on_docker_hub_mean_official_images():
    assert compile_pattern("alpine", library_prefix=True).matches("library/alpine", None)
    assert not compile_pattern("alpine", library_prefix=True).matches("me/alpine", None)
    assert compile_pattern("*:latest", library_prefix=True).matches("library/nginx", "latest")
    assert not compile_pattern("*:latest", library_prefix=True).matches("me/nginx", "latest")
    assert compile_pattern("**:latest", library_prefix=True).matches("me/nginx", "latest")
    # elsewhere a name of one segment is just that
    assert compile_pattern("alpine").matches("alpine", None)
    assert not compile_pattern("alpine").matches("library/alpine", None)


@pytest.mark.parametrize(
    ("pattern", "says"),
    [
        ("", "expected a pattern"),
        ("Library/*", "no repository pattern"),
        ("/library", "no repository pattern"),
        ("library/", "no repository pattern"),
        ("a//b", "no repository pattern"),
        ("a/b c", "no repository pattern"),
        ("docker.io:5000/a", "no tag pattern"),
        ("a/b**", "whole path segment"),
        ("a/**b/c", "whole path segment"),
        ("a:**", "a tag has none"),
        ("a:", "no tag pattern"),
        ("a:.x", "no tag pattern"),
        ("a:x/y", "no tag pattern"),
        ("a@sha256:" + "0" * 64, "not digests"),
        ("a/[bc]", "no repository pattern"),
        ("a/b?", "no repository pattern"),
    ],
)
def test_bad_patterns(pattern, says):
    with pytest.raises(ValueError, match=says):
        compile_pattern(pattern)


def test_check_patterns_names_the_key_and_index():
    with pytest.raises(ValueError, match=r"deny\[1\]: 'Bad'"):
        check_patterns(["ok/*", "Bad"], "deny")
    check_patterns(None, "allow")


# -- the verdicts ----------------------------------------------------------------


def verdict(allow, deny, repository, tag=None):
    return refused_by("docker.io", allow, deny, repository, tag)


def test_no_allow_admits_everything_and_an_empty_one_nothing():
    assert verdict(None, (), "any/thing") is None
    assert verdict((), (), "any/thing") == (
        "docker.io/any/thing is not in upstreams.docker.io.allow ((empty))"
    )


def test_deny_wins_over_allow_and_names_the_rule():
    allow, deny = ("library/*", "myorg/**"), ("library/large",)
    assert verdict(allow, deny, "library/alpine") is None
    assert verdict(allow, deny, "myorg/a/b") is None
    assert verdict(allow, deny, "library/large") == (
        'docker.io/library/large is denied by upstreams.docker.io.deny "library/large"'
    )
    assert verdict(allow, deny, "other/app") == (
        'docker.io/other/app is not in upstreams.docker.io.allow ("library/*", "myorg/**")'
    )


def test_tag_rules_apply_to_manifests_by_tag_only():
    # deny with a tag: that tag only; digests and blobs of the repository pass
    assert verdict(None, ("me/app:latest",), "me/app", "latest") is not None
    assert verdict(None, ("me/app:latest",), "me/app", "1.0") is None
    assert verdict(None, ("me/app:latest",), "me/app") is None
    # allow with a tag: those tags, and the repository's digests and blobs
    assert verdict(("me/app:1.*",), (), "me/app", "1.0") is None
    assert verdict(("me/app:1.*",), (), "me/app", "2.0") is not None
    assert verdict(("me/app:1.*",), (), "me/app") is None
    assert verdict(("me/app:1.*",), (), "me/other") is not None


def test_oversize():
    assert oversize("docker.io", None, None, "sha256:x", 10**12) is None
    assert oversize("docker.io", 100, "100", "sha256:x", None) is None
    assert oversize("docker.io", 100, "100", "sha256:x", 100) is None
    error = oversize("docker.io", 100, "100", "sha256:x", 101)
    assert error is not None and (error.status, error.code) == (403, "DENIED")
    assert "upstreams.docker.io.max_blob_size" in error.message and "101 bytes" in error.message


# -- the config -------------------------------------------------------------------


def config_of(**keys):
    return parse_config(json.dumps({"upstreams": {"docker.io": keys}}))


def test_config_takes_the_keys():
    upstream = config_of(allow=["library/*"], deny=["library/large"], max_blob_size="2GiB")
    docker = upstream.upstreams["docker.io"]
    assert docker.allow == ("library/*",)
    assert docker.deny == ("library/large",)
    assert docker.max_blob_bytes == 2 * 1024**3
    defaults = UpstreamConfig(url="https://x.example")
    assert (defaults.allow, defaults.deny, defaults.max_blob_bytes) == (None, (), None)


@pytest.mark.parametrize(
    ("keys", "says"),
    [
        ({"allow": ["Library/*"]}, r"upstreams.docker.io: allow\[0\]: 'Library/\*' is no"),
        ({"deny": ["ok", "a/b**"]}, r"upstreams.docker.io: deny\[1\]: 'a/b\*\*'"),
        ({"deny": "library/x"}, "upstreams.docker.io.deny: expected a list"),
        ({"allow": [3]}, r"upstreams.docker.io.allow\[0\]: expected a string"),
        ({"max_blob_size": "huge"}, "max_blob_size: expected bytes or a size"),
        ({"max_blob_size": -1}, "upstreams.docker.io.max_blob_size"),
    ],
)
def test_config_refuses_bad_values_naming_the_key(keys, says):
    with pytest.raises(ConfigError, match=says):
        config_of(**keys)


def test_settings_validate_like_the_file():
    with pytest.raises(ConfigError, match="allow"):
        upstream_from_settings("docker.io", {"allow": ["no good"]})
    upstream = upstream_from_settings("docker.io", {"deny": ["x/*"], "max_blob_size": 5})
    assert upstream.deny == ("x/*",) and upstream.max_blob_bytes == 5


# -- hypothesis: the compiled regular expressions against a reference -----------------

#: few, overlapping pieces, so that matches and near misses both come up
NAME_SEGMENTS = st.sampled_from(["a", "b", "ab", "ba", "a-b", "a.b", "a__b", "abab", "b-a-b"])
PATTERN_SEGMENTS = st.one_of(
    NAME_SEGMENTS, st.sampled_from(["*", "**", "a*", "*b", "*-*", "a*b", "**", "*.*"])
)
TAGS = st.sampled_from(["1", "1.0", "latest", "a", "1-alpine", "ab", "b"])
TAG_PATTERNS = st.one_of(TAGS, st.sampled_from(["*", "1*", "*alpine", "1.*", "*a*"]))


def reference(segments: list[str], name: list[str]) -> bool:
    """A pattern's segments against a name's, the slow and obvious way."""
    if not segments:
        return not name
    if segments[0] == "**":
        return any(reference(segments[1:], name[k:]) for k in range(len(name) + 1))
    return (
        bool(name)
        and fnmatch.fnmatchcase(name[0], segments[0])
        and reference(segments[1:], name[1:])
    )


@settings(max_examples=examples(400), deadline=None)
@given(
    st.lists(PATTERN_SEGMENTS, min_size=1, max_size=5),
    st.lists(NAME_SEGMENTS, min_size=1, max_size=5),
    st.none() | TAG_PATTERNS,
    st.none() | TAGS,
)
def test_matcher_agrees_with_the_reference(segments, name, tag_pattern, tag):
    pattern = "/".join(segments) + ("" if tag_pattern is None else f":{tag_pattern}")
    rule = compile_pattern(pattern)
    expected = reference(segments, name) and (
        tag_pattern is None or (tag is not None and fnmatch.fnmatchcase(tag, tag_pattern))
    )
    assert rule.matches("/".join(name), tag) is expected


@settings(max_examples=examples(100), deadline=None)
@given(st.lists(NAME_SEGMENTS, min_size=1, max_size=5), st.data())
def test_a_name_matches_itself_and_its_generalisations(name, data):
    repository = "/".join(name)
    assert compile_pattern(repository).matches(repository, None)
    # any segment made *, any tail made **: still a match
    general = [data.draw(st.sampled_from([s, "*"])) for s in name]
    cut = data.draw(st.integers(0, len(name)))
    pattern = "/".join([*general[:cut], "**"] if cut < len(name) else general)
    assert compile_pattern(pattern).matches(repository, None)
    assert not compile_pattern(repository + "x").matches(repository, None)


@settings(max_examples=examples(200), deadline=None)
@given(st.text(max_size=40))
def test_any_text_compiles_or_says_why(text):
    try:
        rule = compile_pattern(text)
    except ValueError as e:
        assert str(e)
    else:
        rule.matches("a/b", "latest")
