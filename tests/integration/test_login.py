"""Client authentication on the proxy port (issue 12), with the real clients.

Every login path a client takes: ``docker login`` (dockerd's token dance),
and dockerd's Docker Hub credentials sent to regproxy as its mirror;
``podman login``, for regproxy and for regproxy as a mirror; ``skopeo
--src-creds`` and ``--src-registry-token``; containerd's ``ctr --user``
(OAuth2 ``POST /token``) straight and through a ``hosts.toml`` mirror, and a
static token in ``hosts.toml``'s headers; and raw HTTP (``http.client``) for
what the clients hide: the challenge, the token endpoint's answers, the
status codes.  Also: the users' files read again while running, and no
secret in regproxy's log.

Two regproxies serve the whole module (both pull ``private/secret`` from the
upstream with its read credentials and ``share_private``, so that what keeps
it private is regproxy's rules, not the upstream):

- ``secured``: no anonymous pulls; ``private/**`` only for alice and the
  group ``ci`` (the static-token user robot); anything else for any
  logged-in user (bob too);
- ``open_door``: ``anonymous: true`` with a rule letting anonymous clients
  pull ``library/**``, and the default limit of failed logins.

Failed logins are limited per client address, and every client here is on
loopback: ``secured`` allows many failures, and the rate-limit test talks
from 127.0.0.2/127.0.0.3 so that it limits no other test.
"""

from __future__ import annotations

import base64
import http.client
import json
import secrets
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import bcrypt
import jwt
import pytest

from . import harness, images
from .conftest import READ_CREDS
from .containerd import Containerd
from .dockerd import DockerDaemon
from .images import Image
from .podman import Podman
from .regclient import parse_bearer_challenge
from .test_dockerd import assert_pulled, for_this_machine, short_name
from .test_skopeo import assert_same_tree

pytestmark = pytest.mark.integration

ALICE = ("alice", "alice-pw-" + secrets.token_hex(8))
BOB = ("bob", "bob-pw-" + secrets.token_hex(8))
WRONG = "wrong-pw-" + secrets.token_hex(8)
ROBOT_TOKEN = "robot-" + secrets.token_hex(16)
SECRETS = (ALICE[1], BOB[1], WRONG, ROBOT_TOKEN)

PUBLIC = "library/dockerimg"
SERVICE = "regproxy"


# ---------------------------------------------------------------------------
# the two regproxies
# ---------------------------------------------------------------------------


def htpasswd_entry(user: str, password: str, prefix: str) -> str:
    """``user:$2y$...`` as ``htpasswd -B`` writes it (or ``$2b$``, Python's)."""
    hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=5)).decode()
    return f"{user}:{prefix}{hashed.removeprefix('$2b$')}"


@pytest.fixture(scope="module")
def login_dir(integration_dir: Path) -> Path:
    path = integration_dir / "login"
    path.mkdir()
    (path / "htpasswd").write_text(
        htpasswd_entry(*ALICE, "$2y$") + "\n" + htpasswd_entry(*BOB, "$2b$") + "\n"
    )
    (path / "tokens").write_text(f"robot {ROBOT_TOKEN}\n")
    return path


#: who may pull what from ``secured``
SECURED_AUTH = {
    "groups": {"ci": ["robot"]},
    "rules": [{"repositories": ["private/**"], "users": ["alice"], "groups": ["ci"]}],
    # every client is 127.0.0.1: the refused logins of all tests add up
    "max_failures": 1000,
}
#: who may pull what from ``open_door``
OPEN_AUTH = {
    "anonymous": True,
    "rules": [
        {"upstream": "*", "repositories": ["library/**"], "users": ["*"], "anonymous": True},
        {"upstream": "docker.io", "repositories": ["private/**"], "users": ["alice"]},
    ],
}


def serve(
    upstream: harness.UpstreamRegistry, login_dir: Path, name: str, auth: dict[str, Any]
) -> Iterator[harness.RegProxy]:
    """A regproxy with *auth* (and the users of *login_dir*), for the module."""
    users = {"htpasswd": str(login_dir / "htpasswd"), "tokens": str(login_dir / "tokens")}
    upstream_entry = {
        "url": upstream.url,
        "username": READ_CREDS[0],
        "password": READ_CREDS[1],
        "share_private": True,
    }
    config = {
        "upstreams": {"docker.io": upstream_entry},
        "default_upstream": "docker.io",
        "proxy": {"auth": {**users, **auth}},
    }
    proxy = harness.RegProxy(login_dir / name, config)
    try:
        proxy.start()
        yield proxy
    finally:
        proxy.kill()


@pytest.fixture(scope="module")
def secured(
    login_dir: Path, upstream_registry: harness.UpstreamRegistry
) -> Iterator[harness.RegProxy]:
    yield from serve(upstream_registry, login_dir, "secured", SECURED_AUTH)


@pytest.fixture(scope="module")
def open_door(
    login_dir: Path, upstream_registry: harness.UpstreamRegistry
) -> Iterator[harness.RegProxy]:
    yield from serve(upstream_registry, login_dir, "open", OPEN_AUTH)


# ---------------------------------------------------------------------------
# raw HTTP
# ---------------------------------------------------------------------------


class Answer:
    def __init__(self, resp: http.client.HTTPResponse) -> None:
        self.status = resp.status
        self.headers = resp.headers
        self.body = resp.read()

    def json(self) -> Any:
        return json.loads(self.body)

    def error_code(self) -> str:
        """The registry error format's first code."""
        return str(self.json()["errors"][0]["code"])

    def __repr__(self) -> str:
        return f"<{self.status} {dict(self.headers)} {self.body[:300]!r}>"


def call(
    proxy: harness.RegProxy,
    path: str,
    *,
    method: str = "GET",
    headers: dict[str, str] | None = None,
    body: bytes | None = None,
    source: str | None = None,
) -> Answer:
    """One request on a connection of its own (from *source*, a loopback address)."""
    conn = http.client.HTTPConnection(
        "127.0.0.1", proxy.port, timeout=30, source_address=(source, 0) if source else None
    )
    try:
        conn.request(method, path, body=body, headers=headers or {})
        return Answer(conn.getresponse())
    finally:
        conn.close()


def basic(creds: tuple[str, str]) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(":".join(creds).encode()).decode()}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def token_query(repository: str) -> str:
    return "/token?" + urlencode({"service": SERVICE, "scope": f"repository:{repository}:pull"})


def get_token(
    proxy: harness.RegProxy, repository: str, creds: tuple[str, str] | None = None
) -> str:
    """A token for pulling *repository*, as alice/bob (or anonymous)."""
    answer = call(proxy, token_query(repository), headers=basic(creds) if creds else None)
    assert answer.status == 200, answer
    return str(answer.json()["token"])


def manifest(
    proxy: harness.RegProxy, repository: str, reference: str, headers: dict[str, str] | None
) -> Answer:
    accept = {"Accept": ", ".join(images.MANIFEST_TYPES)}
    return call(
        proxy, f"/v2/{repository}/manifests/{reference}", headers={**accept, **(headers or {})}
    )


def blob(
    proxy: harness.RegProxy, repository: str, digest: str, headers: dict[str, str] | None
) -> Answer:
    return call(proxy, f"/v2/{repository}/blobs/{digest}", headers=headers)


def assert_challenged(answer: Answer, proxy: harness.RegProxy, repository: str | None) -> None:
    """A 401 whose challenge sends the client to regproxy's token endpoint
    (for a pull of *repository*, if given)."""
    assert answer.status == 401, answer
    header = answer.headers["WWW-Authenticate"] or ""
    assert header.startswith("Bearer "), answer
    want = {"realm": f"http://{proxy.host_port}/token", "service": SERVICE}
    if repository:
        want["scope"] = f"repository:{repository}:pull"
    params = parse_bearer_challenge(header)
    assert {key: params.get(key) for key in (*want, "scope")} == {"scope": None, **want}, header
    assert answer.error_code() == "UNAUTHORIZED", answer


def layout_bytes(image: Image, digest: str) -> bytes:
    assert image.layout is not None
    return (image.layout / digest.split(":", 1)[1]).read_bytes()


def failure(result: subprocess.CompletedProcess[str], proxy: harness.RegProxy) -> str:
    return (
        f"exited {result.returncode}: {result.stderr.strip()} {result.stdout.strip()}\n"
        f"--- regproxy log:\n{harness.tail(proxy.log_path, 30)}"
    )


# ---------------------------------------------------------------------------
# the protocol, seen raw
# ---------------------------------------------------------------------------


def test_challenge_and_token_endpoint(
    secured: harness.RegProxy, test_images: dict[str, Image]
) -> None:
    image = test_images["dockerimg"]
    assert_challenged(call(secured, "/v2/"), secured, None)
    assert_challenged(manifest(secured, PUBLIC, "1", None), secured, PUBLIC)

    answer = call(secured, token_query(PUBLIC), headers=basic(ALICE))
    assert answer.status == 200, answer
    got = answer.json()
    assert set(got) >= {"token", "access_token", "expires_in", "issued_at"}, got
    assert got["token"] == got["access_token"] and got["expires_in"] > 0, got
    claims = jwt.decode(got["token"], options={"verify_signature": False})
    assert "exp" in claims, claims
    # the token pulls; so do Basic credentials sent straight to /v2/
    for headers in (bearer(got["token"]), basic(ALICE), basic(BOB)):
        answer = manifest(secured, PUBLIC, "1", headers)
        assert answer.status == 200 and answer.body == image.manifest, (headers, answer)
    assert call(secured, "/v2/", headers=bearer(got["token"])).status == 200

    # containerd's OAuth2 form
    form = {
        "grant_type": "password",
        "username": ALICE[0],
        "password": ALICE[1],
        "service": SERVICE,
        "scope": f"repository:{PUBLIC}:pull",
        "client_id": "containerd-client",
    }
    content_type = {"Content-Type": "application/x-www-form-urlencoded"}
    answer = call(
        secured, "/token", method="POST", headers=content_type, body=urlencode(form).encode()
    )
    assert answer.status == 200, answer
    posted = answer.json()["access_token"]
    assert manifest(secured, PUBLIC, "1", bearer(posted)).status == 200

    # wrong passwords and tokens
    wrong_form = urlencode({**form, "password": WRONG}).encode()
    answer = call(secured, "/token", method="POST", headers=content_type, body=wrong_form)
    assert answer.status == 401, answer
    for headers in (basic((ALICE[0], WRONG)), basic(("nobody", ALICE[1]))):
        answer = call(secured, token_query(PUBLIC), headers=headers)
        assert answer.status == 401 and answer.error_code() == "UNAUTHORIZED", answer
        assert_challenged(manifest(secured, PUBLIC, "1", headers), secured, PUBLIC)
    forged = jwt.encode({"sub": "alice", "aud": SERVICE}, secrets.token_hex(32), algorithm="HS256")
    assert_challenged(manifest(secured, PUBLIC, "1", bearer(forged)), secured, PUBLIC)

    # no credentials: where no anonymous pulls are allowed, either no token
    # (the client learns at once to log in) or one that pulls nothing
    answer = call(secured, token_query(PUBLIC))
    if answer.status == 200:
        anonymous = bearer(answer.json()["token"])
        assert_challenged(manifest(secured, PUBLIC, "1", anonymous), secured, PUBLIC)
    else:
        assert answer.status == 401 and answer.error_code() == "UNAUTHORIZED", answer


# ---------------------------------------------------------------------------
# the clients
# ---------------------------------------------------------------------------


def test_docker_login_then_pull(
    secured: harness.RegProxy, test_images: dict[str, Image], workdir: Path
) -> None:
    image = test_images["dockerimg"]
    assert image.config is not None
    ref = f"{secured.host_port}/{PUBLIC}:{image.tag}"
    with DockerDaemon(workdir / "dockerd", secured.url) as daemon:
        result = daemon.pull(ref)
        assert result.returncode != 0, "pulled without logging in"

        login = ("login", "--username", ALICE[0], "--password")
        result = daemon.docker(*login, WRONG, secured.host_port)
        assert result.returncode != 0, "docker login took a wrong password"
        result = daemon.pull(ref)
        assert result.returncode != 0, "pulled after a refused login"

        result = daemon.docker(*login, ALICE[1], secured.host_port)
        assert result.returncode == 0, failure(result, secured)
        saved = json.loads((daemon.client_config_dir / "config.json").read_text())
        assert secured.host_port in saved["auths"], saved

        result = daemon.pull(ref)
        assert result.returncode == 0, failure(result, secured)
        assert daemon.image_inspect(ref)["Id"] == image.config.digest

        daemon.docker("image", "rm", ref, check=True)
        daemon.docker("logout", secured.host_port, check=True)
        result = daemon.pull(ref)
        assert result.returncode != 0, "pulled after logging out"

        # a robot logs in with its static token, and its group opens private/**
        private = test_images["private"]
        assert private.config is not None
        private_ref = f"{secured.host_port}/{private.repository}:{private.tag}"
        result = daemon.docker("login", "-u", "robot", "-p", ROBOT_TOKEN, secured.host_port)
        assert result.returncode == 0, failure(result, secured)
        result = daemon.pull(private_ref)
        assert result.returncode == 0, failure(result, secured)
        assert daemon.image_inspect(private_ref)["Id"] == private.config.digest
        daemon.docker("logout", secured.host_port, check=True)

        # as Docker Hub's mirror, regproxy gets what dockerd holds for Docker Hub
        index = test_images["dockerlist"]
        child, arch = for_this_machine(index)
        hub_ref = f"{short_name(index.repository)}:{index.tag}"
        result = daemon.pull(hub_ref)
        assert result.returncode != 0, "pulled through the mirror without credentials"
        hub_login = base64.b64encode(":".join(ALICE).encode()).decode()
        (daemon.client_config_dir / "config.json").write_text(
            json.dumps({"auths": {"https://index.docker.io/v1/": {"auth": hub_login}}})
        )
        tried = len(daemon.log_text())
        result = daemon.pull(hub_ref)
        assert result.returncode == 0, failure(result, secured)
        assert "registry-1.docker.io" not in daemon.log_text()[tried:], "dockerd fell back"
        assert_pulled(daemon, hub_ref, index, child, arch)


def test_podman_login_then_pull(
    secured: harness.RegProxy, test_images: dict[str, Image], workdir: Path
) -> None:
    image = test_images["dockerimg"]
    ref = f"{secured.host_port}/{PUBLIC}:{image.tag}"
    conf = workdir / "registries.conf"
    conf.write_text(
        "unqualified-search-registries = []\n"
        '[[registry]]\nprefix = "docker.io"\nlocation = "registry-1.docker.io"\n'
        f'[[registry.mirror]]\nlocation = "{secured.host_port}"\ninsecure = true\n'
    )
    authfile = workdir / "podman-auth.json"
    with Podman(workdir / "podman", conf) as podman:
        pull = ("pull", "--tls-verify=false", "--authfile", str(authfile), ref)
        result = podman.run(*pull)
        assert result.returncode != 0, "pulled without logging in"
        result = podman.run("pull", "--authfile", str(authfile), "docker.io/library/multiarch:1")
        assert result.returncode != 0, "pulled through the mirror without logging in"

        login = ("login", "--tls-verify=false", "--authfile", str(authfile), "-u", BOB[0])
        result = podman.run(*login, "-p", WRONG, secured.host_port)
        assert result.returncode != 0, "podman login took a wrong password"

        result = podman.run(*login, "-p", BOB[1], secured.host_port)
        assert result.returncode == 0, failure(result, secured)
        assert secured.host_port in json.loads(authfile.read_text())["auths"]
        result = podman.run(*pull)
        assert result.returncode == 0, failure(result, secured)
        assert podman.inspect(ref)["Digest"] == image.manifest_digest

        # the login is the mirror's too (Docker Hub itself is a dead port here)
        index = test_images["multiarch"]
        hub_ref = f"docker.io/{index.repository}:{index.tag}"
        result = podman.run("pull", "--authfile", str(authfile), hub_ref)
        assert result.returncode == 0, failure(result, secured)
        assert podman.inspect(hub_ref)["Digest"] == index.manifest_digest


def test_skopeo_creds(
    secured: harness.RegProxy,
    test_images: dict[str, Image],
    skopeo: harness.Skopeo,
    upstream_pull: Callable[..., Path],
    workdir: Path,
) -> None:
    image = test_images["multilayer"]
    src = f"docker://{secured.host_port}/{image.repository}:{image.tag}"
    for name, creds in [("anonymous", None), ("wrong", (ALICE[0], WRONG))]:
        result = skopeo.pull(src, workdir / name, creds=creds, check=False)
        assert result.returncode != 0, f"skopeo pulled with {name} credentials"
        assert "unauthorized" in result.stderr.lower(), result.stderr
    skopeo.pull(src, workdir / "bob", creds=BOB)
    assert_same_tree(workdir / "bob", upstream_pull(image))


def hosts_toml(
    hosts_dir: Path,
    registry: str,
    server: str,
    mirror: str | None = None,
    authorization: str | None = None,
) -> Path:
    """``HOSTS_DIR/REGISTRY/hosts.toml``: *server*, and *mirror* tried first
    (sending *authorization* with every request)."""
    text = f'server = "{server}"\n'
    if mirror:
        text += f'\n[host."{mirror}"]\n  capabilities = ["pull", "resolve"]\n'
    if mirror and authorization:
        text += f'  [host."{mirror}".header]\n    Authorization = "{authorization}"\n'
    path = hosts_dir / registry / "hosts.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return hosts_dir


def test_ctr_user(
    secured: harness.RegProxy,
    test_images: dict[str, Image],
    containerd: Containerd,
    workdir: Path,
) -> None:
    """ctr sends ``--user`` as an OAuth2 password grant (``POST /token``),
    to regproxy itself and to regproxy as a docker.io mirror."""
    direct = hosts_toml(workdir / "direct", secured.host_port, secured.url)
    mirrored = hosts_toml(
        workdir / "mirror", "docker.io", "https://registry-1.docker.io", secured.url
    )
    pulls = {
        f"{secured.host_port}/{PUBLIC}:1": (direct, test_images["dockerimg"]),
        "docker.io/library/multiarch:1": (mirrored, test_images["multiarch"]),
    }
    for ref, (hosts, image) in pulls.items():
        pull = ("images", "pull", "--hosts-dir", str(hosts))
        result = containerd.ctr(*pull, ref)
        assert result.returncode != 0, f"ctr pulled {ref} without --user"
        result = containerd.ctr(*pull, "--user", f"{ALICE[0]}:{WRONG}", ref)
        assert result.returncode != 0, f"ctr pulled {ref} with a wrong password"
        result = containerd.ctr(*pull, "--user", ":".join(ALICE), ref)
        assert result.returncode == 0, failure(result, secured)
        assert containerd.images().get(ref) == image.manifest_digest
    # the grants came as OAuth2 forms, and the mirror's requests say ?ns=docker.io
    assert secured.logged('"POST /token', "ns=docker.io")

    # a node's hosts.toml may carry a robot's static token for the mirror
    index, ref = test_images["dockerlist"], "docker.io/library/dockerlist:1"
    for name, token in [("wrong", WRONG), ("robot", ROBOT_TOKEN)]:
        hosts = hosts_toml(
            workdir / name,
            "docker.io",
            "https://registry-1.docker.io",
            secured.url,
            f"Bearer {token}",
        )
        result = containerd.pull(ref, hosts)
        assert (result.returncode == 0) == (name == "robot"), failure(result, secured)
    assert containerd.images().get(ref) == index.manifest_digest


def test_static_token(
    secured: harness.RegProxy,
    test_images: dict[str, Image],
    skopeo: harness.Skopeo,
    upstream_pull: Callable[..., Path],
    workdir: Path,
) -> None:
    image = test_images["dockerimg"]
    assert image.config is not None
    answer = manifest(secured, PUBLIC, image.tag, bearer(ROBOT_TOKEN))
    assert answer.status == 200 and answer.body == image.manifest, answer
    answer = blob(secured, PUBLIC, image.config.digest, bearer(ROBOT_TOKEN))
    assert answer.status == 200 and images.sha256_digest(answer.body) == image.config.digest
    assert_challenged(
        manifest(secured, PUBLIC, image.tag, bearer(ROBOT_TOKEN + "x")), secured, PUBLIC
    )

    src = f"docker://{secured.host_port}/{PUBLIC}:{image.tag}"
    copy = ("copy", "--quiet", "--src-tls-verify=false", "--retry-times=0")
    skopeo.run(*copy, "--src-registry-token", ROBOT_TOKEN, src, f"dir:{workdir / 'robot'}")
    assert_same_tree(workdir / "robot", upstream_pull(image))
    result = skopeo.run(
        *copy, "--src-registry-token", WRONG, src, f"dir:{workdir / 'wrong'}", check=False
    )
    assert result.returncode != 0, "skopeo pulled with a wrong token"


# ---------------------------------------------------------------------------
# a private repository
# ---------------------------------------------------------------------------


def test_private_repository_only_for_whom_the_rules_allow(
    secured: harness.RegProxy,
    test_images: dict[str, Image],
    skopeo: harness.Skopeo,
    upstream_pull: Callable[..., Path],
    workdir: Path,
) -> None:
    private = test_images["private"]
    repo = private.repository
    src = f"docker://{secured.host_port}/{repo}:{private.tag}"
    for name, creds in [("anonymous", None), ("wrong", (ALICE[0], WRONG)), ("bob", BOB)]:
        result = skopeo.pull(src, workdir / name, creds=creds, check=False)
        assert result.returncode != 0, f"skopeo pulled {repo} as {name}"
        assert not (workdir / name / "manifest.json").exists()

    # alice pulls it (so regproxy now holds it), and robot by the group ci
    skopeo.pull(src, workdir / "alice", creds=ALICE)
    assert_same_tree(workdir / "alice", upstream_pull(private))
    answer = manifest(secured, repo, private.tag, bearer(ROBOT_TOKEN))
    assert answer.status == 200 and answer.body == private.manifest, answer

    layer = private.layers[0]
    secret_bytes = {private.manifest, layout_bytes(private, layer.digest)}
    bob_token = get_token(secured, repo, BOB)
    bob_public_token = get_token(secured, PUBLIC, BOB)
    alice_public_token = get_token(secured, PUBLIC, ALICE)

    #: (what, the answer, the statuses it may have)
    probes: list[tuple[str, Answer, set[int]]] = []
    who_gets = [
        ("anonymous", None, {401}),
        ("wrong password", basic((ALICE[0], WRONG)), {401}),
        ("bob", bearer(bob_token), {403}),
        ("bob basic", basic(BOB), {403}),
    ]
    for who, headers, statuses in who_gets:
        for ref in (private.tag, private.manifest_digest):
            answer = manifest(secured, repo, ref, headers)
            probes.append((f"{who} manifest {ref}", answer, statuses))
        probes.append((f"{who} blob", blob(secured, repo, layer.digest, headers), statuses))
    # by every other way of naming the same repository of the same upstream
    for path, headers in [
        (f"/v2/docker.io/{repo}/manifests/{private.tag}", basic(BOB)),
        (f"/v2/index.docker.io/{repo}/blobs/{layer.digest}", basic(BOB)),
        (f"/v2/{repo}/manifests/{private.manifest_digest}?ns=docker.io", basic(BOB)),
        (f"/v2/{repo}/blobs/{layer.digest}", {**basic(BOB), "Host": "index.docker.io"}),
        (f"/v2/{repo}/tags/list", basic(BOB)),
        (f"/v2/{repo}/referrers/{private.manifest_digest}", basic(BOB)),
    ]:
        probes.append(
            (f"bob {path} {headers.get('Host', '')}", call(secured, path, headers=headers), {403})
        )
    # through another repository name, which does not list them: for nobody
    for who, headers in [
        ("bob", bearer(bob_public_token)),
        ("alice", bearer(alice_public_token)),
        ("robot", bearer(ROBOT_TOKEN)),
    ]:
        answer = blob(secured, PUBLIC, layer.digest, headers)
        probes.append((f"{who} blob via {PUBLIC}", answer, {403, 404}))
        answer = manifest(secured, PUBLIC, private.manifest_digest, headers)
        probes.append((f"{who} manifest via {PUBLIC}", answer, {403, 404}))
    wrong = [
        (what, answer.status, want) for what, answer, want in probes if answer.status not in want
    ]
    assert not wrong, f"(probe, got, want): {wrong}"
    leaked = [what for what, answer, _ in probes if any(s in answer.body for s in secret_bytes)]
    assert not leaked, f"private bytes came back to: {leaked}"
    codes = {what: answer.error_code() for what, answer, _ in probes}
    denied = [what for what, answer, _ in probes if answer.status == 403]
    assert denied and all(codes[what] == "DENIED" for what in denied), codes


# ---------------------------------------------------------------------------
# anonymous pulls and failed logins
# ---------------------------------------------------------------------------


def test_anonymous_pulls_where_the_rules_allow(
    open_door: harness.RegProxy,
    secured: harness.RegProxy,
    test_images: dict[str, Image],
    skopeo: harness.Skopeo,
    upstream_pull: Callable[..., Path],
    workdir: Path,
) -> None:
    image, private = test_images["dockerimg"], test_images["private"]
    skopeo.pull(f"docker://{open_door.host_port}/{PUBLIC}:{image.tag}", workdir / "public")
    assert_same_tree(workdir / "public", upstream_pull(image))

    src = f"docker://{open_door.host_port}/{private.repository}:{private.tag}"
    result = skopeo.pull(src, workdir / "private", check=False)
    assert result.returncode != 0, f"anonymous skopeo pulled {private.repository}"
    for headers in (None, bearer(get_token(open_door, private.repository))):
        answer = manifest(open_door, private.repository, private.tag, headers)
        assert_challenged(answer, open_door, private.repository)
        assert private.manifest not in answer.body
    answer = manifest(open_door, PUBLIC, image.tag, bearer(get_token(open_door, PUBLIC)))
    assert answer.status == 200 and answer.body == image.manifest, answer
    # alice's token from another regproxy is no token here
    from_elsewhere = bearer(get_token(secured, private.repository, ALICE))
    answer = manifest(open_door, private.repository, private.tag, from_elsewhere)
    assert_challenged(answer, open_door, private.repository)
    # bob is logged in, but the rule names alice only
    answer = manifest(open_door, private.repository, private.tag, basic(BOB))
    assert answer.status == 403 and answer.error_code() == "DENIED", answer
    skopeo.pull(src, workdir / "alice", creds=ALICE)
    assert_same_tree(workdir / "alice", upstream_pull(private))


def test_dockerd_mirror_for_anonymous_pulls(
    open_door: harness.RegProxy, test_images: dict[str, Image], workdir: Path
) -> None:
    """The common mirror: dockerd, no login, pulls what anonymous may pull."""
    image, private = test_images["dockerimg"], test_images["private"]
    assert image.config is not None
    with DockerDaemon(workdir / "dockerd", open_door.url) as daemon:
        ref = f"{short_name(image.repository)}:{image.tag}"
        result = daemon.pull(ref)
        assert result.returncode == 0, failure(result, open_door)
        assert not daemon.fell_back(), failure(result, open_door)
        assert daemon.image_inspect(ref)["Id"] == image.config.digest
        result = daemon.pull(f"{private.repository}:{private.tag}")
        assert result.returncode != 0, "dockerd pulled the private repository anonymously"


def test_failed_logins_are_rate_limited_per_address(open_door: harness.RegProxy) -> None:
    wrong = basic((ALICE[0], WRONG))
    for attempt in range(5):  # auth.max_failures' default
        answer = call(open_door, token_query(PUBLIC), headers=wrong, source="127.0.0.2")
        assert answer.status == 401, (attempt, answer)
    for headers in (wrong, basic(ALICE)):  # the right password is no way out either
        answer = call(open_door, token_query(PUBLIC), headers=headers, source="127.0.0.2")
        assert answer.status == 429 and answer.error_code() == "TOOMANYREQUESTS", answer
    # another address logs in as ever
    answer = call(open_door, token_query(PUBLIC), headers=basic(ALICE), source="127.0.0.3")
    assert answer.status == 200, answer


def replace_file(path: Path, text: str) -> None:
    """Write *path* as operators should: whole, by a rename."""
    tmp = path.with_name(path.name + ".new")
    tmp.write_text(text)
    tmp.rename(path)


def test_users_files_read_again_when_they_change(
    secured: harness.RegProxy,
    login_dir: Path,
    test_images: dict[str, Image],
    skopeo: harness.Skopeo,
    workdir: Path,
) -> None:
    carol = ("carol", "pw:carol-é-" + secrets.token_hex(8))  # a colon, and not ASCII
    robot2 = "robot2-" + secrets.token_hex(16)
    image = test_images["dockerimg"]
    src = f"docker://{secured.host_port}/{PUBLIC}:{image.tag}"
    htpasswd, tokens = login_dir / "htpasswd", login_dir / "tokens"
    users, robots = htpasswd.read_text(), tokens.read_text()

    def pulls(headers: dict[str, str]) -> bool:
        return manifest(secured, PUBLIC, image.tag, headers).status == 200

    assert not pulls(basic(carol)) and not pulls(bearer(robot2))
    replace_file(htpasswd, users + htpasswd_entry(*carol, "$2y$") + "\n")
    replace_file(tokens, robots + f"robot2 {robot2}\n")
    try:
        harness.wait_until(lambda: pulls(basic(carol)), 10, "carol to be let in")
        harness.wait_until(lambda: pulls(bearer(robot2)), 10, "robot2's token to be taken")
        skopeo.pull(src, workdir / "carol", creds=carol)
        carols_token = get_token(secured, PUBLIC, carol)
        assert pulls(bearer(carols_token))
    finally:
        replace_file(htpasswd, users)
        replace_file(tokens, robots)
    harness.wait_until(lambda: not pulls(basic(carol)), 10, "carol to be refused again")
    harness.wait_until(lambda: not pulls(bearer(robot2)), 10, "robot2's token to be refused")
    result = skopeo.pull(src, workdir / "carol-gone", creds=carol, check=False)
    assert result.returncode != 0, "carol pulled after her line was removed"
    # nor does a token she got before: a removed user is out at once
    assert_challenged(manifest(secured, PUBLIC, image.tag, bearer(carols_token)), secured, PUBLIC)
    assert pulls(basic(ALICE)) and pulls(bearer(ROBOT_TOKEN))


def test_secrets_never_logged(
    secured: harness.RegProxy, open_door: harness.RegProxy, test_images: dict[str, Image]
) -> None:
    """Runs last: the logs then hold every login of this module too."""
    for proxy in (secured, open_door):
        for creds in (ALICE, BOB, (ALICE[0], WRONG)):
            call(proxy, token_query(PUBLIC), headers=basic(creds))
            manifest(proxy, PUBLIC, "1", basic(creds))
        manifest(proxy, PUBLIC, "1", bearer(ROBOT_TOKEN))
    # a client that puts the password grant in the URL gets no token for it,
    # and the access log does not keep the password it put there
    grant = {"grant_type": "password", "username": BOB[0], "password": BOB[1]}
    for method in ("POST", "GET"):
        form = {"Content-Type": "application/x-www-form-urlencoded", "Content-Length": "0"}
        answer = call(secured, "/token?" + urlencode(grant), method=method, headers=form, body=b"")
        assert answer.status in (400, 401), (method, answer)
    encoded = [base64.b64encode(f"{ALICE[0]}:{p}".encode()).decode() for p in (ALICE[1], WRONG)]
    for proxy in (secured, open_door):
        text = log_through(proxy, "/v2/end-of-the-login-tests/tags/list")
        found = [s for s in (*SECRETS, *encoded) if s in text]
        assert not found, f"{proxy.log_path} holds secrets: {found}"


def log_through(proxy: harness.RegProxy, path: str) -> str:
    """regproxy's log once it has logged a request for *path* (sent now)."""
    call(proxy, path)

    def logged() -> str | None:
        text = proxy.log_text()
        return text if path in text else None

    text: str = harness.wait_until(logged, 5, f"{path} in {proxy.log_path}")
    return text
