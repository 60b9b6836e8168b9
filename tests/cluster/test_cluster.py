"""The cluster end to end (issue 11): three regproxy nodes under twistd on
one Swift bucket and one PostgreSQL database, behind haproxy, in front of a
real docker-registry whose every request is counted (and chosen blobs
slowed) by :class:`nodes.UpstreamFront`.  skopeo and dockerd pull through
haproxy (dockerd with it as its Docker Hub mirror).

One cluster serves the whole module; each test uses images of its own, so
each starts cold.  The tests run in file order: the SIGKILL test restarts the
node it killed, and the last test adds a fourth node.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from integration import harness, images, regclient
from integration.conftest import push_image
from integration.dockerd import DockerDaemon, DockerDaemonError
from integration.test_dockerd import (
    assert_pulled,
    for_this_machine,
    image_blobs,
    pull_failure,
    short_name,
)
from integration.test_skopeo import assert_same_tree

from . import engines
from .conftest import _require
from .nodes import Cluster, ClusterNode, Exchange, Fetched, UpstreamFront, fetch

pytestmark = pytest.mark.cluster

MiB = 1024 * 1024
#: the blob 50 clients ask for at once, and how fast the upstream sends it
CROWD_BYTES = 24 * MiB
CROWD_RATE = 8 * MiB
#: the blob whose fetching node is killed, and how fast the upstream sends it
VICTIM_BYTES = 8 * MiB
VICTIM_RATE = 1 * MiB
#: seconds a retry through haproxy may take after a node's SIGKILL
RECOVERY = 10.0


def _one_layer(name: str, size: int) -> Callable[[images.LayoutWriter, Any], images.Image]:
    def build(w: images.LayoutWriter, rng: Any) -> images.Image:
        return w.add_image([{f"data/{name}.bin": size}], "oci", gzip_level=0, name=name)

    return build


#: the integration tests' images that skopeo and dockerd pull through haproxy
PULLED = ("multilayer", "multiarch")
#: dockerd's copies of them, in repositories of their own so that its pull
#: starts cold too (built from another seed: other bytes, but for the layers
#: that are the same in every build, e.g. multiarch's shared one)
DOCKERD_IMAGE_SPECS = [
    dataclasses.replace(s, name=f"dockerd-{s.name}", repository=f"library/d{s.name}")
    for s in images.IMAGE_SPECS
    if s.name in PULLED
]

#: images of their own per test, beside two of the integration tests' ones
CLUSTER_IMAGE_SPECS = [
    *(s for s in images.IMAGE_SPECS if s.name in PULLED),
    *DOCKERD_IMAGE_SPECS,
    images.ImageSpec("crowd", "library/crowd", "1", _one_layer("crowd", CROWD_BYTES)),
    images.ImageSpec("victim", "library/victim", "1", _one_layer("victim", VICTIM_BYTES)),
    images.ImageSpec("purgeme", "library/purgeme", "1", _one_layer("purgeme", 100_000)),
    images.ImageSpec("grow", "library/grow", "1", _one_layer("grow", 4 * MiB)),
]


# --------------------------------------------------------------------------
# fixtures: one upstream and one cluster for the module
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def e2e_dir(cluster_dir: Path, request: pytest.FixtureRequest) -> Path:
    path = cluster_dir / request.module.__name__.rsplit(".", 1)[-1]
    path.mkdir()
    return path


@pytest.fixture(scope="module")
def skopeo(e2e_dir: Path) -> harness.Skopeo:
    _require(engines.missing(["docker-registry", "skopeo"], "docker-registry skopeo"))
    return harness.Skopeo(e2e_dir / "skopeo")


@pytest.fixture(scope="module")
def test_images(
    e2e_dir: Path, upstream_registry: harness.UpstreamRegistry, skopeo: harness.Skopeo
) -> dict[str, images.Image]:
    return {
        spec.name: push_image(skopeo, upstream_registry, spec, e2e_dir / "layouts" / spec.name)
        for spec in CLUSTER_IMAGE_SPECS
    }


@pytest.fixture(scope="module")
def front(upstream_registry: harness.UpstreamRegistry) -> Iterator[UpstreamFront]:
    front = UpstreamFront(upstream_registry.host_port)
    front.start()
    yield front
    front.stop()


@pytest.fixture(scope="module")
def cluster(
    e2e_dir: Path,
    swift: engines.S3Endpoint,
    postgres: engines.Postgres,
    front: UpstreamFront,
    test_images: dict[str, images.Image],
) -> Iterator[Cluster]:
    _require(engines.haproxy_missing())
    dsn = postgres.create_database("cluster")
    started: list[engines.HAProxy] = []

    def make_haproxy(backends: Any) -> engines.HAProxy:
        proxy = engines.HAProxy(e2e_dir / "haproxy", check_interval_ms=500)
        proxy.start(backends)
        started.append(proxy)
        return proxy

    cluster = Cluster(
        e2e_dir, swift, f"regproxy-e2e-{int(time.time())}", dsn, front.url, make_haproxy
    )
    try:
        front.identify = lambda port: cluster.identify(port, front.port)
        cluster.add_nodes(3)
        cluster.wait_converged()
        cluster.start_haproxy()
        yield cluster
    finally:
        cluster.stop()
        for proxy in started:
            proxy.stop()
        postgres.drop_database(dsn)


@pytest.fixture(autouse=True)
def whole_cluster(cluster: Cluster, request: pytest.FixtureRequest) -> Iterator[None]:
    """Every node running (a test that failed may have left one dead) and
    seeing the others; on a failure, the tail of every node's log."""
    for node in cluster.nodes:
        if not node.running:
            cluster.restart(node)
    cluster.wait_converged(15)
    failed = request.session.testsfailed
    yield
    if request.session.testsfailed > failed:
        print(f"\n{cluster.log_tails(60)}")
        if cluster.haproxy is not None:
            print(f"--- haproxy\n{harness.tail(cluster.haproxy.log_path)}")


def described(exchanges: list[Exchange]) -> list[tuple[Any, ...]]:
    """What a failure message says of upstream requests."""
    return [(e.node, e.status, e.sent, e.broken, e.headers.get("Range")) for e in exchanges]


def host_port(url: str) -> str:
    return url.removeprefix("http://")


def blob_path(image: images.Image, digest: str) -> str:
    return f"/v2/{image.repository}/blobs/{digest}"


def manifest(url: str, image: images.Image, reference: str | None = None) -> Fetched:
    return fetch(
        url,
        f"/v2/{image.repository}/manifests/{reference or image.tag}",
        headers={"Accept": ", ".join(images.MANIFEST_TYPES)},
    )


def layer_of(image: images.Image) -> images.Blob:
    return image.layers[-1]


# --------------------------------------------------------------------------
# 1. skopeo through haproxy, cold then warm
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, all_images", [("multilayer", False), ("multiarch", True)], ids=["oci-image", "oci-index"]
)
def test_skopeo_pulls_through_haproxy_cold_then_warm(
    name: str,
    all_images: bool,
    cluster: Cluster,
    front: UpstreamFront,
    upstream_registry: harness.UpstreamRegistry,
    skopeo: harness.Skopeo,
    test_images: dict[str, images.Image],
    e2e_dir: Path,
) -> None:
    image = test_images[name]
    pulls = e2e_dir / "pulls" / name
    reference = pulls / "upstream"
    skopeo.pull(image.docker_ref(upstream_registry.host_port), reference, all_images=all_images)
    via = host_port(cluster.url)

    mark = front.mark()
    skopeo.pull(image.docker_ref(via), pulls / "cold", all_images=all_images)
    assert_same_tree(pulls / "cold", reference)
    fetched: dict[str, int] = {}
    for exchange in front.blob_gets(since=mark):
        fetched[exchange.digest] = fetched.get(exchange.digest, 0) + 1
    assert set(fetched) == set(image.blobs), "the cold pull did not fetch every blob upstream"
    twice = {digest: n for digest, n in fetched.items() if n > 1}
    assert not twice, f"blobs fetched from upstream more than once by the cluster: {twice}"

    mark = front.mark()
    skopeo.pull(image.docker_ref(via), pulls / "warm", all_images=all_images)
    assert_same_tree(pulls / "warm", reference)
    blob_gets = [e.path for e in front.blob_gets(since=mark)]
    assert blob_gets == [], "the warm pull fetched blobs from upstream again"
    others = [f"{e.method} {e.path} {e.status}" for e in front.since(mark)]
    assert others == [], "the warm pull asked the upstream again (the index is shared)"


# --------------------------------------------------------------------------
# 1b. dockerd through haproxy, cold then warm
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dockerd(e2e_dir: Path, cluster: Cluster) -> Iterator[DockerDaemon]:
    """One dockerd with haproxy as its Docker Hub mirror."""
    _require(engines.missing(["dockerd", "docker"], "docker.io"))
    daemon = DockerDaemon(e2e_dir / "dockerd", cluster.url)
    try:
        daemon.start()
    except DockerDaemonError as e:
        _require(f"dockerd does not start here: {e}")
    yield daemon
    daemon.stop()


def bytes_served(cluster: Cluster) -> int:
    """Bytes the nodes served, summed (each node's own count: the heartbeats'
    sums lag), from their cache or not: a node counts a blob it streams from
    the bucket, a HIT, in bytes_from_upstream."""
    total = 0
    for node in cluster.nodes:
        response = regclient.request(f"{node.admin_url}/api/v1/stats", timeout=10)
        assert response.status == 200, (node.name, response.status, response.body)
        stats = json.loads(response.body)
        total += int(stats["bytes_from_cache"]) + int(stats["bytes_from_upstream"])
    return total


def diff_ids(layout: Path, config: images.Blob) -> list[str]:
    """The layers' uncompressed digests, from the config as the upstream serves it."""
    ids: list[str] = json.loads((layout / config.hex).read_bytes())["rootfs"]["diff_ids"]
    return ids


@pytest.mark.parametrize("name", [s.name for s in DOCKERD_IMAGE_SPECS], ids=list(PULLED))
def test_dockerd_pulls_through_haproxy_cold_then_warm(
    name: str,
    cluster: Cluster,
    front: UpstreamFront,
    dockerd: DockerDaemon,
    test_images: dict[str, images.Image],
) -> None:
    image = test_images[name]
    pulled, arch = for_this_machine(image) if image.is_index else (image, "amd64")
    assert image.layout is not None
    blobs = {blob.digest for blob in image_blobs(pulled)}
    # blobs the same in another test image (built alike): maybe cached already
    elsewhere = {
        digest for other, them in test_images.items() if other != name for digest in them.blobs
    }
    ref = f"{short_name(image.repository)}:{image.tag}"  # docker.io/library/dNAME:1

    def pull() -> None:
        result = dockerd.pull(ref, timeout=120)
        assert result.returncode == 0, pull_failure(dockerd, result)
        assert not dockerd.fell_back(), pull_failure(dockerd, result)
        # the digests and ids the upstream has: image id = config digest,
        # the repo digest, the layers' diff ids
        assert_pulled(dockerd, ref, image, pulled, arch)
        info = dockerd.image_inspect(ref)
        assert info["RootFS"]["Layers"] == diff_ids(image.layout, pulled.config), info["RootFS"]

    mark = front.mark()
    pull()
    fetched: dict[str, int] = {}
    for exchange in front.blob_gets(since=mark):
        fetched[exchange.digest] = fetched.get(exchange.digest, 0) + 1
    assert set(fetched) <= blobs, f"blobs dockerd does not need fetched: {set(fetched) - blobs}"
    assert blobs - elsewhere <= set(fetched), "the cold pull did not fetch its blobs upstream"
    twice = {digest: n for digest, n in fetched.items() if n > 1}
    assert not twice, f"blobs fetched from upstream more than once by the cluster: {twice}"
    manifests = [e.path for e in front.since(mark) if "/manifests/" in e.path]
    assert manifests, "the cold pull asked the upstream for no manifest"

    dockerd.docker("image", "rm", ref, check=True)
    assert dockerd.docker("image", "inspect", ref).returncode != 0, "the image is still there"
    mark, before = front.mark(), bytes_served(cluster)
    pull()
    # dockerd downloaded every blob again, and the nodes served them (each
    # counts a response once it has ended, maybe just after dockerd is done;
    # with no upstream request, below, from the cluster's cache)
    needed = sum(b.size for b in image_blobs(pulled))
    harness.wait_until(
        lambda: bytes_served(cluster) - before >= needed,
        5,
        f"the nodes to count {needed} bytes served for the warm pull",
        0.2,
    )
    blob_gets = [e.path for e in front.blob_gets(since=mark)]
    assert blob_gets == [], "the warm pull fetched blobs from upstream again"
    others = [f"{e.method} {e.path} {e.status}" for e in front.since(mark)]
    assert others == [], "the warm pull asked the upstream again (the index is shared)"


# --------------------------------------------------------------------------
# 2. 50 clients over 3 nodes, one cold blob
# --------------------------------------------------------------------------


def test_fifty_clients_over_three_nodes_cause_one_upstream_get(
    cluster: Cluster, front: UpstreamFront, test_images: dict[str, images.Image]
) -> None:
    image = test_images["crowd"]
    blob = layer_of(image)
    assert blob.size > 20 * MiB
    front.throttle[blob.digest] = CROWD_RATE  # ~3 s: every client asks while it runs
    mark = front.mark()
    clients = 50
    together = threading.Barrier(clients)

    def client(i: int) -> Fetched:
        together.wait(10)
        return fetch(cluster.nodes[i % 3].url, blob_path(image, blob.digest), timeout=60)

    with ThreadPoolExecutor(clients, thread_name_prefix="crowd") as pool:
        results = list(pool.map(client, range(clients)))
    del front.throttle[blob.digest]

    gets = front.blob_gets(blob.digest, mark)
    assert len(gets) == 1, f"upstream GETs of one blob for the cluster: {described(gets)}"
    bad = [
        (r.url, r.status, r.length, r.error)
        for r in results
        if not r.is_whole(blob.digest, blob.size)
    ]
    assert not bad, f"{len(bad)} of {clients} clients did not get the blob byte-exact: {bad[:5]}"
    # streamed as it arrived: every client had bytes before the upstream was done
    finished = gets[0].finished_at
    assert finished is not None
    late = [
        (r.url, round(r.first_byte_at - finished, 2))
        for r in results
        if r.first_byte_at is None or r.first_byte_at >= finished
    ]
    assert not late, f"clients that got no byte before the upstream download ended: {late}"


# --------------------------------------------------------------------------
# 3. SIGKILL of the fetching node mid-blob
# --------------------------------------------------------------------------


def test_sigkill_of_the_fetching_node_mid_blob(
    cluster: Cluster, front: UpstreamFront, test_images: dict[str, images.Image]
) -> None:
    image = test_images["victim"]
    blob = layer_of(image)
    path = blob_path(image, blob.digest)
    nodes = list(cluster.nodes[:3])
    front.throttle[blob.digest] = VICTIM_RATE  # 8 s: surely mid-way at the kill
    mark = front.mark()
    headers_in = threading.Semaphore(0)

    def client(node: ClusterNode) -> Fetched:
        return fetch(node.url, path, timeout=20, on_headers=lambda _: headers_in.release())

    pool = ThreadPoolExecutor(6, thread_name_prefix="victim")
    try:
        futures = [(node, pool.submit(client, node)) for node in nodes for _ in range(2)]
        harness.wait_until(
            lambda: any(e.sent >= 2 * MiB for e in front.blob_gets(blob.digest, mark)),
            20,
            "the upstream download to be 2 MiB in",
        )
        for _ in futures:
            assert headers_in.acquire(timeout=10), "a client got no response headers"
        # the download under way (one GET for the cluster: test 2's concern;
        # here, which node runs it)
        gets = [e for e in front.blob_gets(blob.digest, mark) if not e.broken]
        assert len(gets) == 1, f"upstream downloads before the kill: {described(gets)}"
        fetcher = cluster.node(gets[0].node)
        assert fetcher is not None, f"no node holds the upstream connection: {described(gets)}"
        assert cluster.object_size(blob.digest) is None, "an object in the bucket mid-download"

        fetcher.kill()
        killed_at = time.monotonic()
        del front.throttle[blob.digest]  # a node taking the download over needs no wait
        results = [(node, future.result(timeout=60)) for node, future in futures]
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        front.throttle.pop(blob.digest, None)

    wrong = [
        (node.name, r.status, r.length, r.error)
        for node, r in results
        if r.status == 200 and r.complete and not r.is_whole(blob.digest, blob.size)
    ]
    assert not wrong, f"a complete 200 with the wrong bytes: {wrong}"
    hung = [(node.name, r.error) for node, r in results if "timed out" in r.error]
    assert not hung, f"clients left hanging instead of aborted: {hung}"
    on_fetcher = [r for node, r in results if node is fetcher]
    assert all(not r.complete for r in on_fetcher), "the killed node's clients got whole bodies"
    outcomes = [
        (node.name, "whole" if r.is_whole(blob.digest, blob.size) else r.error or r.status)
        for node, r in results
    ]
    print(f"\nfetching node {fetcher.name} killed; clients: {outcomes}")
    # the goal: the surviving nodes take the download over (Range from the
    # upstream), and their clients get every byte
    survivors = [(node.name, r.error) for node, r in results if node is not fetcher]
    assert all(r.is_whole(blob.digest, blob.size) for node, r in results if node is not fetcher), (
        f"clients of surviving nodes: {survivors}"
    )

    size = cluster.object_size(blob.digest)
    if size is not None:  # a survivor took the download over and published it
        assert size == blob.size, f"a {size}-byte object for a {blob.size}-byte blob"
        assert cluster.object_sha256(blob.digest) == blob.digest, "a wrong object in the bucket"

    def retried() -> Fetched | None:
        got = fetch(cluster.url, path, timeout=10)
        return got if got.is_whole(blob.digest, blob.size) else None

    harness.wait_until(retried, RECOVERY, "a whole blob through haproxy after the kill", 0.2)
    print(f"served whole through haproxy {time.monotonic() - killed_at:.1f}s after the kill")
    harness.wait_until(
        lambda: cluster.object_size(blob.digest) is not None, 15, "the blob in the bucket"
    )
    assert cluster.object_sha256(blob.digest) == blob.digest

    # a restart needs no repair step (nor a wait), and the node serves the blob
    # from the shared cache
    try:
        fetcher.start()
        refused = ""
    except RuntimeError:
        refused = fetcher.last_run_log()
        cluster.restart(fetcher)  # once its old self has timed out, for the next tests
    cluster.wait_haproxy_up(15)
    again = fetch(fetcher.url, path)
    assert again.is_whole(blob.digest, blob.size), (again.status, again.length, again.error)
    assert again.x_cache == "HIT"
    assert not refused, f"{fetcher.name} did not start again at once after its SIGKILL:\n{refused}"


# --------------------------------------------------------------------------
# 4. a purge through one node is a MISS on the others
# --------------------------------------------------------------------------


def admin_purge(node: ClusterNode, repository: str) -> dict[str, Any]:
    response = regclient.request(
        f"{node.admin_url}/api/v1/cache/docker.io/{repository}", method="DELETE"
    )
    assert response.status == 200, (response.status, response.body)
    return json.loads(response.body)


def test_purge_on_one_node_is_a_miss_on_the_others(
    cluster: Cluster, test_images: dict[str, images.Image]
) -> None:
    image = test_images["purgeme"]
    layer = layer_of(image)
    one, two, three = cluster.nodes[:3]
    first = manifest(one.url, image)
    assert (first.status, first.x_cache) == (200, "MISS")
    assert fetch(one.url, blob_path(image, layer.digest)).is_whole(layer.digest, layer.size)
    # the node that fetched it publishes it to the bucket after its client had it
    harness.wait_until(
        lambda: cluster.object_size(layer.digest) is not None, 10, "the layer in the bucket"
    )
    for node in (two, three):
        warm = manifest(node.url, image)
        assert (node.name, warm.status, warm.x_cache) == (node.name, 200, "HIT")
        got = fetch(node.url, blob_path(image, layer.digest))
        assert got.is_whole(layer.digest, layer.size) and got.x_cache == "HIT", (
            node.name,
            got.status,
            got.x_cache,
        )

    # one node at a time: a MISS fetches the tag again, for every node
    purged = admin_purge(one, image.repository)
    assert purged.get("tags", 0) >= 1, purged
    after = manifest(two.url, image)
    assert (after.status, after.x_cache) == (200, "MISS"), "node 2 still had the purged tag"

    purged = admin_purge(one, image.repository)
    assert purged.get("tags", 0) >= 1, purged
    by_digest = manifest(three.url, image, image.manifest_digest)
    assert (by_digest.status, by_digest.x_cache) == (200, "MISS"), "node 3 kept the manifest"
    blob = fetch(three.url, blob_path(image, layer.digest))
    assert blob.is_whole(layer.digest, layer.size)
    assert blob.x_cache == "MISS", "node 3 kept the purged blob"


# --------------------------------------------------------------------------
# the admin API of any node answers for the cluster
# --------------------------------------------------------------------------


def test_every_node_s_admin_stats_list_the_live_nodes(cluster: Cluster) -> None:
    names = {node.name for node in cluster.nodes}
    for node in cluster.nodes:
        response = regclient.request(f"{node.admin_url}/api/v1/stats", timeout=10)
        assert response.status == 200, (node.name, response.status, response.body)
        view = json.loads(response.body)["cluster"]
        assert view["node"] == node.name
        assert {n["name"] for n in view["nodes"]} == names, (node.name, view["nodes"])


# --------------------------------------------------------------------------
# 5. a node added while the cluster serves
# --------------------------------------------------------------------------


def test_a_node_added_while_serving_takes_traffic(
    cluster: Cluster, front: UpstreamFront, test_images: dict[str, images.Image]
) -> None:
    image = test_images["grow"]
    config, layer = image.config, layer_of(image)
    assert config is not None and cluster.haproxy is not None
    warm = blob_path(image, config.digest)
    assert fetch(cluster.url, warm).is_whole(config.digest, config.size)
    before = {node.name: node.pid for node in cluster.nodes}

    stop, served = threading.Event(), []

    def keep_pulling() -> None:
        while not stop.is_set():
            served.append(fetch(cluster.url, warm, timeout=10))

    background = threading.Thread(target=keep_pulling, name="pulls")
    background.start()
    try:
        (added,) = cluster.add_nodes(1)
        cluster.haproxy.reload(cluster.backends())
        cluster.wait_haproxy_up(10)
        for _ in range(2 * len(cluster.nodes)):
            got = fetch(cluster.url, warm)
            assert got.is_whole(config.digest, config.size), (got.status, got.error)
        taken = int(cluster.haproxy.server_stats()[f"node{len(cluster.nodes)}"]["stot"])
        assert taken > 0, f"haproxy sent {added.name} no requests"
    finally:
        stop.set()
        background.join(30)
    failed = [(r.status, r.error) for r in served if not r.is_whole(config.digest, config.size)]
    assert served and not failed, f"{len(failed)} of {len(served)} pulls failed while growing"
    assert {node.name: node.pid for node in cluster.nodes if node.name in before} == before, (
        "a node was restarted"
    )

    # the others know the new node: one upstream GET for a cold blob asked of all four
    cluster.wait_converged()
    front.throttle[layer.digest] = 4 * MiB
    mark = front.mark()
    with ThreadPoolExecutor(12, thread_name_prefix="grown") as pool:
        results = list(
            pool.map(
                lambda i: fetch(cluster.nodes[i % 4].url, blob_path(image, layer.digest)),
                range(12),
            )
        )
    del front.throttle[layer.digest]
    bad = [(r.url, r.status, r.error) for r in results if not r.is_whole(layer.digest, layer.size)]
    assert not bad
    gets = front.blob_gets(layer.digest, mark)
    assert len(gets) == 1, f"upstream GETs of one blob by four nodes: {described(gets)}"
