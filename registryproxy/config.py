"""YAML configuration -> typed, validated :class:`Config`.

cattrs structures the YAML into the attrs classes below (with the strict hooks
of :mod:`registryproxy.structuring`), so a new key is one new attribute, and
every mistake is reported as one message that names the key
(``cache.tag_ttl: expected a number, got str 'soon'``).
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from typing import Any, TypeVar
from urllib.parse import urlsplit

import attrs
import yaml
from twisted.internet.endpoints import serverFromString

from .cluster.engineconfig import PgSettings, S3Settings
from .login.files import FileError, parse_htpasswd, parse_tokens
from .names import is_valid_registry_host
from .proxy.tls import load_context, parse_listen
from .reference import parse_image
from .structuring import (
    Hook,
    Mismatch,
    Mistake,
    StructureError,
    attrs_hook,
    describe,
    each,
    make_converter,
    structure,
)
from .upstream.rules import check_patterns


class ConfigError(Exception):
    """A configuration problem, with a message meant for the operator."""


@attrs.frozen
class AuthRule:
    """Who may pull from some repositories of some upstreams."""

    #: an upstream's name, or "*" for every upstream
    upstream: str = "*"
    #: repository patterns, as in upstreams.<name>.allow ("library/*",
    #: "myorg/**"), without tags: a rule is about whole repositories
    repositories: tuple[str, ...] = ("**",)
    #: users (from the htpasswd or tokens file) who may pull; "*": every
    #: logged-in user
    users: tuple[str, ...] = ()
    #: groups (auth.groups) whose users may pull
    groups: tuple[str, ...] = ()
    #: clients that did not log in may pull (needs auth.anonymous: true)
    anonymous: bool = False

    def __attrs_post_init__(self) -> None:
        check_patterns(self.repositories, "repositories")
        for i, pattern in enumerate(self.repositories):
            if ":" in pattern:
                raise ValueError(
                    f"repositories[{i}]: {pattern!r}: a rule names whole repositories, not tags"
                )
        if self.upstream != "*" and not is_valid_registry_host(self.upstream):
            raise ValueError(
                f'upstream: expected an upstream\'s name or "*", got {self.upstream!r}'
            )


@attrs.frozen
class AuthConfig:
    """Client authentication on the /v2/ port (registryproxy.login)."""

    #: an htpasswd file of bcrypt entries (as ``htpasswd -B`` writes them),
    #: read again when it changes
    htpasswd: str | None = None
    #: a file of static bearer tokens for robots, a line "NAME TOKEN" each:
    #: NAME is a user for the rules; read again when it changes
    tokens: str | None = None
    #: clients that did not log in may pull where the rules allow (with no
    #: rule for a repository: everywhere)
    anonymous: bool = False
    #: group name -> its users, for the rules
    groups: Mapping[str, tuple[str, ...]] = attrs.field(factory=dict)
    #: who may pull what: the first rule whose upstream and one of whose
    #: repositories match decides.  No rule matches: every logged-in user
    #: may pull it (a private upstream repository: only users a rule names),
    #: anonymous clients if auth.anonymous
    rules: tuple[AuthRule, ...] = ()
    #: seconds a token from the token endpoint (/token) is good for
    token_ttl: float = 300.0
    #: the token endpoint's URL as clients reach it; None: the scheme and
    #: Host of each request, and /token (set it behind a TLS-terminating
    #: load balancer)
    realm: str | None = None
    #: the service name in challenges and tokens
    service: str = "regproxy"
    #: failed logins a client address may make within failure_window
    #: seconds; past them, its logins answer 429 until the window passes
    max_failures: int = 5
    failure_window: float = 60.0

    def __attrs_post_init__(self) -> None:
        if self.htpasswd is None and self.tokens is None:
            raise ValueError("give htpasswd or tokens (or both): users to log in as")
        for key, parse in (("htpasswd", parse_htpasswd), ("tokens", parse_tokens)):
            path = getattr(self, key)
            if path is None:
                continue
            try:
                with open(path, encoding="utf-8") as f:
                    parse(f.read(), path)
            except OSError as e:
                raise ValueError(f"{key}: cannot read {path!r}: {e.strerror}") from None
            except UnicodeDecodeError:
                raise ValueError(f"{key}: {path!r} is not UTF-8 text") from None
            except FileError as e:
                raise ValueError(f"{key}: {e}") from None
        _positive(self, "max_failures", "failure_window")
        if self.token_ttl < 60:
            # docker takes any token to be good for 60 s at least
            raise ValueError(
                f"token_ttl: expected seconds >= 60 (clients reuse a token for a minute), "
                f"got {self.token_ttl:g}"
            )
        if self.realm is not None and urlsplit(self.realm).scheme not in ("http", "https"):
            raise ValueError(
                f"realm: expected the token endpoint's http(s) URL, got {self.realm!r}"
            )
        if not re.fullmatch(r"[\x21-\x7e]{1,200}", self.service) or '"' in self.service:
            raise ValueError(
                f"service: expected a short name without spaces or quotes, got {self.service!r}"
            )
        for i, rule in enumerate(self.rules):
            for group in rule.groups:
                if group not in self.groups:
                    raise ValueError(f"rules[{i}].groups: {group!r} is not one of auth.groups")
            if rule.anonymous and not self.anonymous:
                raise ValueError(
                    f"rules[{i}].anonymous: anonymous pulls are off (auth.anonymous: false)"
                )


@attrs.frozen
class ProxyConfig:
    #: twisted endpoint string for the /v2/ registry API; TLS:
    #: "ssl:PORT:privateKey=KEY:certKey=CERT[:extraCertChain=CHAIN]"
    listen: str = "tcp:5000"
    #: client authentication; None: anyone who reaches the port may pull
    auth: AuthConfig | None = None
    #: with an ssl: listen, a CA file: clients must show a certificate it signed
    client_ca: str | None = None
    #: send cached blobs with the kernel's sendfile over plain TCP (zero copy)
    sendfile: bool = True
    #: most client connections at once; more are closed at once (lowered at
    #: start-up to what the open-file limit holds)
    max_connections: int = 1024
    #: seconds a client has to send a whole request, from its first byte
    header_timeout: float = 10.0
    #: seconds a connection may sit idle between requests
    idle_timeout: float = 60.0
    #: seconds a response waits for a client that takes in none of it
    send_timeout: float = 30.0
    #: where a line per request goes: "twistd" (its log), "off", or a file
    #: (written buffered, flushed every second: cheaper on a busy mirror)
    access_log: str = "twistd"
    #: seconds a requested stop (SIGTERM) lets the downloads, prefetches and
    #: responses in flight finish, the ports closed, before aborting the rest
    shutdown_grace: float = 30.0

    def __attrs_post_init__(self) -> None:
        _positive(self, "max_connections", "header_timeout", "idle_timeout", "send_timeout")
        if not self.access_log:
            raise ValueError('access_log: expected "twistd", "off" or a file name')
        if self.shutdown_grace < 0:
            raise ValueError(f"shutdown_grace: expected seconds >= 0, got {self.shutdown_grace!r}")
        tls = parse_listen(self.listen)
        if tls is not None:
            load_context(tls, self.client_ca)  # readable, the key matches the certificate
        elif self.client_ca is not None:
            raise ValueError(
                "client_ca: clients show certificates only over TLS: listen on "
                "'ssl:PORT:privateKey=KEY:certKey=CERT', or remove client_ca"
            )


def _positive(config: Any, *names: str) -> None:
    for name in names:
        if getattr(config, name) <= 0:
            raise ValueError(f"{name}: expected a number > 0, got {getattr(config, name)!r}")


_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}


def parse_size(size: int | str, key: str = "max_size") -> int:
    """Bytes from ``1000``, ``"250MB"``, ``"1.5 GiB"`` (SI units are powers of 1000)."""
    if isinstance(size, int):
        if size < 0:
            raise ValueError(f"{key}: expected bytes >= 0, got {size!r}")
        return size
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", size)
    if match is None or match.group(2).lower() not in _UNITS:
        raise ValueError(f"{key}: expected bytes or a size like 250MB or 50GiB, got {size!r}")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


@attrs.frozen
class StorageConfig:
    """Where the blobs live: under cache.directory, or (a cluster) in S3."""

    #: an S3 bucket shared by the nodes of a cluster; None: the filesystem
    s3: S3Settings | None = None
    #: with s3: the bounded local disk tier under cache.directory (bytes, or
    #: a size like "10GiB"); ignored without s3
    local_max_size: int | str = "10GiB"
    #: with s3: answer a blob GET the node has no local copy of with a
    #: redirect to a presigned bucket URL (clients must reach the bucket)
    redirect: bool = False

    def __attrs_post_init__(self) -> None:
        parse_size(self.local_max_size, "local_max_size")
        if self.redirect and self.s3 is None:
            raise ValueError("redirect: redirects go to presigned S3 URLs: it needs s3")

    @property
    def local_max_bytes(self) -> int:
        return parse_size(self.local_max_size, "local_max_size")


@attrs.frozen
class IndexConfig:
    """Where the index lives: SQLite under cache.directory, or (a cluster) PostgreSQL."""

    #: a PostgreSQL database shared by the nodes of a cluster; None: SQLite
    postgresql: PgSettings | None = None


@attrs.frozen
class CacheConfig:
    #: where blobs and the index live (a cluster node: its spool and local
    #: tier); created if missing
    directory: str = "regproxy-cache"
    #: seconds a tag -> digest answer is trusted before an upstream HEAD
    tag_ttl: float = 3600.0
    #: how long past its TTL a tag may still be served (X-Cache: STALE) while
    #: its upstream is down, failing or rate-limiting; None: without limit
    max_stale: float | None = None
    #: disk budget: bytes, or a size with a unit ("250MB", "50GiB"); None: no limit
    max_size: int | str | None = None
    #: when the store grows past max_size, evict down to this fraction of it
    low_water: float = 0.9
    #: seconds an image may go unused before the periodic sweep removes it; None: never
    max_idle: float | None = None
    #: images never evicted: "docker.io/library/alpine:3.19", "ghcr.io/owner/app",
    #: "nginx@sha256:..." (a repository pins all of it, a tag what it points to)
    pinned: tuple[str, ...] = ()
    #: seconds after its last check that a stored blob is hashed again
    #: before it is served (it is on its first read after a restart too);
    #: None: only after a restart
    verify_after: float | None = 604800.0
    #: bytes a second the background scrub reads to re-hash the whole store
    #: (a size like "20MiB"; a file under 256 KiB counts as 256 KiB); 0: no scrub
    scrub_rate: int | str = "20MiB"
    storage: StorageConfig = StorageConfig()
    index: IndexConfig = IndexConfig()

    def __attrs_post_init__(self) -> None:
        if self.max_size is not None:
            parse_size(self.max_size, "max_size")
        parse_size(self.scrub_rate, "scrub_rate")
        if self.verify_after is not None and self.verify_after < 0:
            raise ValueError(f"verify_after: expected seconds >= 0, got {self.verify_after!r}")
        if not 0 < self.low_water <= 1:
            raise ValueError(f"low_water: expected a fraction in (0, 1], got {self.low_water!r}")
        for pin in self.pinned:
            try:
                parse_image(pin)
            except ValueError as e:
                raise ValueError(f"pinned: {e}") from None

    @property
    def max_bytes(self) -> int | None:
        return None if self.max_size is None else parse_size(self.max_size, "max_size")

    @property
    def scrub_bytes(self) -> int:
        return parse_size(self.scrub_rate, "scrub_rate")


@attrs.frozen
class UpstreamConfig:
    #: base URL of the registry, e.g. https://registry-1.docker.io; plain
    #: http only when written so
    url: str
    #: more names for this registry: a request whose Host header is one of
    #: them (or the registry's own name) goes here
    aliases: tuple[str, ...] = ()
    username: str | None = None
    #: the password (or token), inline, from an environment variable, or
    #: from a file; never logged or echoed
    password: str | None = attrs.field(default=None, repr=False)
    password_env: str | None = None
    password_file: str | None = None
    #: PEM bundle of the CAs to trust for this registry, instead of the system's
    ca_file: str | None = None
    #: seconds a tag is trusted; None: cache.tag_ttl
    tag_ttl: float | None = None
    #: seconds to wait for a TCP (and TLS) connection
    connect_timeout: float = 10.0
    #: seconds to wait for response headers, and the longest silence mid-body
    read_timeout: float = 60.0
    #: seconds one exchange with the upstream may take in all: its token, its
    #: redirects, retries of failed connections, and for a manifest, tag list
    #: or referrers the whole body (a blob's body has read_timeout alone);
    #: past it the client gets 504.  None: read_timeout
    deadline: float | None = None
    #: bytes/s a blob download must average over each read_timeout seconds,
    #: or it is abandoned (its clients' connections aborted, nothing kept):
    #: an upstream trickling a byte now and then holds nobody for ever.
    #: None: no minimum (read_timeout's silence alone ends a download)
    min_rate: int | None = 10240
    #: failures in a row (no connection, no answer, 5xx) that open the circuit
    #: breaker: requests then fail at once (and stale content is served) for
    #: breaker_cooldown seconds before one request tries again; 0: never
    breaker_threshold: int = 5
    breaker_cooldown: float = 30.0
    #: other upstreams (by name) to try in order when this one is down or rate-limited
    fallbacks: tuple[str, ...] = ()
    #: Docker Hub's rule that a one-part name is an official image: nginx -> library/nginx
    library_prefix: bool = False
    #: serve what regproxy pulls with its credentials to every client, also
    #: repositories the upstream serves to nobody without credentials
    share_private: bool = False
    #: the repositories served, as patterns REPOSITORY[:TAG] ("library/*",
    #: "myorg/**", "*/app:1.*"; see registryproxy.upstream.rules); anything
    #: else answers 403 DENIED.  None: every repository; []: none
    allow: tuple[str, ...] | None = None
    #: repositories (and tags) refused with 403 DENIED, cached or not; wins
    #: over allow
    deny: tuple[str, ...] = ()
    #: bytes (or a size like "2GiB"): a larger blob is refused with 403
    #: DENIED before its download starts, and so is a manifest listing one;
    #: None: no limit
    max_blob_size: int | str | None = None

    def __attrs_post_init__(self) -> None:
        parts = urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"url: expected http(s)://host[:port], got {self.url!r}")
        if parts.username or parts.password:
            raise ValueError("url: give credentials as username and a password, not in the URL")
        if parts.path.rstrip("/").endswith("/v2") or parts.query or parts.fragment:
            raise ValueError(f"url: give the registry's base URL, without /v2/, not {self.url!r}")
        sources = [self.password, self.password_env, self.password_file]
        if sum(s is not None for s in sources) > 1:
            raise ValueError("give only one of password, password_env, password_file")
        if (self.username is None) != all(s is None for s in sources):
            raise ValueError("username and a password go together: give both or neither")
        if self.password_env is not None and self.password_env not in os.environ:
            raise ValueError(f"password_env: environment variable {self.password_env} is not set")
        for name, path in (("password_file", self.password_file), ("ca_file", self.ca_file)):
            if path is not None and not os.access(path, os.R_OK):
                raise ValueError(f"{name}: cannot read {path!r}")
        if self.ca_file is not None:
            with open(self.ca_file, "rb") as f:
                if b"-----BEGIN CERTIFICATE-----" not in f.read():
                    raise ValueError(f"ca_file: {self.ca_file!r} holds no PEM certificate")
        if self.deadline is not None and not self.deadline > 0:
            raise ValueError(
                f"deadline: expected a positive number of seconds, not {self.deadline!r}"
            )
        if self.min_rate is not None and not self.min_rate > 0:
            raise ValueError(
                f"min_rate: expected bytes per second > 0 (or null for none), not {self.min_rate!r}"
            )
        for alias in self.aliases:
            if not is_valid_registry_host(alias):
                raise ValueError(f"aliases: {alias!r} is not a host name")
        check_patterns(self.allow, "allow")
        check_patterns(self.deny, "deny")
        if self.max_blob_size is not None:
            parse_size(self.max_blob_size, "max_blob_size")

    @property
    def max_blob_bytes(self) -> int | None:
        return (
            None if self.max_blob_size is None else parse_size(self.max_blob_size, "max_blob_size")
        )

    @property
    def deadline_seconds(self) -> float:
        return self.read_timeout if self.deadline is None else self.deadline

    def credentials(self) -> tuple[str, str] | None:
        """(username, password), read now from wherever the config says."""
        if self.username is None:
            return None
        if self.password_env is not None:
            return self.username, os.environ[self.password_env]
        if self.password_file is not None:
            with open(self.password_file, encoding="utf-8") as f:
                return self.username, f.read().strip()
        assert self.password is not None
        return self.username, self.password


#: Registries that work with no configuration.  A config entry of the same
#: name changes only the keys it gives.
PRESETS: Mapping[str, UpstreamConfig] = {
    "docker.io": UpstreamConfig(
        url="https://registry-1.docker.io",
        aliases=("registry-1.docker.io", "index.docker.io"),
        library_prefix=True,
    ),
    "ghcr.io": UpstreamConfig(url="https://ghcr.io"),
    "gcr.io": UpstreamConfig(url="https://gcr.io"),
    "quay.io": UpstreamConfig(url="https://quay.io"),
    "registry.k8s.io": UpstreamConfig(url="https://registry.k8s.io"),
    "public.ecr.aws": UpstreamConfig(url="https://public.ecr.aws"),
    "mcr.microsoft.com": UpstreamConfig(url="https://mcr.microsoft.com"),
}


@attrs.frozen
class AdminConfig:
    #: twisted endpoint string for the admin API
    listen: str = "tcp:5001:interface=127.0.0.1"
    #: bearer token for every admin route but /healthz, inline or from a
    #: file; REGPROXY_ADMIN_TOKEN in the environment also works
    token: str | None = attrs.field(default=None, repr=False)
    token_file: str | None = None
    #: most connections at once, apart from the proxy's
    max_connections: int = 64
    #: bytes: a larger request body is refused before it is read
    max_body: int = 64 * 1024

    def __attrs_post_init__(self) -> None:
        _positive(self, "max_connections", "max_body")
        if self.token is not None and self.token_file is not None:
            raise ValueError("give token or token_file, not both")
        if self.token_file is not None and not os.access(self.token_file, os.R_OK):
            raise ValueError(f"token_file: cannot read {self.token_file!r}")
        if self.secret() is None and not loopback_only(self.listen):
            raise ValueError(
                f"listen: {self.listen!r} is reachable from other machines, so the admin "
                "API needs a token: set admin.token or admin.token_file (or "
                "REGPROXY_ADMIN_TOKEN), or listen on 127.0.0.1"
            )

    def secret(self) -> str | None:
        """The token, read now from wherever it is configured."""
        if self.token_file is not None:
            with open(self.token_file, encoding="utf-8") as f:
                return f.read().strip() or None
        return self.token or os.environ.get("REGPROXY_ADMIN_TOKEN") or None


def loopback_only(endpoint: str) -> bool:
    """Whether a server endpoint string listens only where this machine can reach it."""
    kind, *parts = (p.replace("\\:", ":") for p in re.split(r"(?<!\\):", endpoint))
    if kind == "unix":
        return True
    if kind not in ("tcp", "tcp6"):
        return False
    params = dict(part.split("=", 1) for part in parts if "=" in part)
    interface = params.get("interface", "")
    try:
        return ipaddress.ip_address(interface).is_loopback
    except ValueError:
        return interface == "localhost"


_NODE_NAME = re.compile(r"[A-Za-z0-9._-]{1,63}")


@attrs.frozen
class ClusterConfig:
    """This node's place in a cluster: nodes sharing cache.storage.s3 and
    cache.index.postgresql, each fetching a blob for all of them."""

    #: this node's name, unique in the cluster
    node: str
    #: Twisted endpoint string of the internal port the other nodes use
    listen: str
    #: the URL the other nodes reach that port at
    advertise: str
    #: seconds between this node's heartbeats
    heartbeat: float = 2.0
    #: seconds without a heartbeat after which a node is taken for gone
    node_timeout: float = 10.0
    #: seconds a request to another node may wait for its answer
    peer_timeout: float = 10.0
    #: what the nodes show each other on their internal ports; None: one
    #: made once and kept in the database
    secret: str | None = attrs.field(default=None, repr=False)

    def __attrs_post_init__(self) -> None:
        if not _NODE_NAME.fullmatch(self.node):
            raise ValueError(
                f"node: expected 1 to 63 letters, digits, '.', '_' or '-', got {self.node!r}"
            )
        try:
            serverFromString(None, self.listen)
        except (ValueError, KeyError, TypeError, OSError) as e:
            raise ValueError(f"listen: {self.listen!r} is not an endpoint: {e}") from None
        parts = urlsplit(self.advertise)
        try:
            parts.port  # noqa: B018 (a port that is no number raises)
        except ValueError:
            parts = urlsplit("")
        if (
            parts.scheme not in ("http", "https")
            or not parts.hostname
            or parts.username
            or parts.password
            or parts.path.strip("/")
            or parts.query
            or parts.fragment
        ):
            raise ValueError(
                f"advertise: expected the URL other nodes reach cluster.listen at, "
                f"like http://10.0.0.5:5002, got {self.advertise!r}"
            )
        try:
            unspecified = ipaddress.ip_address(parts.hostname).is_unspecified
        except ValueError:
            unspecified = False  # a host name
        if unspecified:
            raise ValueError(
                f"advertise: {parts.hostname} is no address to reach: give this node's own"
            )
        _positive(self, "heartbeat", "peer_timeout")
        if self.node_timeout <= self.heartbeat:
            raise ValueError(
                f"node_timeout: expected more seconds than heartbeat ({self.heartbeat:g}), "
                f"got {self.node_timeout:g}"
            )
        if self.secret == "":
            raise ValueError("secret: is empty")


@attrs.frozen
class Config:
    proxy: ProxyConfig = ProxyConfig()
    admin: AdminConfig = AdminConfig()
    cache: CacheConfig = CacheConfig()
    #: the presets, plus (or changed by) the entries of the config file
    upstreams: Mapping[str, UpstreamConfig] = attrs.field(
        factory=dict, converter=lambda given: {**PRESETS, **given}
    )
    default_upstream: str = "docker.io"
    #: let clients name any registry host (path prefix or ns=), not only the
    #: configured ones and the presets: an open proxy, off by default
    allow_any_registry: bool = False
    #: this node's place in a cluster; None: a single node
    cluster: ClusterConfig | None = None

    def __attrs_post_init__(self) -> None:
        self._check_cluster()
        if self.default_upstream not in self.upstreams:
            raise ValueError(
                f"default_upstream: {self.default_upstream!r} is not one of the "
                f"upstreams ({', '.join(sorted(self.upstreams))})"
            )
        owner: dict[str, str] = {}
        for name, upstream in self.upstreams.items():
            for fallback in upstream.fallbacks:
                if fallback == name or fallback not in self.upstreams:
                    raise ValueError(
                        f"upstreams.{name}.fallbacks: {fallback!r} is not another upstream"
                    )
            for host in (name, *upstream.aliases):
                if owner.setdefault(host, name) != name:
                    raise ValueError(
                        f"upstreams.{name}.aliases: {host!r} already names {owner[host]}"
                    )

    def _check_cluster(self) -> None:
        shared = {
            "cache.storage.s3": self.cache.storage.s3,
            "cache.index.postgresql": self.cache.index.postgresql,
        }
        if self.cluster is None:
            if any(v is not None for v in shared.values()):
                raise ValueError(
                    "cache.storage.s3 and cache.index.postgresql are for a cluster: "
                    "add a cluster section (node, listen, advertise)"
                )
            return
        missing = [key for key, value in shared.items() if value is None]
        if missing:
            raise ValueError(
                "cluster: the nodes of a cluster share cache.storage.s3 (the blobs) and "
                f"cache.index.postgresql (the index): add {' and '.join(missing)}"
            )
        for key in ("proxy", "admin"):
            if getattr(self, key).listen == self.cluster.listen:
                raise ValueError(f"cluster.listen: {key}.listen is the same endpoint")


T = TypeVar("T")


def load_config(path: str | None) -> Config:
    """Read and validate the YAML file at *path*; ``None`` gives the defaults."""
    if path is None:
        return Config()
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError(f"cannot read config file {path!r}: {e.strerror}") from None
    return parse_config(text, source=path)


class _StrictLoader(yaml.SafeLoader):
    """A SafeLoader that refuses a key given twice instead of keeping the last."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)  # type: ignore[no-untyped-call]
            if key in seen:
                mark = key_node.start_mark
                raise ConfigError(f"line {mark.line + 1}: key {key!r} is given twice")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def parse_config(text: str, source: str = "<config>") -> Config:
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 (a SafeLoader)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError(f"{source}: not valid YAML{where}: {problem}") from None
    if data is None:
        data = {}
    try:
        return _structure(data, Config, "")
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def upstream_from_settings(
    name: str, settings: Any, base: UpstreamConfig | None = None
) -> UpstreamConfig:
    """One upstream from YAML-shaped settings, validated like the file; keys
    not given come from *base* (or the preset of that name)."""
    if not is_valid_registry_host(name):
        raise ConfigError(f"{name!r} is not a registry host name (host or host:port)")
    merged = _with_preset(name, settings, base or PRESETS.get(name))
    return _structure(merged, UpstreamConfig, f"upstreams.{name}")


def settings_of(upstream: UpstreamConfig, redact: bool = True) -> dict[str, Any]:
    """An upstream as YAML-shaped settings; the inline password shown as
    ``"<set>"`` unless *redact* is false (for persisting)."""
    settings = {
        key: list(value) if isinstance(value, tuple) else value
        for key, value in attrs.asdict(upstream).items()
    }
    if redact and settings["password"] is not None:
        settings["password"] = "<set>"
    return settings


#: secrets that the file gives inline (``secret_key``), as an environment
#: variable's name (``secret_key_env``) or as a file's path
#: (``secret_key_file``): read once, at loading, into the field
_SECRET_SOURCES: Mapping[type, str] = {
    S3Settings: "secret_key",
    PgSettings: "dsn",
    ClusterConfig: "secret",
}
_SECRET_FORMS = {cls: (f"{field}_env", f"{field}_file") for cls, field in _SECRET_SOURCES.items()}


def _resolve_secret(cls: type, data: dict[Any, Any]) -> dict[Any, Any]:
    """*data* with its secret's ``_env`` or ``_file`` form replaced by the secret."""
    field = _SECRET_SOURCES[cls]
    forms = (field, *_SECRET_FORMS[cls])
    given = [form for form in forms if form in data]
    if len(given) > 1:
        raise Mistake(f"give only one of {', '.join(forms)}")
    if not given and attrs.fields_dict(cls)[field].default is attrs.NOTHING:
        raise Mistake(f"give one of {', '.join(forms)}")
    if not given or given[0] == field:
        return data
    form = given[0]
    source = data[form]
    if not isinstance(source, str):
        raise Mistake(f"expected a string, got {describe(source)}", form)
    if form.endswith("_env"):
        if source not in os.environ:
            raise Mistake(f"environment variable {source} is not set", form)
        secret = os.environ[source]
    else:
        try:
            with open(source, encoding="utf-8") as f:
                secret = f.read().strip()
        except OSError as e:
            raise Mistake(f"cannot read {source!r}: {e.strerror}", form) from None
        except UnicodeDecodeError:
            raise Mistake(f"{source!r} is not UTF-8 text", form) from None
    if not secret:
        raise Mistake(f"{source!r} is empty", form)
    rest = {name: value for name, value in data.items() if name != form}
    return {**rest, field: secret}


def _with_secret(cls: type) -> Hook:
    structure = attrs_hook(_converter, cls, _SECRET_FORMS[cls])

    def resolved(data: Any, _: Any) -> Any:
        return structure(_resolve_secret(cls, data) if isinstance(data, dict) else data, cls)

    return resolved


def _with_preset(name: str, settings: Any, base: UpstreamConfig | None) -> Any:
    """A preset's (or *base*'s) settings changed by the keys *settings* gives."""
    if base is None or not isinstance(settings, dict):
        return settings
    return {**settings_of(base, redact=False), **settings}


def _upstreams(data: Any, _: Any) -> dict[str, UpstreamConfig]:
    if not isinstance(data, dict):
        raise Mismatch("a mapping", describe(data))
    for name in data:
        if not isinstance(name, str) or not is_valid_registry_host(name):
            raise Mistake(f"{name!r} is not a registry host name (host or host:port)")
    merged = {name: _with_preset(name, item, PRESETS.get(name)) for name, item in data.items()}
    upstreams = each(merged, lambda item: _converter.structure(item, UpstreamConfig), dict)
    return dict(zip(merged, upstreams, strict=True))


def _groups(data: Any, _: Any) -> dict[str, tuple[str, ...]]:
    if not isinstance(data, dict):
        raise Mismatch("a mapping", describe(data))
    for name in data:
        if not isinstance(name, str) or not re.fullmatch(r"[\w.@-]{1,128}", name):
            raise Mistake(f"{name!r} is not a name (letters, digits, _ . @ -)")
    users = each(data, lambda item: _converter.structure(item, tuple[str, ...]), dict)
    return dict(zip(data, users, strict=True))


_converter = make_converter()
for _cls in _SECRET_SOURCES:
    _converter.register_structure_hook(_cls, _with_secret(_cls))
_converter.register_structure_hook_func(lambda t: t == Mapping[str, UpstreamConfig], _upstreams)
_converter.register_structure_hook_func(lambda t: t == Mapping[str, tuple[str, ...]], _groups)


def _structure(data: Any, cls: type[T], path: str) -> T:
    try:
        return structure(_converter, data, cls, path)
    except StructureError as e:
        raise ConfigError(str(e)) from None
