"""``regproxy-admin`` against the real admin API on a 127.0.0.1 port, over a fake backend.

The CLI is synchronous (urllib), so each run goes to a thread while the
reactor serves the API.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

import attrs
import pytest
import pytest_twisted
from fakeadmin import FakeAdmin, digest_of
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.web.pages import notFound
from twisted.web.resource import Resource
from twisted.web.server import Site
from twisted.web.util import Redirect

from registryproxy.admin.app import AdminAPI
from registryproxy.admin.backend import AdminError, FsckResult, PurgeSelector
from registryproxy.admin.cli import CliError, _next_page, main

TOKEN = "cli-token"
DIGEST = "sha256:" + "c" * 64


@attrs.frozen
class Result:
    status: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


class Server:
    def __init__(self, backend: FakeAdmin, url: str, capsys: Any) -> None:
        self.backend = backend
        self.url = url
        self._capsys = capsys

    async def run(self, *argv: str, token: str | None = TOKEN, url: str | None = None) -> Result:
        args = ["--url", url or self.url]
        if token is not None:
            args += ["--token", token]
        status = await deferToThread(main, [*args, *argv])
        out, err = self._capsys.readouterr()
        assert "Traceback" not in err
        return Result(status, out, err)


async def _listen(resource: Resource) -> Any:
    endpoint = serverFromString(reactor, "tcp:0:interface=127.0.0.1")
    return await endpoint.listen(Site(resource))


@pytest.fixture(autouse=True)
def _no_environment(monkeypatch):
    monkeypatch.delenv("REGPROXY_ADMIN_URL", raising=False)
    monkeypatch.delenv("REGPROXY_ADMIN_TOKEN", raising=False)


@pytest_twisted.async_yield_fixture()
async def server(capsys) -> AsyncIterator[Server]:
    backend = FakeAdmin()
    port = await _listen(AdminAPI(backend, TOKEN).resource())
    yield Server(backend, f"http://127.0.0.1:{port.getHost().port}", capsys)
    await port.stopListening()


# -- stats and listings -------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_stats(server):
    result = await server.run("stats")
    assert result.status == 0
    assert "hits / misses" in result.out
    assert "90 / 30 (75.0% hit ratio)" in result.out
    assert "5.0 MiB" in result.out
    assert "6 blobs, 4 manifests, 5 tags, 3 repositories" in result.out
    assert "rate limit left docker.io  95" in result.out


@pytest_twisted.ensureDeferred
async def test_json_before_or_after_the_command(server):
    for argv in (["--json", "stats"], ["stats", "--json"]):
        result = await server.run(*argv)
        assert result.status == 0
        assert result.json()["hit_ratio"] == 0.75


@pytest_twisted.ensureDeferred
async def test_ls_lists_repositories(server):
    result = await server.run("ls")
    assert result.status == 0
    lines = result.out.splitlines()
    assert lines[0].split() == [
        "UPSTREAM",
        "REPOSITORY",
        "TAGS",
        "MANIFESTS",
        "SIZE",
        "LAST",
        "USED",
    ]
    assert [line.split()[:2] for line in lines[1:]] == [
        ["docker.io", "library/alpine"],
        ["docker.io", "library/nginx"],
        ["ghcr.io", "owner/name"],
    ]
    assert "2023-11-14 22:13:30Z" in result.out
    only = await server.run("ls", "ghcr.io")
    assert [line.split()[1] for line in only.out.splitlines()[1:]] == ["owner/name"]


@pytest_twisted.ensureDeferred
async def test_ls_follows_the_pages(server):
    """2,503 repositories come in three pages of the API; ls shows them all,
    as one table or one JSON document, as it did when they came in one."""
    template = server.backend.cached[("ghcr.io", "owner/name")]
    for n in range(2500):
        repository = f"team/app{n:04}"
        server.backend.cached[("ghcr.io", repository)] = attrs.evolve(
            template, repository=repository
        )
    result = await server.run("ls")
    assert result.status == 0
    listed = [line.split()[:2] for line in result.out.splitlines()[1:]]
    assert listed == sorted([u, r] for u, r in server.backend.cached)
    assert len(listed) == 2503
    pages = [args[1] for name, args in server.backend.calls if name == "repositories"]
    assert [p.after for p in pages] == [
        None,
        ("ghcr.io", "team/app0996"),
        ("ghcr.io", "team/app1996"),
    ]
    as_json = await server.run("--json", "ls", "ghcr.io")
    assert len(as_json.json()["repositories"]) == 2501
    assert set(as_json.json()) == {"repositories"}


def test_next_pages_are_followed_on_the_same_server_only():
    url = "http://127.0.0.1:5001/api/v1/cache?n=2"
    assert _next_page(url, None) is None
    assert _next_page(url, '<https://elsewhere/x>; rel="prev"') is None
    assert (
        _next_page(url, '</api/v1/cache?n=2&last=a%2Fb>; rel="next"')
        == "http://127.0.0.1:5001/api/v1/cache?n=2&last=a%2Fb"
    )
    for elsewhere in (
        "http://evil.example/api/v1/cache",
        "//evil.example/x",
        "https://127.0.0.1:5001/",
    ):
        with pytest.raises(CliError, match="elsewhere"):
            _next_page(url, f'<{elsewhere}>; rel="next"')


@pytest_twisted.ensureDeferred
async def test_ls_shows_a_repository_named_like_docker(server):
    result = await server.run("ls", "alpine")
    assert result.status == 0
    assert server.backend.last("repository") == ("docker.io", "library/alpine")
    assert result.out.startswith("docker.io/library/alpine\n")
    assert digest_of("alpine 3.19") in result.out
    assert "oci.image.manifest.v1+json" in result.out
    assert "2/2 cached, 2.9 MiB" in result.out
    as_json = await server.run("--json", "ls", "ghcr.io/owner/name:1.0")
    assert as_json.json()["repository"] == "owner/name"


@pytest_twisted.ensureDeferred
async def test_ls_of_nothing_cached_is_a_clear_error(server):
    result = await server.run("ls", "ghcr.io/owner/missing")
    assert result.status == 1
    assert result.out == ""
    assert result.err == ("regproxy-admin: nothing of ghcr.io/owner/missing is cached (HTTP 404)\n")


# -- purge --------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize(
    "argv,selector",
    [
        (
            ["purge", "docker.io/library/alpine"],
            PurgeSelector(upstream="docker.io", repository="library/alpine"),
        ),
        (
            ["purge", "alpine:3.19"],
            PurgeSelector(upstream="docker.io", repository="library/alpine", tag="3.19"),
        ),
        (
            ["purge", "ghcr.io/owner/name:1.0"],
            PurgeSelector(upstream="ghcr.io", repository="owner/name", tag="1.0"),
        ),
        (
            ["purge", f"nginx@{DIGEST}"],
            PurgeSelector(upstream="docker.io", repository="library/nginx", digest=DIGEST),
        ),
        (
            ["purge", "localhost:5000/x", "--older-than", "1700000000"],
            PurgeSelector(upstream="localhost:5000", repository="x", older_than=1_700_000_000.0),
        ),
        (["purge", "--upstream", "ghcr.io"], PurgeSelector(upstream="ghcr.io")),
        (["purge", "--all"], PurgeSelector(everything=True)),
        (
            ["purge", "--unused-since", "2023-11-14T22:13:20Z"],
            PurgeSelector(unused_since=1_700_000_000.0),
        ),
    ],
)
async def test_purge(server, argv, selector):
    result = await server.run(*argv)
    assert result.status == 0, result.err
    assert server.backend.last("purge") == (selector,)
    assert result.out.startswith("purged ")
    assert "freed" in result.out


@pytest_twisted.ensureDeferred
async def test_purge_says_what_went(server):
    result = await server.run("purge", "ghcr.io/owner/name:1.0")
    assert result.out == (
        "purged ghcr.io/owner/name:1.0: 1 tag, 1 manifest, 2 blobs, 2.9 MiB freed\n"
    )
    as_json = await server.run("purge", "--json", "ghcr.io/owner/name")
    assert as_json.json()["manifests"] == 1


@pytest_twisted.ensureDeferred
async def test_purge_older_than_a_duration(server):
    result = await server.run("purge", "--older-than", "7d")
    assert result.status == 0
    (selector,) = server.backend.last("purge")
    assert abs(selector.older_than - (time.time() - 7 * 86400)) < 10


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize(
    "argv,words",
    [
        (["purge"], "say what to purge"),
        (["purge", "--all", "nginx"], "--all purges everything: give it alone"),
        (["purge", "--all", "--older-than", "1d"], "give it alone"),
        (["purge", "nginx", "--upstream", "docker.io"], "not both"),
        (["purge", "Nginx"], "not a repository name"),
    ],
)
async def test_purge_usage_errors(server, argv, words):
    result = await server.run(*argv)
    assert result.status == 2
    assert words in result.err
    assert not [c for c in server.backend.calls if c[0] == "purge"]


@pytest_twisted.ensureDeferred
async def test_purge_bad_time_is_the_apis_message(server):
    result = await server.run("purge", "--older-than", "last tuesday")
    assert result.status == 1
    assert "older_than: expected epoch seconds or an ISO 8601 time" in result.err
    assert result.err.rstrip().endswith("(HTTP 400)")


# -- prefetch -----------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_prefetch(server):
    result = await server.run("prefetch", "nginx", "--platform", "linux/amd64")
    assert result.status == 0, result.err
    assert server.backend.last("prefetch") == (
        "docker.io",
        "library/nginx",
        "latest",
        ("linux/amd64",),
    )
    assert result.out == "job1  queued  docker.io/library/nginx:latest (linux/amd64)\n"
    jobs = await server.run("prefetch")
    assert jobs.out == result.out
    as_json = await server.run("--json", "prefetch", f"ghcr.io/owner/name@{DIGEST}")
    assert as_json.json()["reference"] == DIGEST


@pytest_twisted.ensureDeferred
async def test_prefetch_wait(server):
    server.backend.job_state = "done"
    result = await server.run("prefetch", "--wait", "alpine", "ghcr.io/owner/name:1.0")
    assert result.status == 0
    lines = result.out.splitlines()
    assert len(lines) == 4
    assert lines[-1] == (
        "job2  done  ghcr.io/owner/name:1.0 (all platforms): 2 manifests, 3/3 blobs, "
        "2.9 MiB fetched"
    )
    server.backend.job_state = "failed"
    failed = await server.run("prefetch", "--wait", "alpine")
    assert failed.status == 1


@pytest_twisted.ensureDeferred
async def test_prefetch_checks_every_image_before_starting(server):
    result = await server.run("prefetch", "alpine", "Bad:Name")
    assert result.status == 2
    assert "not a repository name" in result.err
    assert not [c for c in server.backend.calls if c[0] == "prefetch"]
    unknown = await server.run("prefetch", "unknown.example/x")
    assert unknown.status == 1
    assert "unknown upstream 'unknown.example'" in unknown.err


# -- fsck ---------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_fsck_clean_is_exit_0(server):
    result = await server.run("fsck")
    assert result.status == 0, result.err
    assert result.out == "checked 8 blobs, 11.4 MiB: 0 quarantined, 0 indexed, 0 forgotten\n"
    assert server.backend.fscks_done == 1


@pytest_twisted.ensureDeferred
async def test_fsck_quarantined_is_exit_4_and_listed(server):
    rotten, stray = digest_of("rotten"), digest_of("stray")
    server.backend.fsck_result = FsckResult(8, 12_002_000, (rotten,), (stray,), ())
    result = await server.run("fsck")
    assert result.status == 4
    assert result.out.splitlines() == [
        "checked 8 blobs, 11.4 MiB: 1 quarantined, 1 indexed, 0 forgotten",
        "quarantined (bytes did not match the digest; moved to quarantine/, pulled again):",
        f"  {rotten}",
        "indexed (in the store but not in the index; now indexed):",
        f"  {stray}",
    ]
    as_json = await server.run("fsck", "--json")
    assert as_json.status == 4
    assert as_json.json()["quarantined"] == [rotten]
    # repairs of the index alone are no finding
    server.backend.fsck_result = FsckResult(8, 12_002_000, (), (stray,), (rotten,))
    assert (await server.run("fsck")).status == 0


@pytest_twisted.ensureDeferred
async def test_fsck_refused(server):
    server.backend.failures["fsck"] = AdminError(409, "an fsck is already running")
    result = await server.run("fsck")
    assert result.status == 1
    assert result.err == "regproxy-admin: an fsck is already running (HTTP 409)\n"


@pytest_twisted.ensureDeferred
async def test_fsck_timeout_leaves_it_running(server):
    gate: Deferred[None] = Deferred()
    server.backend.fsck_gate = gate
    result = await server.run("fsck", "--timeout", "0.3")
    assert result.status == 3
    assert "no answer from the admin API" in result.err
    assert "within 0.3 s; the fsck goes on in regproxy and logs its outcome" in result.err
    # the server notices the client gone, and does not cut the fsck short
    await deferLater(reactor, 0.2, lambda: None)
    assert not gate.called
    gate.callback(None)
    assert server.backend.fscks_done == 1


@pytest_twisted.ensureDeferred
async def test_fsck_help_says_the_exit_status(server):
    result = await server.run("fsck", "--help")
    assert result.status == 0
    assert "Exit status 4 if anything was quarantined" in " ".join(result.out.split())


# -- pins ---------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_pins_pin_unpin(server):
    listed = await server.run("pins")
    assert listed.status == 0
    assert listed.out.splitlines() == [
        "IMAGE                          SOURCE",
        "docker.io/library/alpine:3.19  config",
    ]
    pinned = await server.run("pin", "nginx:1.27", "ghcr.io/owner/name")
    assert pinned.status == 0, pinned.err
    assert pinned.out == "pinned docker.io/library/nginx:1.27\npinned ghcr.io/owner/name\n"
    again = await server.run("pin", "alpine:3.19")
    assert again.out == "pinned docker.io/library/alpine:3.19 (by the config file, cache.pinned)\n"
    as_json = await server.run("pins", "--json")
    assert [p["source"] for p in as_json.json()["pins"]] == ["config", "api", "api"]
    unpinned = await server.run("unpin", "docker.io/library/nginx:1.27")
    assert unpinned.status == 0, unpinned.err
    assert unpinned.out == "unpinned docker.io/library/nginx:1.27\n"
    assert server.backend.last("unpin") == ("docker.io/library/nginx:1.27",)
    pin_json = await server.run("--json", "pin", f"nginx@{DIGEST}")
    assert pin_json.json() == {"image": f"docker.io/library/nginx@{DIGEST}", "source": "api"}


@pytest_twisted.ensureDeferred
async def test_nothing_pinned(server):
    server.backend.config_pins = []
    result = await server.run("pins")
    assert result.out == "nothing pinned\n"


@pytest_twisted.ensureDeferred
async def test_pin_errors(server):
    bad = await server.run("pin", "alpine", "Bad:Name")
    assert bad.status == 2
    assert "not a repository name" in bad.err
    assert not [c for c in server.backend.calls if c[0] == "pin"]
    missing = await server.run("unpin", "nginx")
    assert missing.status == 1
    assert missing.err == "regproxy-admin: docker.io/library/nginx is not pinned (HTTP 404)\n"
    config = await server.run("unpin", "alpine:3.19")
    assert config.status == 1
    assert "cache.pinned" in config.err
    assert "(HTTP 409)" in config.err
    nothing = await server.run("unpin")
    assert nothing.status == 2


# -- upstreams ----------------------------------------------------------------------


def _settings(shown: str) -> dict[str, str]:
    """``upstreams show``'s "  key   value" lines as a dict."""
    return dict(line.split(None, 1) for line in shown.splitlines()[1:])


@pytest_twisted.ensureDeferred
async def test_upstreams_list_and_show(server):
    result = await server.run("upstreams")
    assert result.status == 0
    lines = result.out.splitlines()
    assert lines[0].split() == ["NAME", "URL", "FLAGS", "FALLBACKS"]
    rows = {line.split()[0]: line.split()[1:] for line in lines[1:]}
    assert rows["docker.io"] == ["https://registry-1.docker.io", "default,preset", "-"]
    assert rows["quay.io"] == ["https://quay.io", "preset", "-"]
    shown = await server.run("upstreams", "show", "ghcr.io")
    assert shown.out.startswith("ghcr.io\n")
    settings = _settings(shown.out)
    assert settings["url"] == "https://ghcr.io"
    assert settings["library_prefix"] == "no"
    assert settings["aliases"] == "-"


@pytest_twisted.ensureDeferred
async def test_upstreams_add_set_rm(server):
    added = await server.run(
        "upstreams", "add", "registry.example", "url=https://registry.example", "tag_ttl=60"
    )
    assert added.status == 0, added.err
    assert server.backend.last("set_upstream") == (
        "registry.example",
        {"url": "https://registry.example", "tag_ttl": 60},
        False,
    )
    changed = await server.run(
        "upstreams", "set", "registry.example", 'fallbacks=["docker.io"]', "tag_ttl=null"
    )
    assert changed.status == 0, changed.err
    assert server.backend.last("set_upstream") == (
        "registry.example",
        {"fallbacks": ["docker.io"], "tag_ttl": None},
        True,
    )
    assert _settings(changed.out)["fallbacks"] == "docker.io"
    removed = await server.run("upstreams", "rm", "registry.example")
    assert removed.status == 0
    assert removed.out == "removed upstream registry.example\n"


@pytest_twisted.ensureDeferred
async def test_upstreams_errors(server):
    default = await server.run("upstreams", "rm", "docker.io")
    assert default.status == 1
    assert "is the default upstream" in default.err
    typo = await server.run("upstreams", "set", "ghcr.io", "tag_tll=5")
    assert typo.status == 1
    assert "unknown field 'tag_tll'" in typo.err
    nothing = await server.run("upstreams", "set", "ghcr.io")
    assert nothing.status == 2
    pair = await server.run("upstreams", "set", "ghcr.io", "tag_ttl")
    assert pair.status == 2
    assert "expected KEY=VALUE" in pair.err


# -- reaching the API ---------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_missing_or_wrong_token(server):
    for token in (None, "wrong"):
        result = await server.run("stats", token=token)
        assert result.status == 1
        assert "missing or wrong bearer token" in result.err
        assert "REGPROXY_ADMIN_TOKEN" in result.err
        assert "(HTTP 401)" in result.err


@pytest_twisted.ensureDeferred
async def test_url_and_token_from_the_environment(server, monkeypatch):
    monkeypatch.setenv("REGPROXY_ADMIN_URL", server.url)
    monkeypatch.setenv("REGPROXY_ADMIN_TOKEN", TOKEN)
    status = await deferToThread(main, ["stats"])
    assert status == 0


@pytest_twisted.ensureDeferred
async def test_server_down_is_exit_3(server):
    port = await _listen(notFound())
    url = f"http://127.0.0.1:{port.getHost().port}"
    await port.stopListening()
    result = await server.run("stats", url=url)
    assert result.status == 3
    assert result.err.startswith(f"regproxy-admin: cannot reach the admin API at {url}: ")
    assert "REGPROXY_ADMIN_URL" in result.err


class _Page(Resource):
    isLeaf = True

    def render_GET(self, request: Any) -> bytes:
        request.setHeader(b"Content-Type", b"text/html")
        return b"<html>hello</html>"


@pytest_twisted.ensureDeferred
async def test_not_the_admin_api(server):
    for resource, words in (
        (notFound(), "unexpected answer 404 Not Found: is http://127.0.0.1:"),
        (_Page(), "did not answer JSON"),
    ):
        port = await _listen(resource)
        try:
            result = await server.run("stats", url=f"http://127.0.0.1:{port.getHost().port}")
        finally:
            await port.stopListening()
        assert result.status == 1
        assert words in result.err
        assert "admin port" in result.err


@pytest_twisted.ensureDeferred
async def test_redirects_are_not_followed(server):
    port = await _listen(Redirect(server.url.encode() + b"/api/v1/stats"))
    try:
        result = await server.run("stats", url=f"http://127.0.0.1:{port.getHost().port}")
    finally:
        await port.stopListening()
    assert result.status == 1
    assert "redirect" in result.err
    assert server.backend.calls == []


@pytest_twisted.ensureDeferred
async def test_bad_url_and_help(server):
    bad = await server.run("stats", url="ftp://x")
    assert bad.status == 2
    assert "not an http(s) URL" in bad.err
    helped = await server.run("--help")
    assert helped.status == 0
    assert "Exit status" in helped.out
    unknown = await server.run("frobnicate")
    assert unknown.status == 2
