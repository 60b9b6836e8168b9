#!/usr/bin/env python3
"""The cluster's index in PostgreSQL: how long each hot-path call takes.

Usage, from a venv with regproxy installed (``pip install '.[test]'``)::

    .venv/bin/python bench/pgindex.py [--images N] [--calls N] [--dsn DSN]

Without ``--dsn`` it starts a throw-away PostgreSQL 15 on 127.0.0.1 (the
cluster tests' engine: fsync off), else it uses an empty database you name.
It fills the index with N images (default 2,000: a manifest, a tag and three
layers each), then times ``--calls`` (default 500) calls of each hot-path
method in one worker thread, as the index's thread pool runs them, and
prints the median, 90th and 99th percentile in milliseconds; then one
eviction of 100 images and one purge of a repository.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def timed(calls: int, fn: Callable[[int], object]) -> list[float]:
    took = []
    for i in range(calls):
        start = time.perf_counter()
        fn(i)
        took.append((time.perf_counter() - start) * 1000)
    return took


def measure(index: Any, images: int, calls: int) -> None:
    from registryproxy.cache.index import ManifestEntry, TagEntry

    mt = "application/vnd.oci.image.manifest.v1+json"
    index.open()
    now = time.time()
    index.put_blobs([(f"sha256:l{i}-{k}", 1000, now) for i in range(images) for k in range(3)])
    for i in range(images):
        refs = [(f"sha256:l{i}-{k}", "blob") for k in range(3)]
        index.put_manifest("u", f"r{i % 100}", ManifestEntry(f"sha256:m{i}", mt, 500), now, refs)
        index.put_tag("u", f"r{i % 100}", f"t{i}", TagEntry(f"sha256:m{i}", mt, now))

    def new_manifest(i: int) -> None:
        refs = [(f"sha256:n{i}-{k}", "blob") for k in range(3)]
        index.put_manifest("u", "new", ManifestEntry(f"sha256:n{i}", mt, 500), now, refs)

    def flush(i: int) -> None:
        for k in range(20):
            index.touch_manifest("u", f"r{k}", f"sha256:m{(i * 20 + k) % images}", now + i)
            index.touch_blob(f"sha256:l{(i * 20 + k) % images}-0", now + i)
        index.flush()

    results = {
        "put_manifest (3 refs)": timed(calls, new_manifest),
        "put_tag": timed(
            calls, lambda i: index.put_tag("u", "new", f"t{i}", TagEntry(f"sha256:n{i}", mt, now))
        ),
        "put_blob": timed(calls, lambda i: index.put_blob(f"sha256:n{i}-0", 1000, now)),
        "link_blobs (1)": timed(
            calls, lambda i: index.link_blobs("u", "other", [f"sha256:n{i}-0"])
        ),
        "flush (20 + 20 touches)": timed(calls, flush),
        "tag": timed(calls, lambda i: index.tag("u", f"r{i % 100}", f"t{i}")),
        "manifest": timed(calls, lambda i: index.manifest("u", f"r{i % 100}", f"sha256:m{i}")),
        "has_blob": timed(calls, lambda i: index.has_blob("u", "new", f"sha256:n{i}-1")),
    }
    print(f"{images} images; {calls} calls each, one thread; ms: median p90 p99")
    for name, took in results.items():
        q = statistics.quantiles(took, n=100)
        print(f"  {name:26} {statistics.median(took):6.2f} {q[89]:6.2f} {q[98]:6.2f}")
    start = time.perf_counter()
    evicted = index.evict(limit=100)
    took = (time.perf_counter() - start) * 1000
    print(f"  evict(limit=100): {len(evicted.images)} images in {took:.1f} ms")
    start = time.perf_counter()
    removed = index.purge("u", "r50")
    took = (time.perf_counter() - start) * 1000
    print(f"  purge of a repository: {removed.manifests} manifests in {took:.1f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--calls", type=int, default=500)
    parser.add_argument("--dsn", help="an empty database to use (default: start PostgreSQL)")
    args = parser.parse_args()
    # this checkout's regproxy, and the cluster tests' engines
    sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

    from twisted.internet import reactor
    from twisted.internet.defer import ensureDeferred
    from twisted.internet.task import react
    from twisted.internet.threads import deferToThreadPool
    from twisted.python.threadpool import ThreadPool

    from registryproxy.cluster.engineconfig import PgSettings
    from registryproxy.cluster.pg import Database
    from registryproxy.cluster.pgindex import PgIndex

    engine = None
    dsn = args.dsn
    if dsn is None:
        from cluster.engines import Postgres

        workdir = Path(tempfile.mkdtemp(prefix="regproxy-bench-pg-"))
        workdir.chmod(0o711)
        engine = Postgres(workdir / "postgres")
        engine.start()
        dsn = engine.create_database("bench")

    async def run(_: Any) -> None:
        pool = ThreadPool(minthreads=0, maxthreads=4, name="bench-pgindex")
        pool.start()
        db = Database(PgSettings(dsn=dsn), pool, reactor)
        try:
            await db.open()
            index = PgIndex(db)
            await deferToThreadPool(reactor, pool, measure, index, args.images, args.calls)
            await db.close()
        finally:
            pool.stop()

    try:
        react(lambda r: ensureDeferred(run(r)))
    finally:
        if engine is not None:
            engine.stop()
            shutil.rmtree(engine.workdir.parent, ignore_errors=True)


if __name__ == "__main__":
    main()
