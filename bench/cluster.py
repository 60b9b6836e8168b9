#!/usr/bin/env python3
"""A regproxy cluster (3 nodes + haproxy on Swift and PostgreSQL) beside one
filesystem node.

Usage, from a venv with regproxy installed (its ``twistd`` runs the nodes)::

    .venv/bin/python bench/cluster.py [--quick] [--runs N] [--json FILE] [--keep]

Same upstream, same images, same clients as ``bench/run.py`` (whose scenarios
this reuses); the cluster is the cluster tests' harness (``tests/cluster``).
Everything runs on 127.0.0.1 in one temporary directory, removed at the end
(also on Ctrl-C) unless ``--keep``.  See bench/README.rst for reading the table.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from statistics import median
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# this checkout's regproxy, bench/ and tests/ (the cluster tests' engines
# import the integration harness as a top-level package)
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from bench import run, servers  # noqa: E402
from bench.run import (  # noqa: E402
    Bench,
    Plan,
    Results,
    Row,
    _mkdir,
    _size,
    burst_rows,
    drive,
    manifest_rows,
    render,
    say,
)
from tests.cluster import engines, nodes  # noqa: E402

SYSTEMS = ("cluster", "single")
#: the single node behind a haproxy of its own: what the load balancer costs
SINGLE_LB = "single+lb"
NODES = 3

#: run.py's sizes; one run (each starts a new cluster), 2 clients per node
#: for the warm blob
FULL = replace(run.FULL, runs=1, rss_clients=2 * NODES)
QUICK = replace(run.QUICK, rss_clients=2 * NODES)


def _rows(plan: Plan) -> list[Row]:
    big = _size(plan.big_bytes)
    return [
        Row(
            "pull_cold",
            "cold pull, skopeo (s)",
            "lower",
            target=lambda v: ("<= 1.3x single", v["cluster"] <= 1.3 * v["single"]),
        ),
        Row("pull_warm", "warm pull, skopeo (s)", "lower"),
        *burst_rows(plan, "cluster"),
        Row("blob_first", f"warm {big} blob, 1 client, first read per node (MB/s)", "higher", 0),
        Row("blob_warm", f"warm {big} blob, 1 client, local copies (MB/s)", "higher", 0),
        Row("blob_warm_cpu", "  ... server CPU (s per GB sent)", "lower"),
        Row(
            "many_big_rate",
            f"{plan.rss_clients} clients, warm {big} blob: total (MB/s)",
            "higher",
            0,
        ),
        Row("many_big_cpu", "  ... server CPU (s per GB sent)", "lower"),
        *manifest_rows(plan, "cluster", 10),
    ]


def table(plan: Plan, results: Results) -> str:
    shares = ", ".join(
        f"{part} {results.get(f'manifest_cpu_{part}', 'cluster', median):.0%}"
        for part in ("nodes", "PostgreSQL", "Swift", "haproxy")
    )
    out = render(
        _rows(plan), results, (*SYSTEMS, SINGLE_LB), [("cluster/single", "cluster", "single")]
    )
    if "manifest_cpu_nodes" in results.values:
        out += f"\ncluster CPU during the manifest rows: {shares}"
    return out


def _pid(proc: subprocess.Popen[bytes] | None) -> int | None:
    return proc.pid if proc is not None and proc.poll() is None else None


class _Bucket:
    """What :meth:`Bench.wait_stored` asks of a proxy, answered by the
    cluster's bucket: a blob is stored once its object is there."""

    def __init__(self, cluster: nodes.Cluster) -> None:
        self._cluster = cluster

    def has_blob(self, repository: str, digest: str) -> bool:
        return self._cluster.object_size(digest) is not None


class ClusterBench(Bench):
    """``single``: one regproxy on the filesystem and SQLite (the default),
    straight to its port; ``cluster``: three nodes on one Swift bucket and one
    PostgreSQL database, through haproxy; ``single+lb``: the single node
    through a haproxy of its own (warm rows only), to tell the load
    balancer's cost from the cluster's.  Each run starts both empty (the
    cluster with a new bucket, a new database and new nodes)."""

    def start_systems(self, stack: contextlib.ExitStack) -> None:
        tmp = self.tmp
        # PostgreSQL runs as another user when we are root: it must reach its directory
        tmp.chmod(0o711)
        self.single = servers.RegProxy(
            _mkdir(tmp / "single"), {"upstreams": {"docker.io": {"url": self.upstream.url}}}
        )
        self.single.start()
        stack.callback(self.single.stop)
        self.single_lb = engines.HAProxy(tmp / "haproxy-single", check_interval_ms=1000)
        self.single_lb.start([self.single.host_port])
        stack.callback(self.single_lb.stop)
        self.swift = engines.Swift(tmp / "swift")
        self.postgres = engines.Postgres(tmp / "postgres")
        for engine in (self.swift, self.postgres):
            stack.callback(engine.stop)
            engine.start()
        self.cluster: nodes.Cluster | None = None
        self.haproxy: engines.HAProxy | None = None
        self._clusters = 0
        stack.callback(self.stop_cluster)
        say(f"single node {self.single.url}; Swift {self.swift.endpoint.url}")

    def start_cluster(self) -> nodes.Cluster:
        """Three nodes on a new bucket and a new database, haproxy in front."""
        self._clusters += 1
        workdir = _mkdir(self.tmp / f"cluster-{self._clusters}")

        def make_haproxy(backends: Sequence[str]) -> engines.HAProxy:
            self.haproxy = engines.HAProxy(workdir / "haproxy", check_interval_ms=1000)
            self.haproxy.start(backends)
            return self.haproxy

        dsn = self.postgres.create_database("bench")
        cluster = nodes.Cluster(
            workdir,
            self.swift.endpoint,
            f"regproxy-bench-{self._clusters}",
            dsn,
            self.upstream.url,
            make_haproxy,
        )
        self.cluster = cluster
        # One node first: on a new database, nodes starting at once race to
        # create the shared settings' table (CREATE TABLE IF NOT EXISTS
        # outside the schema lock), and the loser exits.
        cluster.add_nodes(1)
        cluster.add_nodes(NODES - 1)
        cluster.wait_converged()
        cluster.start_haproxy()
        say(f"cluster of {NODES} nodes behind haproxy {cluster.url}")
        return cluster

    def stop_cluster(self) -> None:
        """Stop the nodes and haproxy; drop the database and empty the bucket
        (Swift's disk is this run's temporary directory: keep it small)."""
        cluster, self.cluster = self.cluster, None
        if cluster is None:
            return
        cluster.stop()
        if self.haproxy is not None:
            self.haproxy.stop()
            self.haproxy = None
        self.postgres.drop_database(cluster.dsn)
        listed = cluster.s3.list_objects_v2(Bucket=cluster.bucket).get("Contents", [])
        for entry in listed:
            cluster.s3.delete_object(Bucket=cluster.bucket, Key=entry["Key"])

    # -- what Bench's scenarios ask -------------------------------------------
    def url(self, system: str) -> str:
        if system == "cluster":
            assert self.cluster is not None
            return self.cluster.url
        return self.single_lb.url if system == SINGLE_LB else self.single.url

    def pid(self, system: str) -> int | None:
        return self.single.pid if system == "single" else None

    def cluster_cpu(self) -> dict[str, float]:
        """CPU time so far of each part of the cluster."""
        assert self.cluster is not None and self.haproxy is not None
        parts: dict[str, list[int | None]] = {
            "nodes": [node.pid for node in self.cluster.nodes],
            "PostgreSQL": [_pid(self.postgres.proc)],
            "Swift": [_pid(proc) for proc in self.swift.procs.values()],
            "haproxy": [_pid(self.haproxy.proc)],
        }
        return {part: sum(map(servers.cpu_seconds, pids)) for part, pids in parts.items()}

    def cpu_seconds(self, system: str) -> float:
        """The single node's CPU time (and its haproxy's); or the whole
        cluster's: its nodes, haproxy, Swift's servers and memcached, PostgreSQL."""
        if system != "cluster":
            lb = servers.cpu_seconds(_pid(self.single_lb.proc)) if system == SINGLE_LB else 0.0
            return servers.cpu_seconds(self.single.pid) + lb
        return sum(self.cluster_cpu().values())

    def manifests(self, system: str) -> None:
        """Bench's manifest rows; for the cluster, also which of its parts
        spent the CPU meanwhile (a share of the whole)."""
        if system != "cluster":
            super().manifests(system)
            return
        before = self.cluster_cpu()
        super().manifests(system)
        spent = {part: t - before[part] for part, t in self.cluster_cpu().items()}
        for part, t in spent.items():
            self.results.add(f"manifest_cpu_{part}", system, t / max(1e-9, sum(spent.values())))

    def proxy(self, system: str) -> Any:
        if system == "cluster":
            assert self.cluster is not None
            return _Bucket(self.cluster)
        return self.single

    # -- the run ---------------------------------------------------------------
    def run(self) -> None:
        for n in range(self.plan.runs):
            say(f"run {n + 1}/{self.plan.runs}: caches emptied")
            self.stop_cluster()
            self.single.restart_empty()
            self.start_cluster()
            for system in SYSTEMS:
                self.pull(system, n, "cold")
                self.pull(system, n, "warm")
            for system in SYSTEMS:
                self.burst(system)
            for system in SYSTEMS:
                self.prime_big(system)
            os.sync()
            # haproxy's round robin sends each of NODES reads in a row to
            # another node: the first round reads each node's first copy
            # (from the bucket, but for the node that fetched it), the
            # second its local copy.
            for _ in range(NODES):
                for system in SYSTEMS:
                    self.big_warm(system, "blob_first")
            for _ in range(NODES):
                for system in (*SYSTEMS, SINGLE_LB):
                    self.big_warm(system)
            os.sync()
            for system in (*SYSTEMS, SINGLE_LB):
                self.many_big(system)
            for system in (*SYSTEMS, SINGLE_LB):
                self.manifests(system)
            self.check_nodes()

    def check_nodes(self) -> None:
        """Warn about a node that died or that haproxy took out."""
        assert self.cluster is not None and self.haproxy is not None
        dead = [node.name for node in self.cluster.nodes if not node.running]
        if dead:
            self.results.warn(f"cluster: node(s) {', '.join(dead)} died during the run")
        states = self.haproxy.server_states()
        down = [name for name, state in states.items() if state != "UP"]
        if down:
            self.results.warn(f"cluster: haproxy sees {', '.join(down)} not UP: {states}")


def main(argv: list[str] | None = None) -> int:
    assert __doc__ is not None
    for reason in (engines.swift_missing(), engines.postgres_missing(), engines.haproxy_missing()):
        if reason is not None:
            print(f"cannot run the cluster: {reason}", file=sys.stderr)
            return 2
    return drive(
        argv,
        __doc__,
        (FULL, QUICK),
        ClusterBench,
        table,
        [("docker-registry", "docker-registry"), ("skopeo", "skopeo")],
        [
            ("docker-registry", "--version"),
            ("haproxy", "-v"),
            ("dpkg-query", "-W", "swift-proxy"),
            ("dpkg-query", "-W", "postgresql-15"),
        ],
    )


if __name__ == "__main__":
    sys.exit(main())
