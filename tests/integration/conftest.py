"""Fixtures for integration tests: a token server, a real upstream registry with
test images, skopeo, and regproxy itself under twistd.

Plain synchronous fixtures driving subprocesses; no reactor. Everything listens
on 127.0.0.1 and lives in one temporary directory removed at the end of the
session (set ``REGPROXY_KEEP_TMP=1`` to keep it for a post-mortem).

Fixture API (other test modules rely on these names):

``token_server`` (session) -> :class:`tokenserver.TokenServer`
    ``.realm``, ``.service``, ``.issuer``, ``.requests`` / ``.mark()`` /
    ``.requests_since(i)``; accounts ``PUSH_CREDS`` (pull+push everywhere) and
    ``READ_CREDS`` (pull everywhere, ``private/...`` included).
``upstream_registry`` (session) -> :class:`harness.UpstreamRegistry`
    ``.url``, ``.host_port``, ``.port``, ``.push_creds``, ``.read_creds``,
    ``.mark()`` then ``.requests(since)`` / ``.count_requests(method,
    path_substring, since, statuses=None)`` over the access log, ``.kill()``
    (SIGKILL), ``.stop()``, ``.start()`` (same port and storage), ``.client()``.
    A test that stops it must start it again (``ensure_upstream_running`` does,
    after every test).
``test_images`` (session) -> ``dict[str, images.Image]``, pushed once:
    ``multilayer`` (OCI, 4 layers incl. 8 MiB), ``dockerimg`` (Docker schema 2),
    ``multiarch`` (OCI index, linux/amd64 + arm64/v8 + arm/v7), ``dockerlist``
    (Docker manifest list, same platforms), ``big`` (OCI, one 110 MiB random
    layer), ``private`` (``private/secret``: needs credentials). Each has
    ``.repository``, ``.tag``, ``.reference``, ``.docker_ref(host_port)``,
    ``.manifest`` (bytes), ``.manifest_digest``, ``.media_type``, ``.config``,
    ``.layers``, ``.children``, ``.blobs`` (digest -> Blob(size, media_type)),
    ``.manifests``, ``.layout`` (the ``dir:`` layout it was pushed from).
``skopeo`` (session) -> :class:`harness.Skopeo`: ``.pull(src, dest_dir,
    all_images=, creds=, check=)``, ``.run(*args)``, ``.popen(*args)``.
``upstream_pull`` (session) -> ``fn(image, all_images=False) -> Path``: the
    image pulled straight from upstream (memoized), to compare against.
``regproxy`` (function) -> factory ``regproxy(upstream_url=None, *,
    username=None, password=None, tag_ttl=3600, cache_dir=None,
    extra_config=None) -> harness.RegProxy`` started and answering GET /v2/:
    ``.url``, ``.host_port``, ``.port``, ``.cache_dir``, ``.log_path``,
    ``.log_text()``, ``.stop()``, ``.kill()``, ``.restart()``, ``.start()``,
    ``.blob_path(digest)``, ``.tmp_files()``, ``.client()``. Every instance is
    killed at teardown; on failure its log tail is printed.
``tcp_shim`` (function) -> factory ``tcp_shim(target_port=None) ->
    shim.TCPShim`` in front of the upstream registry by default.
``workdir`` (function) -> a fresh directory, removed after the test.

A second upstream, for routing (see ``test_routing.py``):

``ghcr_registry`` (session) -> :class:`harness.HtpasswdRegistry`: a private
    docker-registry with Basic auth (``GHCR_CREDS``); same API as
    ``upstream_registry``.
``ghcr_upstream`` (session) -> the ``upstreams: ghcr.io:`` entry that points
    regproxy at it, with its credentials and the alias ``GHCR_ALIAS``: pass
    ``regproxy(extra_config={"upstreams": {"ghcr.io": ghcr_upstream}})``.
``ghcr_images`` (session) -> ``dict[str, images.Image]``, pushed once to
    ``ghcr_registry``: ``image`` (``owner/image:1``) and ``multilayer``
    (``library/multilayer:1``, other content than ``test_images``' one).
``hub_twin_image`` (session) -> ``images.Image``: ``owner/image:1`` on
    ``upstream_registry`` (docker.io), other content than ghcr's.
``proxy`` (function) -> regproxy with docker.io (default) and ghcr.io,
    every routing test image pushed (``test_routing.py``, ``test_clients.py``).
``containerd`` (function) -> a running :class:`containerd.Containerd`
    (``.pull(ref, hosts_dir)``, ``.images()``, ``.content()``, ``.ctr(...)``),
    stopped after the test; on failure its log tail is printed.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import Any

import pytest

from . import harness, images, tokenserver
from .containerd import Containerd
from .shim import TCPShim

PUSH_CREDS = ("pusher", "pushpass")
READ_CREDS = ("reader", "readpass")
#: the only account of ``ghcr_registry`` (pull and push)
GHCR_CREDS = ("ghcruser", "ghcrpass")
#: a Host header regproxy maps to the ghcr.io upstream
GHCR_ALIAS = "ghcr.proxy.test"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Keep each phase's report on the item, so fixtures can tell a failure."""
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


def _failed(request: pytest.FixtureRequest) -> bool:
    return any(
        getattr(request.node, f"rep_{when}", None) is not None
        and getattr(request.node, f"rep_{when}").failed
        for when in ("setup", "call")
    )


@pytest.fixture(scope="session")
def integration_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="regproxy-it-"))
    yield path
    if os.environ.get("REGPROXY_KEEP_TMP"):
        print(f"\nkept integration temp dir {path}")
    else:
        shutil.rmtree(path, ignore_errors=True)


_workdir_counter = iter(range(1_000_000))


@pytest.fixture
def workdir(integration_dir: Path, request: pytest.FixtureRequest) -> Iterator[Path]:
    name = "".join(c if c.isalnum() else "-" for c in request.node.name)[:60]
    path = integration_dir / "tests" / f"{next(_workdir_counter):03d}-{name}"
    path.mkdir(parents=True)
    yield path
    if not os.environ.get("REGPROXY_KEEP_TMP"):
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def token_server() -> Iterator[tokenserver.TokenServer]:
    server = tokenserver.TokenServer(
        accounts={
            PUSH_CREDS[0]: tokenserver.Account(PUSH_CREDS[1], can_push=True),
            READ_CREDS[0]: tokenserver.Account(READ_CREDS[1]),
        }
    )
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def upstream_registry(
    integration_dir: Path, token_server: tokenserver.TokenServer
) -> Iterator[harness.UpstreamRegistry]:
    harness.require_binary("docker-registry", "docker-registry")
    workdir = integration_dir / "upstream"
    workdir.mkdir()
    registry = harness.UpstreamRegistry(
        workdir,
        token_realm=token_server.realm,
        service=token_server.service,
        issuer=token_server.issuer,
        rootcert=token_server.write_cert(workdir / "token-signer.pem"),
        push_creds=PUSH_CREDS,
        read_creds=READ_CREDS,
    )
    registry.start()
    yield registry
    registry.stop()


@pytest.fixture(autouse=True)
def ensure_upstream_running(request: pytest.FixtureRequest) -> Iterator[None]:
    """A test may kill the session's upstream registry: bring it back after."""
    yield
    if "upstream_registry" in request.fixturenames:
        registry: harness.UpstreamRegistry = request.getfixturevalue("upstream_registry")
        if not registry.running:
            registry.start()


@pytest.fixture(scope="session")
def skopeo(integration_dir: Path) -> harness.Skopeo:
    harness.require_binary("skopeo", "skopeo")
    return harness.Skopeo(integration_dir / "skopeo")


@pytest.fixture(scope="session")
def test_images(
    integration_dir: Path, upstream_registry: harness.UpstreamRegistry, skopeo: harness.Skopeo
) -> dict[str, images.Image]:
    """Build every image in :data:`images.IMAGE_SPECS` and push it upstream."""
    built = {}
    for spec in images.IMAGE_SPECS:
        layout = integration_dir / "layouts" / spec.name
        image = images.build_layout(spec, layout)
        args = ["copy", "--quiet", "--dest-tls-verify=false", "--preserve-digests"]
        args.append(
            f"--dest-creds={upstream_registry.push_creds[0]}:{upstream_registry.push_creds[1]}"
        )
        if image.is_index:
            args.append("--all")
        skopeo.run(*args, f"dir:{layout}", image.docker_ref(upstream_registry.host_port))
        # The registry must now serve exactly the bytes we wrote.
        served = upstream_registry.client(upstream_registry.read_creds).manifest(
            image.repository, image.tag, images.MANIFEST_TYPES
        )
        assert served.status == 200, (spec.name, served.status, served.body)
        assert served.body == image.manifest, f"{spec.name}: registry serves other manifest bytes"
        built[spec.name] = image
    return built


@pytest.fixture(scope="session")
def upstream_pull(
    integration_dir: Path, upstream_registry: harness.UpstreamRegistry, skopeo: harness.Skopeo
) -> Callable[..., Path]:
    """``upstream_pull(image, all_images=False)``: the image pulled by skopeo
    straight from the upstream registry (once per session)."""
    pulled: dict[tuple[str, bool], Path] = {}

    def pull(image: images.Image, all_images: bool = False) -> Path:
        key = (image.name, all_images)
        if key not in pulled:
            dest = (
                integration_dir / "upstream-pulls" / f"{image.name}{'-all' if all_images else ''}"
            )
            creds = (
                upstream_registry.read_creds if image.repository.startswith("private/") else None
            )
            skopeo.pull(
                image.docker_ref(upstream_registry.host_port),
                dest,
                all_images=all_images,
                creds=creds,
            )
            pulled[key] = dest
        return pulled[key]

    return pull


@pytest.fixture
def regproxy(
    upstream_registry: harness.UpstreamRegistry,
    workdir: Path,
    request: pytest.FixtureRequest,
) -> Iterator[Callable[..., harness.RegProxy]]:
    """Factory: ``regproxy(upstream_url=None, *, username=None, password=None,
    tag_ttl=3600, cache_dir=None, extra_config=None)`` starts regproxy with
    docker.io -> *upstream_url* (default: the upstream registry) and a fresh
    cache, and returns it once GET /v2/ answers 200 (401 with proxy.auth)."""
    started: list[harness.RegProxy] = []

    def make(
        upstream_url: str | None = None,
        *,
        username: str | None = None,
        password: str | None = None,
        tag_ttl: float = 3600,
        cache_dir: Path | None = None,
        extra_config: dict[str, Any] | None = None,
    ) -> harness.RegProxy:
        instance_dir = workdir / f"regproxy{len(started)}"
        instance_dir.mkdir()
        upstream: dict[str, Any] = {"url": upstream_url or upstream_registry.url}
        if username is not None:
            upstream.update(username=username, password=password)
        config: dict[str, Any] = {
            "cache": {"directory": str(cache_dir or instance_dir / "cache"), "tag_ttl": tag_ttl},
            "upstreams": {"docker.io": upstream},
            "default_upstream": "docker.io",
        }
        proxy = harness.RegProxy(instance_dir, harness.deep_merge(config, extra_config or {}))
        started.append(proxy)
        proxy.start()
        return proxy

    yield make
    for proxy in started:
        proxy.kill()
        if _failed(request):
            print(f"\n--- {proxy.log_path} (last 60 lines) ---\n{harness.tail(proxy.log_path, 60)}")


@pytest.fixture
def tcp_shim(upstream_registry: harness.UpstreamRegistry) -> Iterator[Callable[..., TCPShim]]:
    """Factory: ``tcp_shim(target_port=None)`` -> a running :class:`TCPShim`
    in front of *target_port* (default: the upstream registry)."""
    shims: list[TCPShim] = []

    def make(target_port: int | None = None) -> TCPShim:
        shim = TCPShim(target_port or upstream_registry.port)
        shim.up()
        shims.append(shim)
        return shim

    yield make
    for shim in shims:
        shim.down()


# ---------------------------------------------------------------------------
# a second upstream: ghcr.io, private, Basic auth
# ---------------------------------------------------------------------------


@pytest.fixture(scope="session")
def ghcr_registry(integration_dir: Path) -> Iterator[harness.HtpasswdRegistry]:
    harness.require_binary("docker-registry", "docker-registry")
    registry = harness.HtpasswdRegistry(integration_dir / "ghcr", GHCR_CREDS)
    registry.start()
    yield registry
    registry.stop()


@pytest.fixture(scope="session")
def ghcr_upstream(ghcr_registry: harness.HtpasswdRegistry) -> dict[str, Any]:
    return {
        "url": ghcr_registry.url,
        "username": GHCR_CREDS[0],
        "password": GHCR_CREDS[1],
        "aliases": [GHCR_ALIAS],
        # a private registry: nothing is public there, so share what
        # regproxy's credentials pull (the operator's choice)
        "share_private": True,
    }


def _small_image(kind: str, files: images.LayerFiles) -> Callable[..., images.Image]:
    """Two layers: a base layer every such image shares (byte for byte, so
    the same digest on both upstreams), and one of *files*, its own."""

    def build(w: images.LayoutWriter, rng: random.Random) -> images.Image:
        base = images.small_files(random.Random("shared-base"), 3, 1000, "etc")
        return w.add_image([base, files], kind, name=kind)

    return build


#: same repository names on both upstreams, other content (the base layer aside)
ROUTING_IMAGE_SPECS = {
    "ghcr-image": images.ImageSpec(
        "image", "owner/image", "1", _small_image("oci", {"app/id": b"ghcr.io owner/image\n"})
    ),
    "ghcr-multilayer": images.ImageSpec(
        "multilayer",
        "library/multilayer",
        "1",
        _small_image("oci", {"app/id": b"ghcr.io library/multilayer\n"}),
    ),
    "hub-image": images.ImageSpec(
        "image", "owner/image", "1", _small_image("docker", {"app/id": b"docker.io owner/image\n"})
    ),
}


def push_image(
    skopeo: harness.Skopeo,
    registry: harness.UpstreamRegistry,
    spec: images.ImageSpec,
    layout: Path,
) -> images.Image:
    """Build *spec* in *layout*, push it to *registry* with its push
    credentials, and check the registry serves the very manifest bytes."""
    image = images.build_layout(spec, layout)
    user, password = registry.push_creds
    args = ["copy", "--quiet", "--dest-tls-verify=false", "--preserve-digests"]
    args.append(f"--dest-creds={user}:{password}")
    if image.is_index:
        args.append("--all")
    skopeo.run(*args, f"dir:{layout}", image.docker_ref(registry.host_port))
    served = registry.client(registry.read_creds).manifest(
        image.repository, image.tag, images.MANIFEST_TYPES
    )
    assert served.status == 200, (spec.name, served.status, served.body)
    assert served.body == image.manifest, f"{spec.name}: registry serves other manifest bytes"
    return image


@pytest.fixture(scope="session")
def ghcr_images(
    integration_dir: Path, ghcr_registry: harness.HtpasswdRegistry, skopeo: harness.Skopeo
) -> dict[str, images.Image]:
    return {
        key.removeprefix("ghcr-"): push_image(
            skopeo, ghcr_registry, spec, integration_dir / "layouts" / key
        )
        for key, spec in ROUTING_IMAGE_SPECS.items()
        if key.startswith("ghcr-")
    }


@pytest.fixture(scope="session")
def hub_twin_image(
    integration_dir: Path, upstream_registry: harness.UpstreamRegistry, skopeo: harness.Skopeo
) -> images.Image:
    layout = integration_dir / "layouts" / "hub-image"
    return push_image(skopeo, upstream_registry, ROUTING_IMAGE_SPECS["hub-image"], layout)


@pytest.fixture
def containerd(workdir: Path, request: pytest.FixtureRequest) -> Iterator[Containerd]:
    daemon = Containerd(workdir / "containerd").start()
    yield daemon
    daemon.stop()
    if _failed(request):
        print(f"\n--- {daemon.log_path} (last 30 lines) ---\n{harness.tail(daemon.log_path, 30)}")


@pytest.fixture
def proxy(
    regproxy: Callable[..., harness.RegProxy],
    ghcr_upstream: dict[str, Any],
    test_images: dict[str, images.Image],
    ghcr_images: dict[str, images.Image],
    hub_twin_image: images.Image,
) -> harness.RegProxy:
    """regproxy with docker.io (default) and ghcr.io, every image pushed."""
    return regproxy(extra_config={"upstreams": {"ghcr.io": ghcr_upstream}})
