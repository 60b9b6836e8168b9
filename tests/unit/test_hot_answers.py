"""The manifests kept in memory stay within their bounds, least recently
used out, and a tag's answer ends with its TTL."""

from __future__ import annotations

import io
from collections.abc import Callable
from types import SimpleNamespace

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from registryproxy.cache.index import ManifestEntry, TagEntry
from registryproxy.cache.manifests import CachedManifest, HotAnswers, ManifestCache
from registryproxy.names import Digest
from registryproxy.upstream.client import Manifest


def _manifest(size: int) -> CachedManifest:
    return CachedManifest(b"x" * size, "application/json", "sha256:" + "0" * 64, "HIT")


def test_the_least_recently_used_go_past_the_entry_bound():
    hot = HotAnswers(max_bytes=10_000, max_entries=2)
    hot.put(("u", "r", "a"), _manifest(10), None, 0)
    hot.put(("u", "r", "b"), _manifest(10), None, 0)
    assert hot.get(("u", "r", "a"), 0.0) is not None  # a used: b is now the oldest
    hot.put(("u", "r", "c"), _manifest(10), None, 0)
    assert hot.get(("u", "r", "b"), 0.0) is None
    assert hot.get(("u", "r", "a"), 0.0) is not None
    assert hot.get(("u", "r", "c"), 0.0) is not None


def test_the_byte_bound_and_a_tag_s_ttl_hold():
    hot = HotAnswers(max_bytes=1_600, max_entries=100)
    for name in "abc":
        hot.put(("u", "r", name), _manifest(600), None, 0)
    assert hot.get(("u", "r", "a"), 0.0) is None  # 1,800 bytes: the oldest went
    hot.put(("u", "r", "tag"), _manifest(10), 5.0, 0)
    assert hot.get(("u", "r", "tag"), 4.9) is not None
    assert hot.get(("u", "r", "tag"), 5.0) is None


class _SlowIndex:
    """An index whose answers come when the test says (a cluster's does
    from a thread): each lookup waits in *asked*."""

    def __init__(self) -> None:
        self.asked: list[tuple[Deferred, Callable]] = []

    def quick(self, work: Callable) -> Deferred:
        d: Deferred = Deferred()
        self.asked.append((d, work))
        return d

    def touch_manifest(self, *args: object) -> None:
        pass

    def touch_blob(self, *args: object) -> None:
        pass


class _Files:
    def __init__(self, body: bytes) -> None:
        self._body = body

    def open(self, digest: Digest) -> io.BytesIO:
        return io.BytesIO(self._body)


@pytest.mark.parametrize("by", ["tag", "digest"])
def test_an_answer_read_before_an_eviction_is_not_kept_after_it(by: str):
    """A lookup that read the index before an eviction forgot the answers
    in memory, and ends after, serves what it read once, but does not keep
    it: the next client's lookup asks the index again."""
    body = b'{"schemaVersion": 2}'
    digest = str(Digest.of(body))
    kind = "application/vnd.oci.image.manifest.v1+json"
    entry = ManifestEntry(digest, kind, len(body))
    index = _SlowIndex()
    manifests = ManifestCache(_Files(body), index, Clock(), tag_ttl=3600)  # type: ignore[arg-type]
    client = SimpleNamespace(name="docker.io", config=SimpleNamespace(tag_ttl=None))
    reference = "1" if by == "tag" else digest
    first = Deferred.fromCoroutine(manifests.get(client, "library/app", reference, [kind]))
    manifests.forget_hot()  # evicted meanwhile
    [(lookup, _)] = index.asked
    lookup.callback((TagEntry(digest, kind, 0.0), entry) if by == "tag" else entry)
    assert first.result.cache == "HIT"
    Deferred.fromCoroutine(manifests.get(client, "library/app", reference, [kind]))
    assert len(index.asked) == 2  # not answered from memory


class _SlowShared:
    """A cluster's shared store that takes its time (never done here)."""

    def upload(self, *args: object) -> Deferred:
        return Deferred()


def test_a_fetch_sent_before_an_eviction_is_not_kept_after_it():
    """In a cluster a fetched manifest is answered from memory while it is
    stored in the background; one whose fetch was sent before an eviction
    forgot the answers in memory, and came back after, is not kept there."""
    body = b'{"schemaVersion": 2}'
    kind = "application/vnd.oci.image.manifest.v1+json"
    index = _SlowIndex()
    store = SimpleNamespace(  # the local copy is there already
        stat=lambda digest: len(body), path=lambda digest: "/nonexistent"
    )
    manifests = ManifestCache(store, index, Clock(), tag_ttl=3600, shared=_SlowShared())  # type: ignore[arg-type]
    sent: list[Deferred] = []

    def get_manifest(repo: str, reference: str, accept: object) -> Deferred:
        sent.append(Deferred())
        return sent[-1]

    client = SimpleNamespace(
        name="docker.io", config=SimpleNamespace(tag_ttl=None), get_manifest=get_manifest
    )
    first = Deferred.fromCoroutine(manifests.get(client, "library/app", "1", [kind]))
    [(lookup, _)] = index.asked
    lookup.callback((None, None))  # not cached: fetched
    manifests.forget_hot()  # evicted while the fetch is on its way
    sent[0].callback(Manifest(body, kind, str(Digest.of(body))))
    assert first.result.cache == "MISS"
    Deferred.fromCoroutine(manifests.get(client, "library/app", "1", [kind]))
    assert len(index.asked) == 2  # not answered from memory
