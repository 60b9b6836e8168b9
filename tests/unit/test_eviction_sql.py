"""The index's SQL selection for eviction and purges gives the old per-row
code's answers (random small indexes, one per seed: REGPROXY_FUZZ_EXAMPLES
seeds for a thorough run), and its queries use indexes."""

from __future__ import annotations

import random
import re
import sqlite3

import pytest
from fuzzing import examples
from old_eviction import OldIndex, old_evict, old_evict_loose

from registryproxy.cache import eviction
from registryproxy.cache import index as index_module
from registryproxy.cache.index import Index, ManifestEntry, Pace, TagEntry

UPSTREAMS = ("docker.io", "ghcr.io")


def d(name: str) -> str:
    return "sha256:" + name.encode().hex().ljust(64, "0")[:64]


def fill(index: Index, seed: int) -> dict:
    """A random small cache: images sharing layers, indexes (some sharing a
    platform manifest), one manifest in two repositories, tags, untagged
    manifests, loose blobs, distinct access times.  What it made, to pick
    pins, busy blobs and purges from."""
    rng = random.Random(seed)
    clock = iter(rng.sample(range(1, 10_000), 1000))
    layers = [f"layer{i}" for i in range(rng.randint(3, 12))]
    made: dict = {"manifests": [], "tags": [], "layers": layers, "repos": set()}
    # an image manifest's layers, the same in every repository it is cached
    # for: a digest names one content (an image, never also an index)
    contents: dict[str, list[str]] = {}
    for i in range(rng.randint(2, 14)):
        upstream, repo = rng.choice(UPSTREAMS), f"r{rng.randint(0, 3)}"
        made["repos"].add((upstream, repo))
        platforms = []
        for p in range(rng.choice([1, 1, 2, 3])):
            name = f"m{i}.{p}" if rng.random() < 0.9 or not contents else None
            if name is None:  # a manifest cached for another repository too
                name = rng.choice(sorted(contents))
            listed = rng.sample(layers, rng.randint(1, min(3, len(layers))))
            listed = contents.setdefault(name, listed)
            for layer in listed:
                index.put_blob(d(layer), rng.randint(1, 500), next(clock))
            index.put_blob(d(name), rng.randint(1, 50), next(clock))
            index.put_manifest(
                upstream,
                repo,
                ManifestEntry(d(name), "application/vnd.oci.image.manifest.v1+json", 10),
                next(clock),
                [(d(layer), "blob") for layer in listed],
            )
            platforms.append(name)
            made["manifests"].append((upstream, repo, name))
        top = platforms[0]
        if len(platforms) > 1:
            top = f"i{i}"
            children = list(platforms)
            shared = [
                m for u, r, m in made["manifests"] if (u, r) == (upstream, repo) and m in contents
            ]
            if rng.random() < 0.3 and shared:
                children.append(rng.choice(shared))  # a platform another index lists too
            index.put_blob(d(top), 20, next(clock))
            index.put_manifest(
                upstream,
                repo,
                ManifestEntry(d(top), "application/vnd.oci.image.index.v1+json", 20),
                next(clock),
                [(d(child), "manifest") for child in dict.fromkeys(children)],
            )
            made["manifests"].append((upstream, repo, top))
        for _ in range(rng.choice([0, 1, 1, 2])):
            tag = f"t{rng.randint(0, 4)}"
            index.put_tag(upstream, repo, tag, TagEntry(d(top), "m", next(clock)))
            made["tags"].append((upstream, repo, tag))
        for u, r, m in rng.sample(made["manifests"], min(3, len(made["manifests"]))):
            index.touch_manifest(u, r, d(m), next(clock))
    for i in range(rng.randint(0, 3)):
        index.put_blob(d(f"loose{i}"), rng.randint(1, 300), next(clock))
        if rng.random() < 0.5:
            index.touch_blob(d(f"loose{i}"), next(clock))
    index.flush()
    return made


def pick_pins(rng: random.Random, made: dict) -> list:
    pins = []
    for _ in range(rng.choice([0, 0, 1, 2])):
        kind = rng.choice(["repo", "tag", "digest"])
        if kind == "repo":
            upstream, repo = rng.choice(sorted(made["repos"]))
            pins.append((upstream, repo, None, None))
        elif kind == "tag" and made["tags"]:
            pins.append((*rng.choice(made["tags"]), None))
        else:
            upstream, repo, name = rng.choice(made["manifests"])
            pins.append((upstream, repo, None, d(name)))
    return pins


def state(index: Index) -> dict:
    db = index._db
    return {
        table: sorted(db.execute(f"SELECT * FROM {table}").fetchall())
        for table in ("manifests", "tags", "refs", "blobs", "repo_blobs")
    }


def twins(tmp_path, seed: int, salt: int):
    """The same random cache under the old code and the new, a random
    generator for the rest of the case, and random pins and busy blobs."""
    old, new = OldIndex(str(tmp_path / "old.db")), Index(str(tmp_path / "new.db"))
    made = fill(old, seed)
    assert fill(new, seed) == made
    rng = random.Random(seed * salt + 1)
    pins = pick_pins(rng, made)
    busy = set(rng.sample([d(x) for x in made["layers"]], rng.randint(0, 2)))
    return old, new, made, rng, pins, busy


def agree(old: OldIndex, new: Index, old_freed: list, freed: list) -> None:
    assert sorted(freed) == sorted(old_freed)
    assert state(new) == state(old)
    old.close()
    new.close()


def evict_all(new: Index, pins, busy, limit, used_before=None, target=None):
    """Batches of *limit* until done, as the sweep does."""
    images, freed = [], []
    while True:
        excess = None if target is None else new.total_size() - target
        evicted = new.evict(pins, busy, limit, used_before, excess)
        images += [image[:3] for image in evicted.images]
        freed += evicted.removed.blobs
        if not evicted.more:
            return images, freed


@pytest.mark.parametrize("seed", range(examples(20)))
def test_over_budget_selection_matches_the_old_loop(tmp_path, seed):
    old, new, made, rng, pins, busy = twins(tmp_path, seed, 7)
    target = old.total_size() * rng.choice([0.0, 0.3, 0.6, 0.9, 1.0])
    old_images, old_freed = old_evict(old, pins, busy, lambda _: old.total_size() > target)
    old_freed += old_evict_loose(old, busy, old.total_size() - target)
    images, freed = evict_all(new, pins, busy, rng.choice([1, 2, 3, 100]), target=target)
    while loose := new.evict_loose(busy, new.total_size() - target, 2):
        freed += loose
    assert set(images) >= set(old_images)  # the new one also names images of no row left
    agree(old, new, old_freed, freed)


@pytest.mark.parametrize("seed", range(examples(15)))
def test_idle_selection_matches_the_old_loop(tmp_path, seed):
    old, new, made, rng, pins, busy = twins(tmp_path, seed, 11)
    cutoff = rng.randint(0, 10_000)
    _, old_freed = old_evict(old, pins, busy, lambda used: used < cutoff)
    _, freed = evict_all(new, pins, busy, rng.choice([1, 2, 100]), used_before=cutoff)
    agree(old, new, old_freed, freed)


@pytest.mark.parametrize("seed", range(examples(20)))
def test_purges_match_the_old_loop(tmp_path, seed):
    old, new, made, rng, _, _ = twins(tmp_path, seed, 13)
    upstream, repo, name = rng.choice(made["manifests"])
    selector = rng.choice(
        [
            {"upstream": upstream, "repo": repo},
            {"upstream": upstream},
            {"upstream": upstream, "repo": repo, "digest": d(name)},
            {"unused_since": rng.randint(0, 10_000)},
            {"fetched_before": rng.randint(0, 10_000)},
            {},
        ]
        + [dict(zip(("upstream", "repo", "tag"), tag, strict=True)) for tag in made["tags"][:2]]
    )
    expected = old.purge(**selector)
    removed = new.purge(**selector, batch=rng.choice([1, 2, 500]))
    assert (removed.tags, removed.manifests) == (expected.tags, expected.manifests)
    assert removed.blobs == expected.blobs  # in the same order, too
    agree(old, new, expected.blobs, removed.blobs)


#: scans of these (or of these aliases of them in the SQL) read a whole table
_TABLES = r"(manifests|refs|tags|blobs|repo_blobs|m|p|c|r|r2|rc|t|b)"
#: walked in order, as far as the LIMIT needs
_ORDERED = ("USING INDEX manifests_used", "USING INDEX blobs_used")


def test_the_selection_uses_indexes(tmp_path):
    index = Index(str(tmp_path / "index.db"))
    made = fill(index, 3)
    statements: list[str] = []
    index._db.set_trace_callback(statements.append)
    pins = [("docker.io", "r1", None, None), (*made["tags"][0], None)]
    index.evict(pins, {d("layer1")}, 2, excess=100)
    index.evict(pins, {d("layer1")}, 2, used_before=5000)
    index.evict_loose({d("layer1")}, 100, 10)
    upstream, repo, name = made["manifests"][-1]
    index.purge(upstream=upstream, repo=repo, digest=d(name))
    index.purge(*made["tags"][-1])
    index.purge(upstream=upstream, repo=repo)
    index._db.set_trace_callback(None)
    checked = 0
    for sql in statements:
        if not re.match(r"\s*(SELECT|INSERT|DELETE|WITH)", sql, re.I):
            continue
        try:
            plan = [row[3] for row in index._db.execute(f"EXPLAIN QUERY PLAN {sql}")]
        except sqlite3.ProgrammingError:
            continue  # executemany's statement, traced with its values bound
        checked += 1
        for line in plan:
            if re.match(rf"SCAN {_TABLES}\b", line) and not line.endswith(_ORDERED):
                raise AssertionError(f"{line!r} in the plan of {sql}")
    assert checked > 20
    index.close()


def shared_base(path: str, images: int) -> Index:
    """*images* images in ten repositories, oldest first, each listing a
    base layer all of them share and a layer of its own."""
    index = Index(path)
    index.put_blob(d("base"), 1000, 1)
    for i in range(images):
        index.put_blob(d(f"layer{i}"), 10, 1)
        index.put_blob(d(f"m{i}"), 1, 1)
        index.put_manifest(
            "docker.io",
            f"r{i % 10}",
            ManifestEntry(d(f"m{i}"), "application/vnd.oci.image.manifest.v1+json", 1),
            1 + i,
            [(d("base"), "blob"), (d(f"layer{i}"), "blob")],
        )
    return index


def vm_steps(index: Index, call) -> tuple[int, object]:
    """The hundreds of SQLite virtual machine steps *call()* takes on the
    index's connection (work, whatever the machine's speed), and its result."""
    steps = [0]

    def count() -> int:
        steps[0] += 1
        return 0  # go on

    index._db.set_progress_handler(count, 100)
    try:
        result = call()
    finally:
        index._db.set_progress_handler(None, 100)
    return steps[0], result


def test_making_room_does_not_grow_with_the_images_sharing_a_layer(tmp_path):
    """Whether a layer is freed is asked of its holders outside the batch
    (making room for a download runs on the reactor thread): the base layer
    every image lists costs a step, not a row per image."""
    work = []
    for images in (100, 1000):
        index = shared_base(str(tmp_path / f"{images}.db"), images)
        steps, evicted = vm_steps(index, lambda index=index: index.evict([], set(), 16, excess=5))
        # the oldest image goes alone: its own layer frees the 5 bytes
        assert [image[2] for image in evicted.images] == [d("m0")]
        work.append(steps)
        index.close()
    assert work[1] < 1.5 * work[0], work


def test_loose_blobs_are_chosen_without_the_write_lock(tmp_path):
    """The look for loose blobs may read every blob's row; meanwhile the
    other connection (the reactor thread's) still writes at once.  With a
    window, it looks among that many least recently used blobs only."""
    index = shared_base(str(tmp_path / "index.db"), 50)
    for i in range(5):
        index.put_blob(d(f"loose{i}"), 10, 100 + i)  # newer than every layer
    other = index.companion()
    other._db.execute("PRAGMA busy_timeout=0")
    wrote: list[bool] = []

    def write() -> int:
        try:
            other.put_blob(d(f"new{len(wrote)}"), 1, 10**6)
            wrote.append(True)
        except sqlite3.OperationalError:  # database is locked
            wrote.append(False)
        return 0

    index._db.set_progress_handler(write, 50)
    loose = index.evict_loose(set(), 15, 10)
    index._db.set_progress_handler(None, 50)
    assert sorted(loose) == [(d(f"loose{i}"), 10) for i in range(2)]
    assert wrote[0] is True, wrote  # the look held no lock
    assert False in wrote  # the forgetting did
    # the 50 layers of their own, the base and the 50 manifests' rows are
    # older than the loose blobs: a window of 100 does not reach them
    assert index.evict_loose(set(), 15, 10, window=100) == []
    assert index.evict_loose(set(), 15, 10, window=200) == [(d(f"loose{i}"), 10) for i in (2, 3)]
    other.close()
    index.close()


def test_a_heavy_transaction_takes_what_fits_in_the_hold():
    pace = Pace(100)
    assert pace.size == 8  # a first transaction, of unknown cost, is small
    pace.took(0.004, 8)  # 0.5 ms an item: 20 fit in HOLD_SECONDS
    assert pace.size == int(index_module.HOLD_SECONDS / 0.0005)
    pace.took(0.0001, 20)
    assert pace.size == 100  # at most
    pace.took(0.5, 1)
    assert pace.size == 1  # at least one
    pace.took(0.1, 0)  # nothing done, nothing learnt
    assert pace.size == 1


class NoFiles:
    """A store whose files are gone already."""

    def stat(self, digest):
        return None

    def delete(self, digest):
        return False

    def room(self):
        return 0


def test_purges_and_sweeps_go_at_the_pace(tmp_path, monkeypatch):
    """With a hold no item fits in, every transaction after the first
    (of 8) takes one: the batches follow the time they took."""
    monkeypatch.setattr(index_module, "HOLD_SECONDS", 1e-12)
    index = shared_base(str(tmp_path / "purged.db"), 30)
    statements: list[str] = []
    index._db.set_trace_callback(statements.append)
    assert index.purge(upstream="docker.io", batch=500).manifests == 30
    index._db.set_trace_callback(None)
    batches = sum(s.startswith("DELETE FROM temp.purging WHERE rowid") for s in statements)
    assert batches == 1 + 22
    index.close()

    index = shared_base(str(tmp_path / "swept.db"), 30)
    pace = Pace(eviction.SWEEP_BATCH)
    sizes = []
    for _ in range(3):
        evicted, _ = eviction._batch(NoFiles(), [], set(), None, lambda ix: None, pace, index)
        sizes.append(len(evicted.images))
    assert sizes == [8, 1, 1]
    index.close()


def test_evicting_an_upstreams_last_image_leaves_its_word(tmp_path):
    """Eviction is no statement of trust: an upstream whose last image it
    took still vouches for the bytes it sent (a purge is what takes that
    back, in the worker thread, not eviction on the reactor thread)."""
    index = shared_base(str(tmp_path / "index.db"), 20)
    index.put_blob(d("lone"), 1, 0)
    index.put_manifest(
        "lone.example",
        "x",
        ManifestEntry(d("lone"), "application/vnd.oci.image.manifest.v1+json", 1),
        0,
        [(d("base"), "blob")],
    )
    index.link_blobs("lone.example", "x", [d("base")])
    evicted = index.evict([], set(), 16, excess=1)
    assert [image[2] for image in evicted.images] == [d("lone")]
    assert index.blob_known("lone.example", "y", d("base")) == "upstream"
    index.purge(upstream="lone.example")
    assert index.blob_known("lone.example", "y", d("base")) is None
    index.close()
