"""``regproxy-admin``: the admin API from a shell, for people who would rather
not write curl lines.

Standard library only (urllib, argparse), and nothing of Twisted, so it
starts fast anywhere regproxy is installed.  Images are named as ``docker
pull`` takes them.  Exit status: 0 done, 1 the API refused (its message is
printed), 2 bad command line, 3 the API could not be reached or did not answer
in time, 4 ``fsck`` quarantined blobs whose bytes did not match their digest.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from typing import Any, TextIO
from urllib.parse import quote, urlencode, urljoin, urlsplit

from ..reference import is_registry_host, parse_image

PROG = "regproxy-admin"
DEFAULT_URL = "http://127.0.0.1:5001"
EXIT_REFUSED, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_QUARANTINED = 1, 2, 3, 4
_DURATION = re.compile(r"([0-9]+(?:\.[0-9]+)?)([smhdw])")
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


class CliError(Exception):
    def __init__(self, message: str, status: int = EXIT_REFUSED) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


class TimedOut(CliError):
    """The admin API took the request but did not answer in time."""


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """A redirect would carry the token to wherever it points: refuse it."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


class Client:
    """JSON over HTTP to the admin API, errors turned into :class:`CliError`."""

    def __init__(self, url: str, token: str | None, timeout: float | None = 30.0) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout
        # no proxies from the environment: the admin port is local or tunnelled
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirects())

    def waiting(self, timeout: float | None) -> Client:
        """This client, waiting *timeout* seconds for an answer (None: as long as it takes)."""
        return Client(self.url, self.token, timeout)

    def call(
        self,
        method: str,
        path: str,
        query: dict[str, str] | None = None,
        body: Any = None,
    ) -> Any:
        url = self.url + path + (f"?{urlencode(query)}" if query else "")
        return self._exchange(method, url, body)[0]

    def every(self, path: str, field: str) -> list[Any]:
        """The items under *field* of every page of a listing: *path*'s
        first page, then each page its ``Link: <...>; rel="next"`` names
        (on this server only: the token goes with each request)."""
        items: list[Any] = []
        url: str | None = self.url + path
        seen: set[str] = set()
        while url is not None:
            seen.add(url)
            page, link = self._exchange("GET", url, None)
            items += page[field]
            url = _next_page(url, link)
            if url is not None and url in seen:
                raise CliError(f"the admin API's pages of {path} go round in a circle at {url}")
        return items

    def _exchange(self, method: str, url: str, body: Any) -> tuple[Any, str | None]:
        """The answer's JSON, and its Link header."""
        headers = {"Accept": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        request = urllib.request.Request(url, data=data, method=method, headers=headers)
        try:
            with self._opener.open(request, timeout=self.timeout) as response:
                raw = response.read()
                link = response.headers.get("Link")
        except urllib.error.HTTPError as e:
            raise CliError(self._refusal(e)) from None
        except TimeoutError:
            # connected and sent, but no answer (a connect timeout is a URLError)
            raise TimedOut(
                f"no answer from the admin API at {self.url} within {self.timeout:g} s",
                EXIT_UNREACHABLE,
            ) from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", None) or e
            reason = getattr(reason, "strerror", None) or reason
            raise CliError(
                f"cannot reach the admin API at {self.url}: {reason}; is regproxy running "
                "with its admin port there? (--url or REGPROXY_ADMIN_URL)",
                EXIT_UNREACHABLE,
            ) from None
        if not raw:
            return None, link
        try:
            return json.loads(raw), link
        except ValueError:
            raise CliError(
                f"{self.url} did not answer JSON: is it regproxy's admin port?"
            ) from None

    def _refusal(self, e: urllib.error.HTTPError) -> str:
        if 300 <= e.code < 400:
            return (
                f"the admin API answered with a redirect to {e.headers.get('Location')}: "
                "give that URL with --url"
            )
        try:
            message = json.loads(e.read())["error"]["message"]
        except (ValueError, KeyError, TypeError):
            return f"unexpected answer {e.code} {e.reason}: is {self.url} regproxy's admin port?"
        return f"{message} (HTTP {e.code})"


def _next_page(url: str, link: str | None) -> str | None:
    """The URL of the page after *url*'s, from its Link header (None: the last)."""
    found = re.search(r'<([^>]*)>\s*;\s*rel="?next"?', link or "")
    if found is None:
        return None
    following = urljoin(url, found.group(1))
    if urlsplit(following)[:2] != urlsplit(url)[:2]:
        raise CliError(f"the admin API's next page is elsewhere ({following}): not followed")
    return following


# -- formatting ---------------------------------------------------------------


def size(n: int | None) -> str:
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{n} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")  # pragma: no cover


def when(t: float | None) -> str:
    if t is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(t))


def _short_type(media_type: str) -> str:
    return media_type.removeprefix("application/vnd.")


def table(out: TextIO, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    cells = [list(headers)] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for row in cells:
        out.write("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() + "\n")


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


# -- commands -----------------------------------------------------------------


def _cache_path(upstream: str, repository: str | None = None) -> str:
    path = f"/api/v1/cache/{quote(upstream, safe=':')}"
    return path + (f"/{quote(repository, safe='/')}" if repository else "")


def _image(text: str) -> Any:
    try:
        return parse_image(text)
    except ValueError as e:
        raise CliError(str(e), EXIT_USAGE) from None


def cmd_stats(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    stats = client.call("GET", "/api/v1/stats")
    if args.json:
        return _dump(stats, out)
    lines: list[tuple[str, str]] = []
    if "requests" in stats:
        lines.append(("requests", str(stats["requests"])))
    if "hits" in stats and "misses" in stats:
        ratio = stats.get("hit_ratio")
        shown = f" ({ratio:.1%} hit ratio)" if isinstance(ratio, (int, float)) else ""
        lines.append(("hits / misses", f"{stats['hits']} / {stats['misses']}{shown}"))
    for key, label in (
        ("bytes_from_cache", "from cache"),
        ("bytes_from_upstream", "from upstream"),
    ):
        if key in stats:
            lines.append((label, size(stats[key])))
    if "fetches_in_flight" in stats:
        lines.append(("fetches in flight", str(stats["fetches_in_flight"])))
    cache = stats.get("cache") or {}
    if cache:
        counts = ", ".join(
            _plural(cache[k], k.rstrip("s"))
            for k in ("blobs", "manifests", "tags", "repositories")
            if k in cache
        )
        lines.append(("cache", f"{size(cache.get('size_bytes'))} in {counts}"))
        if "free_disk_bytes" in cache:
            lines.append(("free disk", size(cache["free_disk_bytes"])))
    for upstream, kinds in sorted((stats.get("upstream_requests") or {}).items()):
        counts = ", ".join(f"{kind} {n}" for kind, n in sorted(kinds.items()))
        lines.append((f"upstream {upstream}", counts))
    errors = stats.get("errors") or {}
    if errors:
        lines.append(("errors", ", ".join(f"{s}: {n}" for s, n in sorted(errors.items()))))
    for upstream, left in sorted((stats.get("ratelimit_remaining") or {}).items()):
        lines.append((f"rate limit left {upstream}", str(left)))
    jobs = stats.get("prefetch") or []
    if jobs:
        states: dict[str, int] = {}
        for job in jobs:
            states[job.get("state", "?")] = states.get(job.get("state", "?"), 0) + 1
        lines.append(("prefetch", ", ".join(f"{n} {s}" for s, n in sorted(states.items()))))
    width = max((len(k) for k, _ in lines), default=0)
    for key, value in lines:
        out.write(f"{key.ljust(width)}  {value}\n")
    return 0


def cmd_ls(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    target = args.target
    if target is None or ("/" not in target and is_registry_host(target)):
        path = "/api/v1/cache" if target is None else _cache_path(target)
        repos = client.every(path, "repositories")
        if args.json:
            return _dump({"repositories": repos}, out)
        if not repos:
            out.write("nothing cached\n")
            return 0
        table(
            out,
            ["UPSTREAM", "REPOSITORY", "TAGS", "MANIFESTS", "SIZE", "LAST USED"],
            [
                (
                    r["upstream"],
                    r["repository"],
                    r["tags"],
                    r["manifests"],
                    size(r["size"]),
                    when(r["last_access"]),
                )
                for r in repos
            ],
        )
        return 0
    image = _image(target)
    detail = client.call("GET", _cache_path(image.upstream, image.repository))
    if args.json:
        return _dump(detail, out)
    out.write(f"{detail['upstream']}/{detail['repository']}\n\n")
    if detail["tags"]:
        table(
            out,
            ["TAG", "DIGEST", "TYPE", "CHECKED", "EXPIRES"],
            [
                (
                    t["tag"],
                    t["digest"],
                    _short_type(t["media_type"]),
                    when(t["checked_at"]),
                    when(t["expires_at"]),
                )
                for t in detail["tags"]
            ],
        )
        out.write("\n")
    table(
        out,
        ["MANIFEST", "TYPE", "SIZE", "BLOBS", "FETCHED", "LAST USED"],
        [
            (
                m["digest"],
                _short_type(m["media_type"]),
                size(m["size"]),
                _blob_summary(m),
                when(m["fetched_at"]),
                when(m["last_access"]),
            )
            for m in detail["manifests"]
        ],
    )
    return 0


def _blob_summary(manifest: dict[str, Any]) -> str:
    if manifest.get("manifests"):
        return f"index of {len(manifest['manifests'])}"
    blobs = manifest.get("blobs") or []
    cached = [b for b in blobs if b.get("cached")]
    total = sum(b.get("size") or 0 for b in cached)
    return f"{len(cached)}/{len(blobs)} cached, {size(total)}"


def _time_arg(text: str | None) -> str | None:
    """A duration ago (``7d``, ``12h``) as epoch seconds; anything else as given."""
    if text is None:
        return None
    match = _DURATION.fullmatch(text)
    if match:
        return str(int(time.time() - float(match[1]) * _SECONDS[match[2]]))
    return text


def cmd_purge(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    times = {
        name: value
        for name, value in (
            ("older_than", _time_arg(args.older_than)),
            ("unused_since", _time_arg(args.unused_since)),
        )
        if value is not None
    }
    if args.all:
        if args.image or args.upstream or times:
            raise CliError("--all purges everything: give it alone", EXIT_USAGE)
        what, path, query = "the whole cache", "/api/v1/cache", {"all": "true"}
    elif args.image:
        if args.upstream:
            raise CliError("give an IMAGE or --upstream, not both", EXIT_USAGE)
        image = _image(args.image)
        what, path, query = str(image), _cache_path(image.upstream, image.repository), dict(times)
        if image.digest is not None:
            query["digest"] = image.digest
        elif image.tag is not None:
            query["tag"] = image.tag
    elif args.upstream:
        what, path, query = args.upstream, _cache_path(args.upstream), dict(times)
    elif times:
        what, path, query = "the cache", "/api/v1/cache", dict(times)
    else:
        raise CliError(
            "say what to purge: an IMAGE, --upstream HOST, --older-than / --unused-since, or --all",
            EXIT_USAGE,
        )
    result = client.call("DELETE", path, query)
    if args.json:
        return _dump(result, out)
    out.write(
        f"purged {what}: {_plural(result['tags'], 'tag')}, "
        f"{_plural(result['manifests'], 'manifest')}, {_plural(len(result['blobs']), 'blob')}, "
        f"{size(result['bytes_freed'])} freed\n"
    )
    return 0


def _job_line(job: dict[str, Any]) -> str:
    platforms = ", ".join(job["platforms"]) if job.get("platforms") else "all platforms"
    line = (
        f"{job['id']}  {job['state']}  {job['upstream']}/{job['repository']}"
        f"{'@' if ':' in job['reference'] else ':'}{job['reference']} ({platforms})"
    )
    if job["state"] in ("running", "done", "failed"):
        line += (
            f": {_plural(job['manifests_done'], 'manifest')}, "
            f"{job['blobs_done']}/{job['blobs_total']} blobs, {size(job['bytes_fetched'])} fetched"
        )
    if job.get("error"):
        line += f": {job['error']}"
    return line


def cmd_prefetch(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    if not args.images:
        if args.platform or args.wait:
            raise CliError("--platform and --wait go with an IMAGE to prefetch", EXIT_USAGE)
        jobs = client.call("GET", "/api/v1/prefetch")
        if args.json:
            return _dump(jobs, out)
        for job in jobs["jobs"]:
            out.write(_job_line(job) + "\n")
        if not jobs["jobs"]:
            out.write("no prefetch jobs\n")
        return 0
    for text in args.images:
        _image(text)  # refuse a typo before starting anything
    started = []
    for text in args.images:
        body: dict[str, Any] = {"image": text}
        if args.platform:
            body["platforms"] = args.platform
        job = client.call("POST", "/api/v1/prefetch", body=body)
        started.append(job)
        if not args.json:
            out.write(_job_line(job) + "\n")
        elif not args.wait:
            _dump(job, out)
    if not args.wait:
        return 0
    status = 0
    for job in started:
        while job["state"] in ("queued", "running"):
            time.sleep(args.poll)
            job = client.call("GET", f"/api/v1/prefetch/{quote(job['id'], safe='')}")
        if args.json:
            _dump(job, out)
        else:
            out.write(_job_line(job) + "\n")
        if job["state"] != "done":
            status = EXIT_REFUSED
    return status


def cmd_fsck(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    try:
        result = client.waiting(args.timeout).call("POST", "/api/v1/fsck")
    except TimedOut as e:
        raise TimedOut(
            f"{e.message}; the fsck goes on in regproxy and logs its outcome", e.status
        ) from None
    status = EXIT_QUARANTINED if result["quarantined"] else 0
    if args.json:
        _dump(result, out)
        return status
    out.write(
        f"checked {_plural(result['checked'], 'blob')}, {size(result['bytes_checked'])}: "
        f"{len(result['quarantined'])} quarantined, {len(result['indexed'])} indexed, "
        f"{len(result['forgotten'])} forgotten\n"
    )
    for key, what in (
        ("quarantined", "bytes did not match the digest; moved to quarantine/, pulled again"),
        ("indexed", "in the store but not in the index; now indexed"),
        ("forgotten", "in the index but its file was gone; now forgotten"),
    ):
        if result[key]:
            out.write(f"{key} ({what}):\n")
            for digest in result[key]:
                out.write(f"  {digest}\n")
    return status


def cmd_pins(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    found = client.call("GET", "/api/v1/pins")
    if args.json:
        return _dump(found, out)
    if not found["pins"]:
        out.write("nothing pinned\n")
        return 0
    table(out, ["IMAGE", "SOURCE"], [(p["image"], p["source"]) for p in found["pins"]])
    return 0


def cmd_pin(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    for text in args.images:
        _image(text)  # refuse a typo before pinning anything
    for text in args.images:
        pin = client.call("PUT", "/api/v1/pins", body={"image": text})
        if args.json:
            _dump(pin, out)
        else:
            by = " (by the config file, cache.pinned)" if pin["source"] == "config" else ""
            out.write(f"pinned {pin['image']}{by}\n")
    return 0


def cmd_unpin(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    for text in args.images:
        _image(text)
    for text in args.images:
        client.call("DELETE", "/api/v1/pins", {"image": text})
        if not args.json:
            out.write(f"unpinned {_image(text)}\n")
    return 0


def _settings(pairs: Sequence[str]) -> dict[str, Any]:
    """``KEY=VALUE`` pairs; a VALUE that reads as JSON (60, true, null,
    ["a.io"]) is taken as such, any other as a string."""
    settings: dict[str, Any] = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq or not key:
            raise CliError(f"expected KEY=VALUE, got {pair!r}", EXIT_USAGE)
        try:
            settings[key] = json.loads(value)
        except ValueError:
            settings[key] = value
    return settings


def _upstream_path(name: str) -> str:
    return f"/api/v1/upstreams/{quote(name, safe=':')}"


def _show_upstream(name: str, shown: dict[str, Any], out: TextIO) -> None:
    out.write(f"{name}\n")
    width = max(len(k) for k in shown)
    for key, value in shown.items():
        text = "-" if value is None or value == [] else value
        if isinstance(text, list):
            text = ", ".join(map(str, text))
        elif isinstance(text, bool):
            text = "yes" if text else "no"
        out.write(f"  {key.ljust(width)}  {text}\n")


def cmd_upstreams(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    action = args.action or "list"
    if action == "list":
        found = client.call("GET", "/api/v1/upstreams")
        if args.json:
            return _dump(found, out)
        rows = []
        for name, shown in found["upstreams"].items():
            flags = [f for f in ("default", "preset") if shown.get(f)]
            fallbacks = ",".join(shown.get("fallbacks") or ()) or "-"
            rows.append((name, shown.get("url", ""), ",".join(flags) or "-", fallbacks))
        table(out, ["NAME", "URL", "FLAGS", "FALLBACKS"], rows)
        return 0
    name = args.name
    if action == "rm":
        client.call("DELETE", _upstream_path(name))
        if not args.json:
            out.write(f"removed upstream {name}\n")
        return 0
    if action == "show":
        shown = client.call("GET", _upstream_path(name))
    else:
        settings = _settings(args.settings)
        if action == "set" and not settings:
            raise CliError("say what to change: KEY=VALUE ...", EXIT_USAGE)
        method = "PUT" if action == "add" else "PATCH"
        shown = client.call(method, _upstream_path(name), body=settings)
    if args.json:
        return _dump(shown, out)
    _show_upstream(name, shown, out)
    return 0


def _dump(value: Any, out: TextIO) -> int:
    if value is not None:
        out.write(json.dumps(value, indent=2) + "\n")
    return 0


# -- command line ---------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    # also accepted after the command: regproxy-admin stats --json
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--url",
        default=argparse.SUPPRESS,
        help=f"the admin API (default: $REGPROXY_ADMIN_URL or {DEFAULT_URL})",
    )
    common.add_argument(
        "--token",
        default=argparse.SUPPRESS,
        help="bearer token (default: $REGPROXY_ADMIN_TOKEN; the variable keeps it out of ps)",
    )
    common.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS, help="print the API's JSON"
    )
    parser = argparse.ArgumentParser(
        prog=PROG,
        parents=[common],
        description="Inspect and steer a running regproxy through its admin API.",
        epilog=(
            "Images as docker pull takes them: nginx, nginx:1.27, ghcr.io/owner/name:1.0, "
            "nginx@sha256:... . Exit status: 0 done, 1 the API refused, 2 bad command "
            "line, 3 the API could not be reached or did not answer in time, 4 fsck "
            "quarantined corrupt blobs."
        ),
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, run: Callable[..., int], help: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, parents=[common], help=help, description=help)
        sub.set_defaults(run=run)
        return sub

    command("stats", cmd_stats, "requests, hits, bytes, cache size, rate limits")

    ls = command("ls", cmd_ls, "list cached repositories, or show one")
    ls.add_argument(
        "target",
        nargs="?",
        metavar="UPSTREAM|IMAGE",
        help="a registry host (docker.io) to list its repositories, or an image to show it",
    )

    purge = command("purge", cmd_purge, "remove cached images and free their blobs")
    purge.add_argument(
        "image",
        nargs="?",
        metavar="IMAGE",
        help="a repository (all its tags), IMAGE:TAG (one tag) or IMAGE@DIGEST (one manifest)",
    )
    purge.add_argument("--upstream", metavar="HOST", help="everything cached from this upstream")
    purge.add_argument("--all", action="store_true", help="the whole cache")
    for flag, what in (("--older-than", "fetched before"), ("--unused-since", "not served since")):
        purge.add_argument(
            flag,
            metavar="TIME",
            help=f"only manifests {what} TIME: a duration ago (30m, 12h, 7d, 2w), "
            "epoch seconds, or ISO 8601 (UTC if no zone)",
        )

    prefetch = command(
        "prefetch", cmd_prefetch, "warm the cache with images in the background; alone: list jobs"
    )
    prefetch.add_argument("images", nargs="*", metavar="IMAGE")
    prefetch.add_argument(
        "--platform",
        action="append",
        metavar="OS/ARCH[/VARIANT]",
        help="only this platform of a multi-platform image (repeatable; default: all)",
    )
    prefetch.add_argument("--wait", action="store_true", help="wait until the jobs end")
    prefetch.add_argument("--poll", type=float, default=1.0, help=argparse.SUPPRESS)

    fsck = command(
        "fsck",
        cmd_fsck,
        "re-hash every cached blob and quarantine those that do not match their digest",
    )
    fsck.description = (
        "Re-hash every cached blob; move those whose bytes do not match their digest to "
        "quarantine/ (with the manifests listing them: the next pull fetches them again), "
        "index files the index did not know and forget entries whose file is gone. "
        "Reads every byte, so it takes a while on a large cache; this waits for the end. "
        "Exit status 4 if anything was quarantined (with --json too), 0 if not; "
        "indexing and forgetting are repairs, not findings."
    )
    fsck.add_argument(
        "--timeout",
        type=float,
        metavar="SECONDS",
        help="stop waiting after this long (exit 3); the fsck goes on in regproxy and logs "
        "its outcome (default: wait until it ends)",
    )

    command("pins", cmd_pins, "list pinned images (eviction never removes them)")
    pin = command("pin", cmd_pin, "pin images so that eviction never removes them")
    pin.add_argument(
        "images",
        nargs="+",
        metavar="IMAGE",
        help="nginx pins the whole repository, nginx:1.27 what that tag points to (every "
        "platform), nginx@sha256:... that manifest; pinning again is not an error",
    )
    unpin = command("unpin", cmd_unpin, "unpin images pinned with pin")
    unpin.add_argument(
        "images",
        nargs="+",
        metavar="IMAGE",
        help="as pinned (images pinned in the config file, cache.pinned, are unpinned there)",
    )

    upstreams = command("upstreams", cmd_upstreams, "list, show, add, change or remove upstreams")
    actions = upstreams.add_subparsers(dest="action", metavar="ACTION")
    actions.add_parser("list", parents=[common], help="every upstream (the default)")
    for name, help in (("show", "one upstream's settings"), ("rm", "remove an upstream")):
        actions.add_parser(name, parents=[common], help=help).add_argument("name", metavar="NAME")
    for name, help in (
        ("add", "add an upstream or replace all its settings"),
        ("set", "change some settings of an upstream"),
    ):
        sub = actions.add_parser(
            name,
            parents=[common],
            help=help,
            description=(
                f"{help}. KEYs as under upstreams.NAME in regproxy.yaml (url, aliases, "
                "username, password_env, tag_ttl, fallbacks, ...; etc/regproxy.yaml lists "
                "them). A VALUE that reads as JSON is "
                "taken as such: tag_ttl=600, library_prefix=true, "
                "fallbacks='[\"docker.io\"]', tag_ttl=null (back to the default)."
            ),
        )
        sub.add_argument("name", metavar="NAME")
        sub.add_argument("settings", nargs="*", metavar="KEY=VALUE")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, or a usage error argparse printed
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    url = getattr(args, "url", None) or os.environ.get("REGPROXY_ADMIN_URL") or DEFAULT_URL
    token = getattr(args, "token", None) or os.environ.get("REGPROXY_ADMIN_TOKEN") or None
    args.json = getattr(args, "json", False)
    try:
        try:
            parts = urlsplit(url)
            valid = parts.scheme in ("http", "https") and bool(parts.hostname)
        except ValueError:
            valid = False
        if not valid:
            raise CliError(f"--url {url!r} is not an http(s) URL such as {DEFAULT_URL}", EXIT_USAGE)
        status: int = args.run(Client(url, token), args, sys.stdout)
        return status
    except CliError as e:
        print(f"{PROG}: {e.message}", file=sys.stderr)
        return e.status
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `regproxy-admin ls | head`: the reader is gone; leave quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
