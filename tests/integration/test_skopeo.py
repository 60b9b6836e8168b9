"""skopeo through regproxy: the acceptance tests of the caching issue.

- a pull through the proxy is byte-identical to a pull straight from upstream,
  and a second pull is served from the cache (no upstream blob GET, X-Cache: HIT);
- concurrent cold pulls fetch every blob from upstream exactly once;
- an upstream that dies mid-blob leaves nothing in the cache, the client's pull
  fails (never a short blob), and the next pull after recovery is whole;
- Docker and OCI media types (single images and indexes) both pass unchanged.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from . import harness, images
from .images import Image
from .shim import TCPShim

pytestmark = pytest.mark.integration

MiB = 1024 * 1024


def assert_same_tree(got: Path, want: Path) -> None:
    got_files, want_files = harness.tree_digests(got), harness.tree_digests(want)
    assert sorted(got_files) == sorted(want_files), f"{got} and {want} hold different files"
    differ = [name for name in want_files if got_files[name] != want_files[name]]
    assert not differ, f"files differ between {got} and {want}: {differ}"


def assert_pulled(dest: Path, image: Image, reference: Path, all_images: bool) -> None:
    """*dest* equals the straight-from-upstream pull, and (``dir:`` pulls) the
    very layout the image was pushed from."""
    assert_same_tree(dest, reference)
    if not all_images or dest.joinpath("manifest.json").exists():
        assert image.layout is not None
        assert_same_tree(dest, image.layout)


def blob_gets(
    upstream: harness.UpstreamRegistry, since: int
) -> dict[str, list[harness.AccessLogLine]]:
    """Upstream blob GETs since *since*, by digest (401 challenges excluded)."""
    out: dict[str, list[harness.AccessLogLine]] = {}
    for line in upstream.requests(since):
        if line.method == "GET" and line.is_blob and line.status != 401:
            out.setdefault(line.path.rsplit("/", 1)[1], []).append(line)
    return out


def assert_stored(proxy: harness.RegProxy, blobs: dict[str, images.Blob]) -> None:
    for digest, blob in blobs.items():
        path = proxy.blob_path(digest)
        assert path.is_file(), f"{digest} not in the store at {path}"
        assert path.stat().st_size == blob.size, (
            f"{path}: {path.stat().st_size} bytes, want {blob.size}"
        )
        assert images.file_digest(path) == digest, f"{path} does not hash to its name"


def wait_tmp_empty(proxy: harness.RegProxy, timeout: float = 10.0) -> None:
    try:
        harness.wait_until(
            lambda: not proxy.tmp_files(), timeout, f"{proxy.cache_dir}/tmp to empty"
        )
    except TimeoutError:
        left = [(str(p), p.stat().st_size) for p in proxy.tmp_files()]
        raise AssertionError(f"temp files left behind in the cache: {left}") from None


# ---------------------------------------------------------------------------
# 1. twice through the proxy: identical, and the second time from the cache
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, all_images",
    [("multilayer", False), ("multiarch", True)],
    ids=["oci-image-dir", "oci-index-all"],
)
def test_second_pull_is_served_from_cache(
    name: str,
    all_images: bool,
    test_images: dict[str, Image],
    upstream_registry: harness.UpstreamRegistry,
    upstream_pull: Callable[..., Path],
    regproxy: Callable[..., harness.RegProxy],
    skopeo: harness.Skopeo,
    workdir: Path,
) -> None:
    image = test_images[name]
    reference = upstream_pull(image, all_images)
    proxy = regproxy()

    mark = upstream_registry.mark()
    skopeo.pull(image.docker_ref(proxy.host_port), workdir / "first", all_images=all_images)
    assert_pulled(workdir / "first", image, reference, all_images)
    fetched = blob_gets(upstream_registry, mark)
    assert set(fetched) == set(image.blobs), "the cold pull did not go through to upstream"
    refetched = {d: len(lines) for d, lines in fetched.items() if len(lines) > 1}
    assert not refetched, f"blobs fetched from upstream more than once by one pull: {refetched}"
    assert_stored(proxy, image.blobs)
    wait_tmp_empty(proxy)

    mark = upstream_registry.mark()
    skopeo.pull(image.docker_ref(proxy.host_port), workdir / "second", all_images=all_images)
    assert_pulled(workdir / "second", image, reference, all_images)
    upstream_blob_gets = [
        line.raw
        for line in upstream_registry.requests(mark)
        if line.method == "GET" and line.is_blob
    ]
    assert upstream_blob_gets == [], "the warm pull fetched blobs from upstream again"
    by_digest = [
        line.raw
        for line in upstream_registry.requests(mark, settle=0)
        if line.method == "GET" and line.is_manifest and "/manifests/sha256:" in line.path
    ]
    assert by_digest == [], "the warm pull fetched manifests by digest from upstream again"

    # A direct GET through the proxy: answered from the cache.
    client = proxy.client()
    for digest, blob in image.blobs.items():
        resp = client.blob(image.repository, digest)
        assert resp.status == 200, (digest, resp.status, resp.body[:200])
        assert resp.header("X-Cache") == "HIT", (digest, dict(resp.headers))
        assert hashlib.sha256(resp.body).hexdigest() == blob.hex
        head = client.blob(image.repository, digest, method="HEAD")
        assert head.status == 200 and head.header("Content-Length") == str(blob.size), dict(
            head.headers
        )
    for digest, manifest in image.manifests.items():
        resp = client.manifest(image.repository, digest, images.MANIFEST_TYPES)
        assert resp.status == 200, (digest, resp.status, resp.body[:200])
        assert resp.header("X-Cache") == "HIT", (digest, dict(resp.headers))
        assert resp.body == manifest
        assert resp.header("Docker-Content-Digest") == digest
    by_tag = client.manifest(image.repository, image.tag, images.MANIFEST_TYPES)
    assert by_tag.status == 200 and by_tag.body == image.manifest
    assert by_tag.header("X-Cache") == "HIT", (
        f"tag within tag_ttl not served from cache: {dict(by_tag.headers)}"
    )
    assert [line.raw for line in upstream_registry.requests(mark) if line.is_blob] == []


def test_cache_survives_restart(
    test_images: dict[str, Image],
    upstream_registry: harness.UpstreamRegistry,
    upstream_pull: Callable[..., Path],
    regproxy: Callable[..., harness.RegProxy],
    skopeo: harness.Skopeo,
    workdir: Path,
) -> None:
    image = test_images["dockerimg"]
    reference = upstream_pull(image)
    proxy = regproxy()
    skopeo.pull(image.docker_ref(proxy.host_port), workdir / "before")
    proxy.restart()
    mark = upstream_registry.mark()
    skopeo.pull(image.docker_ref(proxy.host_port), workdir / "after")
    assert_pulled(workdir / "after", image, reference, False)
    blob_lines = [line.raw for line in upstream_registry.requests(mark) if line.is_blob]
    assert blob_lines == [], "blobs fetched again after a restart"
    resp = proxy.client().blob(image.repository, image.layers[0].digest)
    assert resp.status == 200 and resp.header("X-Cache") == "HIT"


def test_a_tag_skopeo_asks_again_is_sent_again_as_it_was(
    test_images: dict[str, Image],
    regproxy: Callable[..., harness.RegProxy],
    skopeo: harness.Skopeo,
) -> None:
    """skopeo (containers/image, as podman and CRI-O) asks a tag with the
    same bytes each time, with ``Connection: close``: within the moment an
    answer is kept, regproxy sends it again without parsing the request,
    and skopeo gets the same manifest."""
    image = test_images["dockerimg"]
    proxy = regproxy()

    def sent_again() -> float:
        with urllib.request.urlopen(proxy.admin_url + "/metrics", timeout=10) as reply:
            text = reply.read().decode()
        (line,) = [
            x for x in text.splitlines() if x.startswith("regproxy_answers_sent_again_total")
        ]
        return float(line.split()[-1])

    # three askings within the second an answer is kept: each takes a
    # fraction of it here, a loaded machine may need a few more tries
    for _ in range(20):
        inspected = skopeo.run(
            "inspect", "--raw", "--tls-verify=false", image.docker_ref(proxy.host_port)
        )
        assert inspected.stdout.encode() == image.manifest
        if sent_again() > 0:
            break
    assert sent_again() > 0
    again = skopeo.run("inspect", "--raw", "--tls-verify=false", image.docker_ref(proxy.host_port))
    assert again.stdout.encode() == image.manifest


def test_x_cache_header_says_miss_then_hit(
    test_images: dict[str, Image],
    upstream_registry: harness.UpstreamRegistry,
    regproxy: Callable[..., harness.RegProxy],
) -> None:
    image = test_images["dockerimg"]
    assert image.config is not None
    client = regproxy().client()
    requests = [
        (
            "manifest",
            lambda: client.manifest(image.repository, image.manifest_digest, images.MANIFEST_TYPES),
        ),
        ("layer", lambda: client.blob(image.repository, image.layers[0].digest)),
        ("config", lambda: client.blob(image.repository, image.config.digest)),  # type: ignore[union-attr]
    ]
    for what, get in requests:
        mark = upstream_registry.mark()
        first, second = get(), get()
        assert (first.status, second.status) == (200, 200), (
            what,
            first.body[:200],
            second.body[:200],
        )
        assert first.body == second.body
        assert (first.header("X-Cache"), second.header("X-Cache")) == ("MISS", "HIT"), what
        upstream_gets = [
            line.raw
            for line in upstream_registry.requests(mark)
            if line.method == "GET" and line.status == 200
        ]
        assert len(upstream_gets) == 1, (what, upstream_gets)


# ---------------------------------------------------------------------------
# 2. ten cold pulls at once: one upstream GET per blob
# ---------------------------------------------------------------------------


def test_parallel_cold_pulls_fetch_each_blob_once(
    test_images: dict[str, Image],
    upstream_registry: harness.UpstreamRegistry,
    upstream_pull: Callable[..., Path],
    regproxy: Callable[..., harness.RegProxy],
    tcp_shim: Callable[..., TCPShim],
    skopeo: harness.Skopeo,
    workdir: Path,
) -> None:
    image = test_images["multilayer"]
    reference = upstream_pull(image)
    # Slow upstream responses down (8 MiB layer: ~1 s) so that all ten
    # clients ask for each blob while the first fetch is still in flight.
    shim = tcp_shim()
    shim.rate = 8 * MiB
    proxy = regproxy(shim.url)

    mark = upstream_registry.mark()
    clients = []
    results = []
    try:
        for i in range(10):
            args = skopeo.copy_args(
                image.docker_ref(proxy.host_port), f"dir:{workdir / f'pull{i}'}"
            )
            clients.append(skopeo.popen(*args, stdout=None))
        for proc in clients:
            _, stderr = proc.communicate(timeout=180)
            results.append((proc.returncode, stderr))
    finally:
        for proc in clients:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert [rc for rc, _ in results] == [0] * 10, "\n".join(err for _, err in results)
    for i in range(10):
        assert_pulled(workdir / f"pull{i}", image, reference, False)

    fetched = blob_gets(upstream_registry, mark)
    counts = {digest: len(fetched.get(digest, [])) for digest in image.blobs}
    assert counts == {digest: 1 for digest in image.blobs}, (
        "want exactly one upstream GET per blob; got:\n"
        + "\n".join(line.raw for lines in fetched.values() for line in lines)
    )
    assert set(fetched) <= set(image.blobs)
    assert_stored(proxy, image.blobs)
    wait_tmp_empty(proxy)


# ---------------------------------------------------------------------------
# 3. the upstream dies mid-blob
# ---------------------------------------------------------------------------

CUT_AT = 16 * MiB


def _assert_nothing_cached(proxy: harness.RegProxy, blob: images.Blob) -> None:
    wait_tmp_empty(proxy)
    assert not proxy.blob_path(blob.digest).exists(), "a truncated blob was stored"
    stray = [str(p) for p in proxy.cache_dir.rglob(f"*{blob.hex}*")]
    assert stray == [], f"files named after the broken blob remain: {stray}"


def _pull_fails(skopeo: harness.Skopeo, proxy: harness.RegProxy, image: Image, dest: Path) -> None:
    started = time.monotonic()
    result = skopeo.pull(image.docker_ref(proxy.host_port), dest, check=False, timeout=120)
    assert result.returncode != 0, "the pull succeeded although the upstream died mid-blob"
    assert time.monotonic() - started < 120


def _raw_blob_get(proxy: harness.RegProxy, image: Image, blob: images.Blob) -> str:
    """GET the blob through the proxy with a client that checks nothing but
    HTTP framing (as curl would): how did the response end?"""
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=30)
    try:
        conn.request("GET", f"/v2/{image.repository}/blobs/{blob.digest}")
        resp = conn.getresponse()
        if resp.status != 200:
            return f"status {resp.status}"
        h = hashlib.sha256()
        size = 0
        try:
            while chunk := resp.read(1 << 20):
                h.update(chunk)
                size += len(chunk)
        except TimeoutError:
            return f"hung after {size} bytes"  # also a bug: the client waits forever
        except (http.client.IncompleteRead, OSError) as e:
            return f"broken after {size} bytes: {e!r}"
        if "sha256:" + h.hexdigest() == blob.digest:
            return "whole"
        return f"clean end after {size} of {blob.size} bytes"  # the bug: looks complete
    finally:
        conn.close()


def test_upstream_connection_cut_mid_blob(
    test_images: dict[str, Image],
    upstream_pull: Callable[..., Path],
    regproxy: Callable[..., harness.RegProxy],
    tcp_shim: Callable[..., TCPShim],
    skopeo: harness.Skopeo,
    workdir: Path,
) -> None:
    """The connection to upstream is reset after 16 MiB of the 110 MiB layer,
    and upstream stays unreachable until the client has given up."""
    image = test_images["big"]
    layer = image.biggest_layer
    assert layer.size > 100 * MiB
    reference = upstream_pull(image)
    shim = tcp_shim()
    proxy = regproxy(shim.url)

    shim.cut_after(CUT_AT)
    _pull_fails(skopeo, proxy, image, workdir / "broken")
    assert shim.fired.wait(10), "the shim never saw the big layer: did the pull fail earlier?"
    _assert_nothing_cached(proxy, layer)
    # While upstream is down, the proxy must not hand out the blob either.
    resp = proxy.client().blob(image.repository, layer.digest, method="HEAD")
    assert resp.status != 200, (
        f"HEAD of a blob never fully fetched: {resp.status} {dict(resp.headers)}"
    )

    # Once more with a client that trusts HTTP framing alone: the response
    # must end broken (or never start), not cleanly short.
    shim.up()
    shim.cut_after(CUT_AT)
    outcome = _raw_blob_get(proxy, image, layer)
    assert shim.fired.wait(10)
    assert outcome.startswith(("broken", "status")), f"blob GET through the proxy: {outcome}"
    _assert_nothing_cached(proxy, layer)

    shim.disarm()
    shim.up()
    skopeo.pull(image.docker_ref(proxy.host_port), workdir / "whole")
    assert_pulled(workdir / "whole", image, reference, False)
    assert_stored(proxy, {layer.digest: layer})
    wait_tmp_empty(proxy)


def test_upstream_killed_mid_blob(
    test_images: dict[str, Image],
    upstream_registry: harness.UpstreamRegistry,
    upstream_pull: Callable[..., Path],
    regproxy: Callable[..., harness.RegProxy],
    tcp_shim: Callable[..., TCPShim],
    skopeo: harness.Skopeo,
    workdir: Path,
) -> None:
    """docker-registry gets SIGKILL once 16 MiB of the 110 MiB layer have
    passed (the shim only watches the byte count), and is restarted after."""
    image = test_images["big"]
    layer = image.biggest_layer
    reference = upstream_pull(image)
    shim = tcp_shim()
    proxy = regproxy(shim.url)

    shim.on_response_bytes(CUT_AT, upstream_registry.kill)
    _pull_fails(skopeo, proxy, image, workdir / "broken")
    assert shim.fired.wait(10) and not upstream_registry.running
    _assert_nothing_cached(proxy, layer)

    upstream_registry.start()
    skopeo.pull(image.docker_ref(proxy.host_port), workdir / "whole")
    assert_pulled(workdir / "whole", image, reference, False)
    assert_stored(proxy, {layer.digest: layer})
    wait_tmp_empty(proxy)


# ---------------------------------------------------------------------------
# 4. Docker and OCI media types
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, all_images",
    [("dockerimg", False), ("multilayer", False), ("dockerlist", True), ("multiarch", True)],
    ids=["docker-v2s2", "oci-manifest", "docker-manifest-list", "oci-index"],
)
def test_media_types_pass_unchanged(
    name: str,
    all_images: bool,
    test_images: dict[str, Image],
    upstream_pull: Callable[..., Path],
    regproxy: Callable[..., harness.RegProxy],
    skopeo: harness.Skopeo,
    workdir: Path,
) -> None:
    image = test_images[name]
    proxy = regproxy()
    # dir: keeps every manifest's bytes, so the pull must equal what was pushed.
    dest = workdir / "pulled"
    result = skopeo.run(
        *skopeo.copy_args(image.docker_ref(proxy.host_port), f"dir:{dest}", all_images=all_images)
    )
    assert result.returncode == 0
    assert image.layout is not None
    assert_same_tree(dest, image.layout)

    client = proxy.client()
    for digest, manifest in image.manifests.items():
        media_type = json.loads(manifest)["mediaType"]
        # Ask for this type only, as a client that knows just one would.
        resp = client.manifest(image.repository, digest, [media_type])
        assert resp.status == 200, (digest, resp.status, resp.body[:200])
        assert resp.body == manifest
        assert resp.header("Content-Type") == media_type
        assert resp.header("Docker-Content-Digest") == digest
        head = client.manifest(image.repository, digest, images.MANIFEST_TYPES, method="HEAD")
        assert head.status == 200, (digest, head.status)
        assert head.header("Content-Type") == media_type
        assert head.header("Docker-Content-Digest") == digest
        assert head.header("Content-Length") == str(len(manifest))
        # Distribution 2.8 has no referrers API: its 404 must reach the client,
        # which then looks for referrers by tag (sha256-<hex>)
        referrers = client.get(f"/v2/{image.repository}/referrers/{digest}")
        assert referrers.status == 404, referrers.body[:200]


def test_a_narrow_accept_does_not_poison_a_multi_arch_tag(
    test_images: dict[str, Image],
    regproxy: Callable[..., harness.RegProxy],
    skopeo: harness.Skopeo,
    workdir: Path,
) -> None:
    """One client that takes no lists, first on a cold cache: Distribution
    answers it with the amd64 manifest, which must not become the tag."""
    image = test_images["dockerlist"]
    proxy = regproxy()
    client = proxy.client()
    single = "application/vnd.docker.distribution.manifest.v2+json"
    amd64 = image.children["linux/amd64"].manifest_digest
    first = client.manifest(image.repository, image.tag, [single])
    assert (first.status, first.header("Docker-Content-Digest")) == (200, amd64)

    dest = workdir / "arm64"
    skopeo.run(
        "--override-arch",
        "arm64",
        "--override-variant",
        "v8",
        *skopeo.copy_args(image.docker_ref(proxy.host_port), f"dir:{dest}"),
    )
    arm64 = image.children["linux/arm64/v8"]
    assert (dest / "manifest.json").read_bytes() == arm64.manifest
    listed = client.manifest(image.repository, image.tag, images.MANIFEST_TYPES)
    assert listed.header("Docker-Content-Digest") == image.manifest_digest


# ---------------------------------------------------------------------------
# private repositories: the proxy's upstream credentials
# ---------------------------------------------------------------------------


def test_private_repository_needs_upstream_credentials(
    test_images: dict[str, Image],
    upstream_registry: harness.UpstreamRegistry,
    regproxy: Callable[..., harness.RegProxy],
    skopeo: harness.Skopeo,
    workdir: Path,
) -> None:
    image = test_images["private"]
    anonymous = regproxy()
    result = skopeo.pull(image.docker_ref(anonymous.host_port), workdir / "denied", check=False)
    assert result.returncode != 0, (
        "a private image came through a proxy without upstream credentials"
    )

    # with credentials, regproxy can pull it, but serves it to nobody...
    user, password = upstream_registry.read_creds
    authed = regproxy(username=user, password=password)
    result = skopeo.pull(image.docker_ref(authed.host_port), workdir / "kept", check=False)
    assert result.returncode != 0, "a private image was served to an anonymous client"
    client = authed.client()
    assert client.manifest(image.repository, image.tag, images.MANIFEST_TYPES).status == 401
    public = test_images["multilayer"]
    skopeo.pull(public.docker_ref(authed.host_port), workdir / "public")

    # ...unless the operator says it may be shared
    shared = regproxy(
        username=user,
        password=password,
        extra_config={"upstreams": {"docker.io": {"share_private": True}}},
    )
    skopeo.pull(image.docker_ref(shared.host_port), workdir / "allowed")
    assert image.layout is not None
    assert_same_tree(workdir / "allowed", image.layout)
