#!/usr/bin/env python3
"""A big cache stays responsive: the reactor's lag while regproxy works on a large index.

Usage, from a venv with regproxy installed::

    .venv/bin/python bench/bigindex.py [--images N] [--rate R] [--json FILE] [--keep]
    .venv/bin/python bench/bigindex.py --images 2000 --baseline DIR
    .venv/bin/python bench/bigindex.py --baseline DIR --repeat 3

It generates a cache of N images (default 20,000; 2.5 N blobs, as small real
files in a FileStore, and their rows written straight into index.db), starts
regproxy on it in this process (``makeService``, as twistd does), and
measures, while a 0.01 s LoopingCall records how late the reactor runs it:

* start-up: from makeService to the first answer to ``GET /v2/`` (the lag
  from the services' start on: twistd builds them before its reactor runs,
  which ``build_seconds`` times);
* writes: 2,000 ``put_blob`` + ``put_manifest`` on the reactor thread, as
  pulls do (each call's duration: WAL checkpoints show up here);
* sweep: a budget that makes the sweep evict N/4 images (a pinned
  repository among the oldest is passed over);
* purge: the admin API's purge of a repository with N/10 tags;
* fsck: re-hash every file and reconcile the index;
* room: 50 downloads on a full disk, one after another, each making room
  for 1/1000 of the cache (``Evictor.make_room``: on the reactor thread
  before 2026-11-29, in the index's room thread since);
* wide: 20 manifests listing 1,000 descriptors each (a cached manifest's
  most, which a hostile upstream may send) recorded as a pull records them
  (``ManifestCache._cache``);
* quiet: nothing, for reference;
* load: the manifest requests that failed, over all scenarios.

Meanwhile another process asks for one cached manifest by tag at a fixed
rate (``--rate``, default 1,000 a second; 0: none) and each scenario also
reports that manifest's p99 and worst latency while it ran: what a client
pulling then waits.

``--baseline DIR`` runs the same measurement twice in child processes, with
``DIR`` (another checkout's top directory, e.g. ``git archive main | tar -x
-C DIR``) first on ``sys.path``, then this checkout, and prints both with
their ratios; ``--repeat N`` alternates the two N times and prints each
measure's median.  Everything runs on 127.0.0.1 in a temporary directory.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import os
import random
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from types import SimpleNamespace
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TARGET_P99 = 0.020
TARGET_MAX = 0.100
TARGET_START = 2.0
#: a cached manifest's p99 at 1,000 requests a second (issue 10's hot path)
TARGET_MANIFEST_P99 = 0.003


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def generate(root: str, images: int, seed: int = 1) -> dict[str, Any]:
    """A cache of *images* images under *root*: rows and small real files.

    Each image is a manifest, a config, a base layer every image lists (as
    most images share a distribution's) and two layers from a shared pool
    (2.5 blobs per image in all).  ``library/big`` has images/10 tags, the
    rest are in repositories of 20; ``library/pinned``, among the oldest, is
    pinned.  Returns what the scenarios need: the budget that evicts a
    quarter of the images, and the names."""
    from registryproxy.cache.index import Index  # creates the schema

    rng = random.Random(seed)
    Index(os.path.join(root, "index.db")).close()
    layers = []
    for i in range(images // 2):
        data = f"layer {i} ".encode() * rng.randint(2, 12)
        layers.append((digest_of(data), data))
    base_layer = b"base layer " * 100
    layers.append((digest_of(base_layer), base_layer))
    rows_m, rows_t, rows_r, rows_rb, files = [], [], [], [], []
    big = max(images // 10, 1)
    order = list(range(big, images))
    rng.shuffle(order)  # last use, oldest first; library/big's the most recent
    order += range(big)
    used_rank = {image: rank for rank, image in enumerate(order)}
    base = time.time() - 10 * 86400
    pinned_repo = "library/pinned"
    for i in range(images):
        if i < big:
            repo = "library/big"
        else:
            repo = f"team{(i - big) // 20}/app"
        when = base + used_rank[i]
        if used_rank[i] < 20:
            repo = pinned_repo  # the 20 oldest: passed over by the sweep
        config = json.dumps({"image": i}).encode()
        chosen = [layers[-1], *rng.sample(layers[:-1], 2)]
        manifest = json.dumps(
            {
                "schemaVersion": 2,
                "config": {"digest": digest_of(config)},
                "layers": [{"digest": d} for d, _ in chosen],
            }
        ).encode()
        m = digest_of(manifest)
        files += [(m, manifest), (digest_of(config), config)]
        rows_m.append(
            (
                "docker.io",
                repo,
                m,
                "application/vnd.oci.image.manifest.v1+json",
                len(manifest),
                base - 1000 + i * 0.001,
                when,
            )
        )
        rows_t.append(("docker.io", repo, f"t{i}", "m", m, when))
        for pos, child in enumerate([digest_of(config), *(d for d, _ in chosen)]):
            rows_r.append((m, child, "blob", pos))
            rows_rb.append(("docker.io", repo, child))
    files += layers
    sizes = {d: len(data) for d, data in files}
    db = sqlite3.connect(os.path.join(root, "index.db"))
    with db:
        db.executemany(
            "INSERT INTO blobs VALUES (?, ?, ?, ?)",
            [(d, size, base - 2000, None) for d, size in sizes.items()],
        )
        db.executemany("INSERT INTO manifests VALUES (?, ?, ?, ?, ?, ?, ?)", rows_m)
        columns = [r[1] for r in db.execute("PRAGMA table_info(tags)")]
        values = {"upstream": 0, "repo": 1, "tag": 2, "media_type": 3, "digest": 4, "checked_at": 5}
        db.executemany(
            f"INSERT OR REPLACE INTO tags ({', '.join(columns)})"
            f" VALUES ({', '.join('?' * len(columns))})",
            [tuple(row[values[c]] for c in columns) for row in rows_t],
        )
        db.executemany("INSERT OR IGNORE INTO refs VALUES (?, ?, ?, ?)", rows_r)
        db.executemany("INSERT OR IGNORE INTO repo_blobs VALUES (?, ?, ?)", rows_rb)
        if db.execute("SELECT 1 FROM sqlite_master WHERE name='blob_sources'").fetchone():
            # the upstream sent every blob (a baseline from before has no such table)
            db.execute("INSERT INTO blob_sources SELECT DISTINCT digest, upstream FROM repo_blobs")
    db.close()
    for digest, data in files:
        hexa = digest.split(":")[1]
        path = os.path.join(root, "blobs", "sha256", hexa[:2], hexa)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)
    # the budget: what is left once the quarter least recently used
    # (unpinned) images and the layers only they list are gone
    holders: dict[str, int] = {}
    for _m, child, _, _ in rows_r:
        holders[child] = holders.get(child, 0) + 1
    children: dict[str, list[str]] = {}
    for m, child, _, _ in rows_r:
        children.setdefault(m, []).append(child)
    total = sum(sizes.values())
    freed = 0
    evicted = 0
    by_use = sorted(rows_m, key=lambda r: r[6])
    for row in by_use:
        if evicted == images // 4:
            break
        if row[1] == pinned_repo:
            continue
        freed += sizes[row[2]]
        for child in children[row[2]]:
            holders[child] -= 1
            if holders[child] == 0:
                freed += sizes[child]
        evicted += 1
    low_water = 0.9
    hot = max((i for i in range(big, images) if used_rank[i] >= 20), key=used_rank.__getitem__)
    return {
        "hot": f"/v2/team{(hot - big) // 20}/app/manifests/t{hot}",
        "images": images,
        "blobs": len(sizes),
        "bytes": total,
        "max_bytes": int((total - freed) / low_water) + 1,
        "low_water": low_water,
        "pinned_repo": pinned_repo,
        "big_tags": big,
    }


class Lag:
    """How late a 0.01 s LoopingCall runs, per scenario."""

    def __init__(self, reactor: Any) -> None:
        from twisted.internet.task import LoopingCall

        self._reactor = reactor
        self.samples: list[float] = []
        self._last = time.monotonic()
        self._call = LoopingCall(self._tick)
        self._call.clock = reactor

    def _tick(self) -> None:
        now = time.monotonic()
        self.samples.append(max(now - self._last - 0.01, 0.0))
        self._last = now

    def start(self) -> None:
        self._last = time.monotonic()
        self._call.start(0.01, now=False)

    @property
    def running(self) -> bool:
        return bool(self._call.running)

    def stop(self) -> None:
        self._call.stop()

    def take(self) -> list[float]:
        samples, self.samples = self.samples, []
        return samples


def quantile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(int(q * len(ordered)), len(ordered) - 1)]


async def maybe_await(value: Any) -> Any:
    if inspect.isawaitable(value):
        return await value
    return value


async def measure(
    reactor: Any,
    lag: Lag,
    name: str,
    work: Callable[[], Awaitable[Any]],
    after: Callable[[], dict[str, Any]] = dict,
) -> dict[str, Any]:
    """Run *work*, and the lag meanwhile; *after* adds what is counted once
    the lag is no longer measured (the bench's own queries are not regproxy's)."""
    from twisted.internet.task import deferLater

    await deferLater(reactor, 0.05, lambda: None)
    lag.take()
    started = time.monotonic()
    detail = await work()
    seconds = time.monotonic() - started
    await deferLater(reactor, 0.05, lambda: None)  # what the work left queued
    samples = lag.take()
    detail = {**(detail or {}), **after()}
    row = {
        "scenario": name,
        "window": (started, time.monotonic()),
        "seconds": round(seconds, 3),
        "lag_p50_ms": round(quantile(samples, 0.50) * 1000, 1),
        "lag_p99_ms": round(quantile(samples, 0.99) * 1000, 1),
        "lag_max_ms": round(max(samples, default=0.0) * 1000, 1),
        "samples": len(samples),
        **(detail or {}),
    }
    print(f"  {name}: { {k: v for k, v in row.items() if k != 'window'} }", file=sys.stderr)
    return row


class ManifestLoad:
    """A child process asking for one manifest at a fixed rate until stopped
    (``--load-child``): its own CPU and event loop, not the measured reactor's."""

    def __init__(self, url: str, path: str, rate: float) -> None:
        self._child = subprocess.Popen(
            [sys.executable, __file__, "--load-child", url, path, str(rate)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            cwd=ROOT,
        )

    def stop(self) -> Awaitable[dict[str, Any]]:
        """The latencies it measured, each with when it was sent; waited for
        in a thread, as the reactor must answer the requests still under way."""
        from twisted.internet.threads import deferToThread

        def wait() -> dict[str, Any]:
            try:
                out, _ = self._child.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                self._child.kill()  # its requests got no answer: not left behind
                raise
            return dict(json.loads(out))

        return deferToThread(wait)


def load_child(url: str, path: str, rate: float) -> None:
    """``--load-child``: GET *path* at *rate* until stdin closes; print what came back."""
    import threading

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from load import requests

    stop = threading.Event()

    def wait_for_eof() -> None:
        sys.stdin.read()
        stop.set()

    threading.Thread(target=wait_for_eof, daemon=True).start()
    accept = [("Accept", "application/vnd.oci.image.manifest.v1+json")]
    result = requests(url, "GET", path, accept, 3600.0, rate=rate, stop_early=stop)
    json.dump(
        {"sent_at": result.sent_at, "latencies": result.latencies, "errors": result.errors},
        sys.stdout,
    )


def add_manifest_latency(rows: list[dict[str, Any]], load: dict[str, Any]) -> None:
    """Each scenario's share of the manifest requests: those sent while it ran."""
    for row in rows:
        start, end = row.pop("window")
        mine = [
            latency
            for sent, latency in zip(load["sent_at"], load["latencies"], strict=True)
            if start <= sent <= end
        ]
        row["requests"] = len(mine)
        row["manifest_p99_ms"] = round(quantile(mine, 0.99) * 1000, 2)
        row["manifest_max_ms"] = round(max(mine, default=0.0) * 1000, 2)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from twisted.internet import reactor
    from twisted.internet.task import deferLater
    from twisted.web.client import Agent, readBody

    from registryproxy.admin.backend import PurgeSelector
    from registryproxy.cache.index import ManifestEntry
    from registryproxy.tap import Options, _Closing, makeService

    root = tempfile.mkdtemp(prefix="regproxy-bigindex-")
    results: dict[str, Any] = {"code": os.path.dirname(inspect.getfile(makeService))}
    lag = Lag(reactor)
    service: Any = None
    load: ManifestLoad | None = None
    try:
        cache = os.path.join(root, "cache")
        os.makedirs(cache)
        print(f"generating {args.images} images under {root}", file=sys.stderr)
        started = time.monotonic()
        plan = generate(cache, args.images)
        print(f"  generated in {time.monotonic() - started:.1f} s: {plan}", file=sys.stderr)
        results["plan"] = plan
        port = free_port()
        config = os.path.join(root, "regproxy.yaml")
        with open(config, "w") as f:
            json.dump(
                {
                    "cache": {"directory": cache},
                    "proxy": {"listen": f"tcp:{port}:interface=127.0.0.1"},
                    "admin": {"listen": "tcp:0:interface=127.0.0.1"},
                    # the tags stay fresh: no upstream to revalidate with
                    "upstreams": {"docker.io": {"url": "http://127.0.0.1:9", "tag_ttl": 1e9}},
                },
                f,
            )
        lag.start()
        rows = []

        async def start() -> dict[str, Any]:
            nonlocal service
            options = Options()
            options.parseOptions(["--config", config])
            # twistd builds and starts the services before its reactor runs:
            # no client waits on that, so it is timed, not counted as lag
            lag.stop()
            began = time.monotonic()
            service = makeService(options)  # the global reactor, as twistd
            service.privilegedStartService()
            service.startService()
            built = time.monotonic() - began
            lag.start()
            agent = Agent(reactor)
            while True:
                try:
                    response = await agent.request(b"GET", f"http://127.0.0.1:{port}/v2/".encode())
                    await readBody(response)
                    return {"status": response.code, "build_seconds": round(built, 3)}
                except Exception:
                    await deferLater(reactor, 0.01, lambda: None)

        rows.append(await measure(reactor, lag, "start-up", start))
        rows[-1].pop("window")  # the load starts once regproxy serves
        if args.rate:
            load = ManifestLoad(f"http://127.0.0.1:{port}", plan["hot"], args.rate)
        await deferLater(reactor, 1.0, lambda: None)  # its connections are up

        async def quiet() -> dict[str, Any]:
            await deferLater(reactor, 3.0, lambda: None)
            return {}

        rows.append(await measure(reactor, lag, "quiet", quiet))
        proxy = next(s for s in service if isinstance(s, _Closing))._proxy
        index, control, evictor = proxy.index, proxy.control, proxy.evictor

        def manifests() -> int:
            return int(index._db.execute("SELECT COUNT(*) FROM manifests").fetchone()[0])

        async def sweep() -> dict[str, Any]:
            evictor.max_bytes = plan["max_bytes"]
            evictor._low_water = plan["low_water"]
            evictor.pins = [("docker.io", plan["pinned_repo"], None, None)]
            return {"freed": await maybe_await(evictor.sweep())}

        before = manifests()
        rows.append(
            await measure(reactor, lag, "sweep", sweep, lambda: {"evicted": before - manifests()})
        )

        async def purge() -> dict[str, Any]:
            result = await maybe_await(
                control.purge(PurgeSelector(upstream="docker.io", repository="library/big"))
            )
            return {"manifests": result.manifests, "tags": result.tags, "files": len(result.blobs)}

        rows.append(await measure(reactor, lag, "purge", purge))

        async def fsck() -> dict[str, Any]:
            result = await control.fsck()
            return {"checked": result.checked, "forgotten": len(result.forgotten)}

        rows.append(await measure(reactor, lag, "fsck", fsck))

        async def writes() -> dict[str, Any]:
            durations = []
            rng = random.Random(2)
            for i in range(2000):
                body = f"new manifest {i} {rng.random()}".encode()
                layers = [digest_of(f"new layer {i}.{j}".encode()) for j in range(3)]
                began = time.perf_counter()
                index.put_blob(digest_of(body), len(body), time.time())
                index.put_manifest(
                    "docker.io",
                    f"fresh/app{i % 50}",
                    ManifestEntry(
                        digest_of(body), "application/vnd.oci.image.manifest.v1+json", len(body)
                    ),
                    time.time(),
                    [(d, "blob") for d in layers],
                )
                durations.append(time.perf_counter() - began)
                await deferLater(reactor, 0.001, lambda: None)
            return {
                "write_p99_ms": round(quantile(durations, 0.99) * 1000, 2),
                "write_max_ms": round(max(durations) * 1000, 2),
                "writes_over_5ms": sum(d > 0.005 for d in durations),
            }

        rows.append(await measure(reactor, lag, "writes", writes))

        async def room() -> dict[str, Any]:
            # what a download does on the reactor thread when the disk is
            # full: a disk the cache fills, each new blob 1/1000 of it
            capacity = index.total_size()
            evictor._store.room = lambda: capacity - index.total_size()
            needed = capacity // 1000
            durations = []
            for _ in range(50):
                began = time.perf_counter()
                await maybe_await(evictor.make_room(needed))
                durations.append(time.perf_counter() - began)
                capacity -= needed  # the new blob took it
                await deferLater(reactor, 0.01, lambda: None)
            return {
                "make_room_p50_ms": round(quantile(durations, 0.5) * 1000, 2),
                "make_room_max_ms": round(max(durations) * 1000, 2),
            }

        rows.append(await measure(reactor, lag, "room", room))

        async def wide() -> dict[str, Any]:
            # what a pull of manifests listing many descriptors writes (up to
            # MAX_REFS, which a hostile upstream may send), as ManifestCache
            # records them: in steps, the reactor serving others between
            # (their bodies made before, and a turn between two: the
            # bench's own work is not what is measured)
            for repo, fetched, refs in pulls:
                if takes_refs:
                    await proxy.manifests._cache(client, repo, "1", fetched, refs)
                else:
                    await proxy.manifests._cache(client, repo, "1", fetched)
                await deferLater(reactor, 0, lambda: None)
            return {"descriptors": sum(len(refs) for _, _, refs in pulls)}

        from registryproxy.cache import manifests as manifest_module

        client = SimpleNamespace(name="docker.io", config=SimpleNamespace(tag_ttl=None))
        count = getattr(manifest_module, "MAX_REFS", 1000) - 1  # (a baseline may have none)
        takes_refs = "refs" in inspect.signature(proxy.manifests._cache).parameters
        pulls = []
        for i in range(20):
            layers = [
                {"mediaType": "x", "size": 1, "digest": digest_of(b"wide %d.%d" % (i, j))}
                for j in range(count)
            ]
            config = {"mediaType": "x", "size": 1, "digest": digest_of(b"wide %d" % i)}
            body = json.dumps({"schemaVersion": 2, "config": config, "layers": layers}).encode()
            fetched = manifest_module.CachedManifest(
                body, "application/vnd.oci.image.manifest.v1+json", digest_of(body), "MISS"
            )
            pulls.append((f"wide/app{i}", fetched, manifest_module.references(body)))
        rows.append(await measure(reactor, lag, "wide", wide))
        if load is not None:
            measured = await load.stop()
            add_manifest_latency(rows[1:], measured)
            rows.append({"scenario": "load", "errors": measured["errors"]})
            load = None
        else:
            for row in rows[1:]:
                row.pop("window")
        results["rows"] = rows
    finally:
        if load is not None:
            await load.stop()
        if lag.running:
            lag.stop()
        if service is not None and service.running:
            await service.stopService()  # its threads would keep the process alive
        if args.keep:
            print(f"kept {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)
    return results


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One run whose every number is the median of *runs*' (the machine's
    noise moves a p99 by 2x from one run to the next)."""
    merged = json.loads(json.dumps(runs[0]))
    for i, row in enumerate(merged["rows"]):
        for key, value in row.items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                values = sorted(r["rows"][i][key] for r in runs)
                row[key] = values[len(values) // 2]
    return merged


def table(runs: list[dict[str, Any]]) -> str:
    names = ["before", "after"] if len(runs) == 2 else ["regproxy"]
    keys = ["seconds", "lag_p99_ms", "lag_max_ms"]
    lines = [f"images: {runs[-1]['plan']['images']}, blobs: {runs[-1]['plan']['blobs']}"]
    header = f"{'scenario':<10} {'measure':<12}" + "".join(f"{n:>12}" for n in names)
    if len(runs) == 2:
        header += f"{'after/before':>14}"
    lines += [header + f"{'target':>10}", "-" * len(header + "x" * 10)]
    for i, row in enumerate(runs[-1]["rows"]):
        scenario = row["scenario"]
        extra = [k for k in row if k not in (*keys, "scenario", "samples", "lag_p50_ms")]
        for key in [k for k in keys if k in row] + extra:
            values = [r["rows"][i].get(key) for r in runs]
            line = f"{scenario:<10} {key:<12}" + "".join(f"{v!s:>12}" for v in values)
            if len(runs) == 2:
                a, b = values
                ratio = f"{b / a:.3f}" if isinstance(a, int | float) and a else "-"
                line += f"{ratio:>14}"
            target = {
                "lag_p99_ms": f"<{TARGET_P99 * 1000:.0f}",
                "lag_max_ms": f"<{TARGET_MAX * 1000:.0f}",
                "manifest_p99_ms": f"<{TARGET_MANIFEST_P99 * 1000:.0f}",
            }.get(key, f"<{TARGET_START:.0f}" if (scenario, key) == ("start-up", "seconds") else "")
            line += f"{target:>10}"
            lines.append(line)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--images", type=int, default=20_000)
    parser.add_argument("--json", help="also write every measured value to this file")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument("--baseline", help="another checkout to compare with (see above)")
    parser.add_argument(
        "--rate", type=float, default=1000.0, help="manifest GETs a second meanwhile (0: none)"
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="with --baseline: alternate the two this many times and print each measure's median",
    )
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--load-child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.load_child:
        url, path, rate = args.load_child
        load_child(url, path, float(rate))
        return 0
    if args.baseline:
        runs = []
        for code in [os.path.abspath(args.baseline), ROOT] * max(args.repeat, 1):
            with tempfile.NamedTemporaryFile(suffix=".json") as out:
                env = {**os.environ, "PYTHONPATH": code}
                print(f"running with {code}", file=sys.stderr)
                subprocess.run(
                    [
                        sys.executable,
                        __file__,
                        "--child",
                        "--images",
                        str(args.images),
                        "--rate",
                        str(args.rate),
                        "--json",
                        out.name,
                    ],
                    env=env,
                    check=True,
                    cwd=code,
                )
                with open(out.name) as f:
                    runs.append(json.load(f))
    else:
        if ROOT not in sys.path and not args.child:
            sys.path.insert(0, ROOT)
        from twisted.internet import reactor
        from twisted.internet.defer import Deferred
        from twisted.internet.task import react

        found: list[dict[str, Any]] = []

        def go(_: Any) -> Deferred[None]:
            async def body() -> None:
                found.append(await run(args))

            return Deferred.fromCoroutine(body())

        try:
            react(go, [])
        except SystemExit as e:
            if e.code:
                raise
        del reactor
        runs = found
    if args.json:
        with open(args.json, "w") as f:
            json.dump(runs[-1] if args.child else runs, f, indent=1)
    if not args.child:
        print(table([median_run(runs[0::2]), median_run(runs[1::2])] if len(runs) > 2 else runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
