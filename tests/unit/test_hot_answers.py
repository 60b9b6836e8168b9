"""The manifests kept in memory stay within their bounds, least recently
used out, and a tag's answer ends with its TTL."""

from __future__ import annotations

from registryproxy.cache.manifests import CachedManifest, HotAnswers


def _manifest(size: int) -> CachedManifest:
    return CachedManifest(b"x" * size, "application/json", "sha256:" + "0" * 64, "HIT")


def test_the_least_recently_used_go_past_the_entry_bound():
    hot = HotAnswers(max_bytes=10_000, max_entries=2)
    hot.put(("u", "r", "a"), _manifest(10), None)
    hot.put(("u", "r", "b"), _manifest(10), None)
    assert hot.get(("u", "r", "a"), 0.0) is not None  # a used: b is now the oldest
    hot.put(("u", "r", "c"), _manifest(10), None)
    assert hot.get(("u", "r", "b"), 0.0) is None
    assert hot.get(("u", "r", "a"), 0.0) is not None
    assert hot.get(("u", "r", "c"), 0.0) is not None


def test_the_byte_bound_and_a_tag_s_ttl_hold():
    hot = HotAnswers(max_bytes=1_600, max_entries=100)
    for name in "abc":
        hot.put(("u", "r", name), _manifest(600), None)
    assert hot.get(("u", "r", "a"), 0.0) is None  # 1,800 bytes: the oldest went
    hot.put(("u", "r", "tag"), _manifest(10), 5.0)
    assert hot.get(("u", "r", "tag"), 4.9) is not None
    assert hot.get(("u", "r", "tag"), 5.0) is None
