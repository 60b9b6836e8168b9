#!/usr/bin/env python3
"""regproxy beside CNCF Distribution's proxy (the peer) and nginx (the limit).

Usage, from a venv with regproxy installed (its ``twistd`` runs the proxy)::

    .venv/bin/python bench/run.py [--quick] [--runs N] [--json FILE] [--keep]

Everything runs on 127.0.0.1 in one temporary directory, removed at the end
(also on Ctrl-C) unless ``--keep``.  See bench/README.rst for reading the table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from types import FrameType

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import load, servers  # noqa: E402
from tests.integration import harness, images  # noqa: E402

MiB = 1024 * 1024
MB = 1_000_000
SYSTEMS = ("regproxy", "peer", "nginx")
ACCEPT = [("Accept", ", ".join(images.MANIFEST_TYPES))]


@dataclass(frozen=True)
class Plan:
    runs: int
    app_layers: tuple[int, ...]  #: random layers of the pulled image, besides two of small files
    big_bytes: int  #: the warm-download blob (and the RSS test's)
    burst_bytes: int  #: the blob many clients pull cold at once
    burst_clients: int
    rss_clients: int  #: clients downloading the big blob at once while RSS is watched
    rate: float  #: manifest requests/s for the latency rows
    rate_seconds: float
    max_seconds: float


FULL = Plan(
    runs=3,
    app_layers=(40 * MiB, 16 * MiB, 6 * MiB, 2 * MiB),
    big_bytes=1024 * MiB,
    burst_bytes=200 * MB,
    burst_clients=50,
    rss_clients=50,
    rate=1000,
    rate_seconds=8,
    max_seconds=4,
)
QUICK = Plan(
    runs=1,
    app_layers=(4 * MiB, 1 * MiB),
    big_bytes=64 * MiB,
    burst_bytes=16 * MiB,
    burst_clients=50,
    rss_clients=50,
    rate=1000,
    rate_seconds=2,
    max_seconds=1.5,
)

_t0 = time.monotonic()


def say(message: str) -> None:
    print(f"[{time.monotonic() - _t0:6.1f}s] {message}", file=sys.stderr, flush=True)


# -- images --------------------------------------------------------------------


def build_image(directory: Path, name: str, layers: list[images.LayerFiles]) -> images.Image:
    """A one-platform OCI image ``library/<name>:1`` in a ``dir:`` layout; random
    layers are streamed to disk (gzip level 0: stored blocks, as fast as it gets)."""

    def build(w: images.LayoutWriter, rng: random.Random) -> images.Image:
        return w.add_image(layers, "oci", gzip_level=0, name=name)

    return images.build_layout(images.ImageSpec(name, f"library/{name}", "1", build), directory)


def build_images(plan: Plan, directory: Path) -> dict[str, images.Image]:
    rng = random.Random("regproxy-bench")
    app_layers: list[images.LayerFiles] = [images.small_files(rng, 100, 2000, "etc")]
    app_layers += [{f"usr/lib/part{i}.bin": size} for i, size in enumerate(plan.app_layers)]
    app_layers.append(images.small_files(rng, 50, 20_000, "usr/share"))
    return {
        "app": build_image(directory / "app", "app", app_layers),
        "big": build_image(directory / "big", "big", [{"data/big.bin": plan.big_bytes}]),
        "burst": build_image(directory / "burst", "burst", [{"data/burst.bin": plan.burst_bytes}]),
    }


def blob_path(image: images.Image) -> str:
    return f"/v2/{image.repository}/blobs/{image.biggest_layer.digest}"


def manifest_path(image: images.Image) -> str:
    return f"/v2/{image.repository}/manifests/{image.tag}"


# -- results -------------------------------------------------------------------


class Results:
    """metric -> system -> one value per run."""

    def __init__(self) -> None:
        self.values: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
        self.warnings: list[str] = []

    def add(self, metric: str, system: str, value: float) -> None:
        self.values[metric][system].append(value)

    def warn(self, message: str) -> None:
        say("WARNING: " + message)
        self.warnings.append(message)

    def get(self, metric: str, system: str, how: Callable[[list[float]], float]) -> float:
        values = self.values.get(metric, {}).get(system, [])
        return how(values) if values else math.nan


@dataclass(frozen=True)
class Row:
    metric: str
    label: str
    better: str  #: "lower" or "higher"
    digits: int = 2
    how: Callable[[list[float]], float] = load.median
    target: Callable[[dict[str, float]], tuple[str, bool]] | None = None


def burst_rows(
    plan: Plan,
    subject: str,
    wall_target: Callable[[dict[str, float]], tuple[str, bool]] | None = None,
) -> list[Row]:
    """The rows of many clients on one cold blob; *subject* copies it once."""
    one_copy = plan.burst_bytes / MB * 1.05
    return [
        Row(
            "burst_wall",
            f"{plan.burst_clients} clients, same cold {_size(plan.burst_bytes)} blob: wall (s)",
            "lower",
            target=wall_target,
        ),
        Row(
            "burst_upstream",
            f"  ... bytes from upstream (MB; one copy = {plan.burst_bytes / MB:.0f})",
            "lower",
            0,
            target=lambda v: ("one copy", v[subject] <= one_copy),
        ),
        Row("burst_cpu", "  ... server CPU (s per GB sent)", "lower"),
    ]


def manifest_rows(plan: Plan, subject: str, p99_ms: float) -> list[Row]:
    """The rows of manifest requests by tag; *subject*'s p99 under *p99_ms*."""
    rate = f"{plan.rate:g}/s"

    def p99(v: dict[str, float]) -> tuple[str, bool]:
        return (f"< {p99_ms:g} ms", v[subject] < p99_ms)

    return [
        Row("head_max", "manifest HEAD by tag, flat out (req/s)", "higher", 0),
        Row("get_max", "manifest GET by tag, flat out (req/s)", "higher", 0),
        Row("get_cpu", "  ... server CPU (ms per request)", "lower"),
        Row("head_rate", f"manifest HEAD by tag at {rate}: achieved (req/s)", "higher", 0),
        Row("head_p50", "  ... p50 (ms)", "lower"),
        Row("head_p99", "  ... p99 (ms)", "lower", target=p99),
        Row("get_rate", f"manifest GET by tag at {rate}: achieved (req/s)", "higher", 0),
        Row("get_p50", "  ... p50 (ms)", "lower"),
        Row("get_p99", "  ... p99 (ms)", "lower", target=p99),
        Row("get_upstream", "  ... upstream requests per 1000 GETs", "lower", 1),
    ]


def _rows(plan: Plan) -> list[Row]:
    big = _size(plan.big_bytes)
    return [
        Row(
            "pull_cold",
            "cold pull, skopeo (s)",
            "lower",
            target=lambda v: ("<= 1.1x peer", v["regproxy"] <= 1.1 * v["peer"]),
        ),
        Row("pull_warm", "warm pull, skopeo (s)", "lower"),
        Row(
            "blob_warm",
            f"warm {big} blob, 1 client (MB/s)",
            "higher",
            0,
            target=lambda v: (
                ">= peer, >= 0.6x nginx",
                v["regproxy"] >= v["peer"] and v["regproxy"] >= 0.6 * v["nginx"],
            ),
        ),
        Row("blob_warm_cpu", "  ... server CPU (s per GB sent)", "lower"),
        Row(
            "blob_restart",
            "  ... first read after a restart (MB/s; regproxy hashes it meanwhile)",
            "higher",
            0,
        ),
        *burst_rows(plan, "regproxy", lambda v: ("<= peer", v["regproxy"] <= v["peer"])),
        *manifest_rows(plan, "regproxy", 5),
        Row(
            "many_big_rate",
            f"{plan.rss_clients} clients, warm {big} blob: total (MB/s)",
            "higher",
            0,
        ),
        Row("many_big_cpu", "  ... server CPU (s per GB sent)", "lower"),
        Row(
            "rss_many_big",
            f"  ... peak RSS (MB), {plan.rss_clients} clients x {big}",
            "lower",
            0,
            max,
            target=lambda v: ("< 200 MB", v["regproxy"] < 200),
        ),
        Row("rss_peak", "peak RSS (MB), whole benchmark", "lower", 0, max),
    ]


def _size(n: int) -> str:
    if n % (1024 * MiB) == 0:
        return f"{n // (1024 * MiB)} GiB"
    if n % MiB == 0:
        return f"{n // MiB} MiB"
    return f"{n / MB:g} MB"


def _fmt(value: float, digits: int) -> str:
    return "-" if math.isnan(value) else f"{value:,.{digits}f}"


def _ratio(a: float, b: float) -> str:
    if math.isnan(a) or math.isnan(b) or b == 0:
        return "-"
    return f"{a / b:.2f}x"


def render(
    rows: Iterable[Row],
    results: Results,
    systems: Sequence[str],
    ratios: Sequence[tuple[str, str, str]],
) -> str:
    """The table: one column per system (the first is the one measured against
    the targets), then *ratios* (label, numerator, denominator), target, verdict."""
    subject = systems[0]
    header = ["", *systems, *(label for label, _, _ in ratios), "target", ""]
    numbers = len(systems) + len(ratios)
    lines = [header]
    for row in rows:
        v = {s: results.get(row.metric, s, row.how) for s in systems}
        if all(math.isnan(x) for x in v.values()):
            continue
        target, verdict = "", ""
        if row.target is not None:
            target, met = row.target(v)
            if not math.isnan(v[subject]) and "(" not in target:
                verdict = "ok" if met else "MISS"
        arrow = "v" if row.better == "lower" else "^"
        lines.append(
            [
                f"{row.label} {arrow}",
                *(_fmt(v[s], row.digits) for s in systems),
                *(_ratio(v[a], v[b]) for _, a, b in ratios),
                target,
                verdict,
            ]
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = []
    for n, line in enumerate(lines):
        cells = [line[0].ljust(widths[0])]
        cells += [
            c.rjust(w) for c, w in zip(line[1 : numbers + 1], widths[1 : numbers + 1], strict=True)
        ]
        cells += [line[numbers + 1].ljust(widths[numbers + 1]), line[numbers + 2]]
        out.append("  ".join(cells).rstrip())
        if n == 0:
            out.append("-" * len(out[0]))
    return "\n".join(out)


def table(plan: Plan, results: Results) -> str:
    ratios = [("rp/peer", "regproxy", "peer"), ("rp/nginx", "regproxy", "nginx")]
    return render(_rows(plan), results, SYSTEMS, ratios)


# -- the benchmark ---------------------------------------------------------------


class Bench:
    def __init__(self, plan: Plan, tmp: Path, stack: contextlib.ExitStack) -> None:
        self.plan = plan
        self.tmp = tmp
        self.results = Results()
        self.skopeo = harness.Skopeo(tmp / "skopeo")
        say("building images")
        self.images = build_images(plan, tmp / "layouts")
        self.upstream = start_upstream(tmp, stack, self.skopeo, self.images.values())
        self.start_systems(stack)

    def start_systems(self, stack: contextlib.ExitStack) -> None:
        """Start the systems compared (stopped by *stack*)."""
        tmp = self.tmp
        self.nginx = servers.Nginx(_mkdir(tmp / "nginx"), images.OCI_MANIFEST)
        for image in self.images.values():
            assert image.layout is not None
            by_digest = f"/v2/{image.repository}/manifests/{image.manifest_digest}"
            for path in (manifest_path(image), by_digest):
                self.nginx.publish(path, image.layout / "manifest.json")
            for blob in image.blobs.values():
                self.nginx.publish(
                    f"/v2/{image.repository}/blobs/{blob.digest}", image.layout / blob.hex
                )
        self.nginx.start()
        stack.callback(self.nginx.stop)

        self.regproxy = servers.RegProxy(
            _mkdir(tmp / "regproxy"), {"upstreams": {"docker.io": {"url": self.upstream.url}}}
        )
        self.regproxy.start()
        stack.callback(self.regproxy.stop)
        self.peer = servers.Registry(_mkdir(tmp / "peer"), remote_url=self.upstream.url)
        self.peer.start()
        stack.callback(self.peer.stop)
        say(f"regproxy {self.regproxy.url}, peer {self.peer.url}, nginx {self.nginx.url}")

    def server(self, system: str) -> servers.Registry | servers.RegProxy | servers.Nginx:
        servers_by_name: dict[str, servers.Registry | servers.RegProxy | servers.Nginx] = {
            "regproxy": self.regproxy,
            "peer": self.peer,
            "nginx": self.nginx,
        }
        return servers_by_name[system]

    def url(self, system: str) -> str:
        return self.server(system).url

    def pid(self, system: str) -> int | None:
        return self.server(system).pid

    def cpu_seconds(self, system: str) -> float:
        """CPU time *system*'s processes have used so far."""
        return servers.cpu_seconds(self.pid(system))

    def note_rss(self) -> None:
        for system in ("regproxy", "peer"):
            rss = servers.peak_rss(self.pid(system))
            if rss is not None:
                self.results.add("rss_peak", system, rss / MB)

    def restart_empty(self) -> None:
        self.note_rss()
        self.regproxy.restart_empty()
        self.peer.restart_empty()

    # -- scenarios --------------------------------------------------------------
    def proxy(self, system: str) -> servers.Registry | servers.RegProxy:
        return self.regproxy if system == "regproxy" else self.peer

    def wait_stored(self, system: str, image: images.Image, digests: Iterable[str]) -> None:
        """Until *system* serves these blobs of *image* from its own disk."""
        if system == "nginx":
            return
        proxy = self.proxy(system)
        wanted = list(digests)
        harness.wait_until(
            lambda: all(proxy.has_blob(image.repository, d) for d in wanted),
            120,
            f"{system} to store the blobs of {image.reference}",
        )

    def pull(self, system: str, run: int, kind: str) -> None:
        image = self.images["app"]
        if kind == "warm":
            self.wait_stored(system, image, image.blobs)
        dest = self.tmp / "pulls" / f"{system}-{run}-{kind}"
        since = self.upstream.mark()
        started = time.monotonic()
        ref = image.docker_ref(self.url(system).removeprefix("http://"))
        self.skopeo.pull(ref, dest, timeout=120)
        seconds = time.monotonic() - started
        shutil.rmtree(dest, ignore_errors=True)
        if kind == "warm" and system != "nginx" and self.upstream.blob_bytes(since):
            self.results.warn(f"{system}: the warm pull fetched blobs from upstream")
        self.results.add(f"pull_{kind}", system, seconds)
        say(f"  {kind} pull from {system}: {seconds:.2f} s")

    def burst(self, system: str) -> None:
        image = self.images["burst"]
        since = self.upstream.mark()
        clients = self.plan.burst_clients
        cpu = self.cpu_seconds(system)
        wall, downloads = load.download_many(self.url(system), blob_path(image), clients, 300)
        cpu = self.cpu_seconds(system) - cpu
        sent = sum(d.size for d in downloads)
        self.results.add("burst_cpu", system, cpu / max(1, sent) * 1e9)
        bad = [d for d in downloads if not d.ok]
        if bad:
            self.results.warn(
                f"{system}: {len(bad)}/{clients} cold burst downloads failed: {bad[0]}"
            )
        self.results.add("burst_wall", system, wall)
        if system != "nginx":
            # Count the peer's background fetch for its store too.
            self.wait_stored(system, image, [image.biggest_layer.digest])
            fetched = self.upstream.blob_bytes(since)
            self.results.add("burst_upstream", system, fetched / MB)
            say(
                f"  {clients} cold clients on {system}: {wall:.2f} s, "
                f"upstream {fetched / MB:.0f} MB"
            )
        else:
            say(f"  {clients} clients on nginx: {wall:.2f} s")

    def prime_big(self, system: str) -> None:
        """Get the big blob into *system*'s cache, and wait until it is stored."""
        image = self.images["big"]
        got = load.download(self.url(system), blob_path(image), deadline=time.monotonic() + 300)
        if not got.ok:
            self.results.warn(f"{system}: priming the big blob failed: {got}")
        self.wait_stored(system, image, [image.biggest_layer.digest])

    def big_warm(self, system: str, metric: str = "blob_warm") -> None:
        image = self.images["big"]
        since = self.upstream.mark()
        cpu = self.cpu_seconds(system)
        got = load.download(self.url(system), blob_path(image), deadline=time.monotonic() + 300)
        cpu = self.cpu_seconds(system) - cpu
        if not got.ok:
            self.results.warn(f"{system}: warm big blob download failed: {got}")
            return
        if metric == "blob_warm":
            self.results.add("blob_warm_cpu", system, cpu / (got.size / 1e9))
        fetched = self.upstream.blob_bytes(since)
        if fetched:
            self.results.warn(f"{system}: 'warm' download fetched {fetched} bytes from upstream")
        rate = got.size / got.seconds / MB
        self.results.add(metric, system, rate)
        say(f"  {metric}: {_size(self.plan.big_bytes)} from {system}: {rate:.0f} MB/s")

    def manifests(self, system: str) -> None:
        image = self.images["app"]
        path = manifest_path(image)
        url = self.url(system)
        plan = self.plan
        for method in ("HEAD", "GET"):
            key = method.lower()
            cpu = self.cpu_seconds(system)
            most = load.requests(url, method, path, ACCEPT, plan.max_seconds)
            cpu = self.cpu_seconds(system) - cpu
            if most.errors:
                self.results.warn(f"{system}: {method} flat out: {most.errors} errors/non-200")
            self.results.add(f"{key}_max", system, most.rate)
            self.results.add(f"{key}_cpu", system, cpu / max(1, most.ok) * 1000)
            since = self.upstream.mark()
            r = load.requests(url, method, path, ACCEPT, plan.rate_seconds, rate=plan.rate)
            planned = int(plan.rate * plan.rate_seconds)
            if r.errors or r.ok < r.sent or r.sent < planned or r.late > r.sent / 100:
                self.results.warn(
                    f"{system}: {method} at {plan.rate:g}/s: {r.sent} of {planned} requests "
                    f"sent in the window, {r.late} of them over 5 ms late (all connections "
                    f"busy); {r.ok} ok, {r.errors} errors"
                )
            self.results.add(f"{key}_rate", system, r.rate)
            self.results.add(f"{key}_p50", system, r.percentile(50) * 1000)
            self.results.add(f"{key}_p99", system, r.percentile(99) * 1000)
            if method == "GET" and system != "nginx":
                _, upstream_requests = self.upstream.upstream_bytes(since)
                self.results.add("get_upstream", system, upstream_requests / max(1, r.sent) * 1000)
            say(
                f"  {method} manifest on {system}: max {most.rate:,.0f}/s; at {r.rate:,.0f}/s "
                f"p50 {r.percentile(50) * 1000:.2f} ms p99 {r.percentile(99) * 1000:.2f} ms"
            )

    def many_big(self, system: str) -> None:
        """Many clients download the (cached) big blob at once; peak RSS meanwhile."""
        image = self.images["big"]
        clients = self.plan.rss_clients
        servers.reset_peak_rss(self.pid(system))
        cpu = self.cpu_seconds(system)
        wall, downloads = load.download_many(self.url(system), blob_path(image), clients, 600)
        cpu = self.cpu_seconds(system) - cpu
        bad = [d for d in downloads if not d.ok]
        if bad:
            self.results.warn(f"{system}: {len(bad)}/{clients} big downloads failed: {bad[0]}")
        total = sum(d.size for d in downloads)
        self.results.add("many_big_rate", system, total / wall / MB)
        self.results.add("many_big_cpu", system, cpu / max(1, total) * 1e9)
        rss = servers.peak_rss(self.pid(system))
        message = (
            f"  {clients} x big blob from {system}: {wall:.1f} s, {total / wall / MB:.0f} MB/s"
        )
        if system != "nginx" and rss is not None:
            self.results.add("rss_many_big", system, rss / MB)
            message += f", peak RSS {rss / MB:.0f} MB"
        say(message)

    def run(self) -> None:
        for run in range(self.plan.runs):
            say(f"run {run + 1}/{self.plan.runs}: caches emptied")
            self.restart_empty()
            for system in SYSTEMS:
                self.pull(system, run, "cold")
                self.pull(system, run, "warm")
            for system in SYSTEMS:
                self.burst(system)
            for system in ("regproxy", "peer"):
                self.prime_big(system)
            # No writeback of what priming wrote in the middle of a measurement.
            os.sync()
            for _ in range(2):
                for system in SYSTEMS:
                    self.big_warm(system)
            # what a restart costs the first reader (regproxy re-hashes stored blobs)
            for system in ("regproxy", "peer"):
                self.proxy(system).restart()
                self.big_warm(system, "blob_restart")
            for system in SYSTEMS:
                self.manifests(system)
        say("many clients on the big blob")
        os.sync()
        for system in SYSTEMS:
            self.many_big(system)
        self.note_rss()


def start_upstream(
    tmp: Path, stack: contextlib.ExitStack, skopeo: harness.Skopeo, pushed: Iterable[images.Image]
) -> servers.Registry:
    """The upstream (docker-registry behind token auth, stopped by *stack*),
    with the *pushed* images in it."""
    tokens = servers.token_server()
    stack.callback(tokens.stop)
    upstream = servers.Registry(_mkdir(tmp / "upstream"), tokens=tokens)
    upstream.start()
    stack.callback(upstream.stop)
    say(f"upstream docker-registry on {upstream.url}; pushing images")
    for image in pushed:
        skopeo.run(
            "copy",
            "--quiet",
            "--dest-tls-verify=false",
            "--preserve-digests",
            "--dest-creds=" + ":".join(servers.PUSH_CREDS),
            f"dir:{image.layout}",
            image.docker_ref(upstream.host_port),
        )
    return upstream


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


class CpuWatch:
    """CPU time that processes outside this benchmark's own tree used on the
    machine meanwhile: anything else running makes the numbers noisy."""

    def __init__(self) -> None:
        self._busy, self._total = self._machine()
        self._ours = self._own()
        self._t = time.monotonic()

    @staticmethod
    def _machine() -> tuple[float, float]:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        hz = os.sysconf("SC_CLK_TCK")
        idle = fields[3] + fields[4]  # idle + iowait
        return (sum(fields[:8]) - idle) / hz, sum(fields[:8]) / hz

    @staticmethod
    def _own() -> float:
        t = os.times()
        return t.user + t.system + t.children_user + t.children_system

    def others(self) -> tuple[float, float]:
        """(CPU seconds used by other processes, their share of the machine)."""
        busy, total = self._machine()
        other = max(0.0, (busy - self._busy) - (self._own() - self._ours))
        return other, other / max(1e-9, total - self._total)


def _collapse(messages: list[str]) -> Iterator[str]:
    """The same warning from every run, once."""
    groups: dict[str, list[str]] = {}
    for message in messages:
        groups.setdefault(re.sub(r"[0-9][0-9.,]*", "#", message), []).append(message)
    for group in groups.values():
        yield group[0] + (f" (and {len(group) - 1} more like it)" if len(group) > 1 else "")


def _versions(*tools: Sequence[str]) -> str:
    """This checkout's revision, and the first line each of *tools* prints."""

    def out(*argv: str) -> str:
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        except OSError:
            return "?"
        lines = (proc.stdout + proc.stderr).strip().splitlines()
        return lines[0] if lines else "?"

    rev = out("git", "-C", str(ROOT), "describe", "--always", "--dirty")
    return "; ".join([f"regproxy {rev}", *(out(*tool) for tool in tools)])


@contextlib.contextmanager
def _tempdir(keep: bool) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="regproxy-bench-"))
    try:
        yield path
    finally:
        if keep:
            say(f"kept {path}")
        else:
            shutil.rmtree(path, ignore_errors=True)


def drive(
    argv: list[str] | None,
    doc: str,
    plans: tuple[Plan, Plan],
    bench_type: type[Bench],
    show: Callable[[Plan, Results], str],
    binaries: Sequence[tuple[str, str]],
    tools: Sequence[Sequence[str]],
) -> int:
    """A benchmark's command line: parse *argv*, check the *binaries* (name,
    Debian package) are there, run *bench_type* with the full or quick plan of
    *plans* in a temporary directory, print *show*'s table and the warnings."""
    full, quick = plans
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, one run: a smoke check")
    parser.add_argument(
        "--runs",
        type=int,
        help=f"runs to take medians over (default {full.runs}; quick {quick.runs})",
    )
    parser.add_argument("--json", type=Path, help="also write every measured value here")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir and logs")
    args = parser.parse_args(argv)
    plan = quick if args.quick else full
    if args.runs:
        plan = Plan(**{**asdict(plan), "runs": args.runs})
    for binary, package in binaries:
        harness.require_binary(binary, package)

    # Also when started with SIGINT ignored (in the background): a Ctrl-C
    # reaches the servers too, and the run must stop with them.
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    cpu = CpuWatch()
    versions = _versions(*tools)
    try:
        with _tempdir(args.keep) as tmp, contextlib.ExitStack() as stack:
            bench = bench_type(plan, tmp, stack)
            bench.run()
            results = bench.results
            sizes = "; ".join(
                f"{name}: {len(image.layers)} layer(s), "
                f"{sum(b.size for b in image.blobs.values()) / MB:,.0f} MB"
                for name, image in bench.images.items()
            )
    except KeyboardInterrupt:
        say("interrupted: everything stopped and removed")
        return 130

    print(f"\n{versions}")
    print(
        f"{'quick' if args.quick else 'full'} mode, medians of {plan.runs} run(s); "
        f"MB = 10^6 bytes; {sizes}"
    )
    print(show(plan, results))
    other, share = cpu.others()
    print(
        f"other processes on this machine meanwhile: {other:.0f} CPU-s, {share:.0%} of its CPU"
        + (" -- numbers disturbed, run again on a quiet machine" if share > 0.05 else "")
    )
    for message in _collapse(results.warnings):
        print(f"WARNING: {message}")
    if args.json:
        args.json.write_text(
            json.dumps({"plan": asdict(plan), "values": results.values}, indent=1) + "\n"
        )
    say("done")
    return 0


def main(argv: list[str] | None = None) -> int:
    assert __doc__ is not None
    return drive(
        argv,
        __doc__,
        (FULL, QUICK),
        Bench,
        table,
        [("docker-registry", "docker-registry"), ("skopeo", "skopeo"), ("nginx", "nginx-light")],
        [("docker-registry", "--version"), ("nginx", "-v")],
    )


if __name__ == "__main__":
    sys.exit(main())
