"""The upstream registries by name, each with its client, built on first use.

Presets make ``ghcr.io`` and friends work with no configuration, so clients
are created lazily: only the registries that are really pulled from hold a
connection pool entry and a token cache.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Mapping
from typing import Any

import treq
from twisted.internet.interfaces import IReactorTime
from twisted.internet.ssl import Certificate, optionsForClientTLS, trustRootFromCertificates
from twisted.logger import Logger
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool
from twisted.web.iweb import IAgentEndpointFactory, IPolicyForHTTPS
from zope.interface import implementer

from ..config import UpstreamConfig
from ..metrics import Metrics
from ..runtime import Bounded, IReactor, thread_pool
from .auth import Authenticator
from .client import RegistryClient
from .endpoints import UpstreamEndpoints
from .public import PublicEndpoints, lookup, lookups

log = Logger()

#: clients kept for registries that are not configured (allow_any_registry)
_MAX_UNLISTED = 64

#: how the upstreams the operator configured are reached: given the
#: endpoints regproxy would connect with (TCP, TLS), the ones it does
#: (tests reach their registries in memory: ``tests/memorynet.py``)
Connect = Callable[[IAgentEndpointFactory], IAgentEndpointFactory]

_PEM = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.DOTALL)


class Upstreams:
    def __init__(
        self,
        configs: Mapping[str, UpstreamConfig],
        default: str,
        reactor: IReactor,
        pool: HTTPConnectionPool,
        allow_any: bool = False,
        metrics: Metrics | None = None,
        clock: IReactorTime | None = None,
        connect: Connect | None = None,
    ) -> None:
        """*clock* times the clients' deadlines, retries and tokens (the
        reactor if None); *connect*, see :data:`Connect`."""
        self._configs = dict(configs)
        self.default = default
        self._reactor = reactor
        self._clock: IReactorTime = reactor if clock is None else clock
        self._connect: Connect = (lambda endpoints: endpoints) if connect is None else connect
        self._pool = pool
        self._allow_any = allow_any
        self._metrics = metrics
        self._clients: dict[str, RegistryClient] = {}
        self._hosts: dict[str, str] = {}
        #: threads for looking up where configured upstreams redirect to or
        #: get their tokens from (True), and apart, the hosts clients name
        #: (False, allow_any_registry): a client chooses those, and a name
        #: whose lookup never answers holds a thread
        self._lookups: dict[bool, Bounded] = {}
        #: moves at each update: answers routed before are not used again
        self.generation = 0
        self.update(configs, default)

    @property
    def configs(self) -> Mapping[str, UpstreamConfig]:
        return self._configs

    def update(self, configs: Mapping[str, UpstreamConfig], default: str) -> None:
        """Serve from now on with these upstreams; a changed upstream gets a
        new client (requests under way finish with the old one)."""
        self.generation += 1
        self._configs = dict(configs)
        self.default = default
        self._hosts = {
            host.lower(): name
            for name, config in self._configs.items()
            for host in (name, *config.aliases)
        }
        for name, client in list(self._clients.items()):
            if self._configs.get(name) != client.config:
                del self._clients[name]

    def close(self) -> None:
        for threads in self._lookups.values():
            threads.stop()
        self._lookups.clear()

    def _lookup_threads(self, listed: bool) -> Bounded:
        threads = self._lookups.get(listed)
        if threads is None:
            name = "regproxy-lookups" if listed else "regproxy-lookups-named"
            threads = self._lookups[listed] = lookups(self._reactor, thread_pool(name, 4))
        return threads

    def default_client(self) -> RegistryClient:
        client = self.get(self.default)
        assert client is not None
        return client

    def get(self, host: str) -> RegistryClient | None:
        """The upstream a client means by *host* (a name or an alias), or None
        if regproxy does not serve that registry."""
        name = self._hosts.get(host.lower())
        if name is None:
            if not (self._allow_any and _public_host(host)):
                return None
            name = host.lower()
            config = UpstreamConfig(url=f"https://{name}")
        else:
            config = self._configs[name]
        client = self._clients.get(name)
        if client is None:
            client = self._clients[name] = self._make(name, config)
            unlisted = [n for n in self._clients if n not in self._configs]
            if len(unlisted) > _MAX_UNLISTED:
                del self._clients[unlisted[0]]  # the oldest: an open proxy stays bounded
        return client

    def canonical(self, name: str) -> str:
        """An upstream's own name for *name*, one of its aliases
        (registry-1.docker.io -> docker.io); *name* itself if unknown."""
        if name in self._configs:
            return name
        client = self.get(name)
        return client.name if client is not None else name

    def by_virtual_host(self, host_header: str) -> RegistryClient | None:
        """The upstream whose name or alias is the request's Host (port ignored)."""
        host = host_header.rsplit(":", 1)[0] if host_header.count(":") == 1 else host_header
        name = self._hosts.get(host.lower())
        return self.get(name) if name is not None else None

    def _make(self, name: str, config: UpstreamConfig) -> RegistryClient:
        policy = _tls_policy(config.ca_file) if config.ca_file else BrowserLikePolicyForHTTPS()
        lookups = self._lookup_threads(name in self._configs)
        if name in self._configs:
            direct = self._connect(UpstreamEndpoints(self._reactor, policy, config.connect_timeout))
            agent = Agent.usingEndpointFactory(self._reactor, direct, pool=self._pool)
        else:
            # Named by a client, not by the operator: public addresses only,
            # and no connection shared with the pool, which is keyed by host
            # name alone and may hold one to a configured internal registry.
            endpoints = PublicEndpoints(self._reactor, policy, config.connect_timeout, lookups)
            own = HTTPConnectionPool(self._reactor, persistent=False)
            agent = Agent.usingEndpointFactory(self._reactor, endpoints, pool=own)
        credentials = config.credentials()
        auth = Authenticator(
            config.url,
            credentials[0] if credentials else None,
            credentials[1] if credentials else None,
            http=treq.client.HTTPClient(agent),
            clock=self._clock,
            timeout=config.deadline_seconds,
        )
        anonymous = None
        if credentials and not config.share_private:
            anonymous = Authenticator(
                config.url,
                None,
                None,
                http=treq.client.HTTPClient(agent),
                clock=self._clock,
                timeout=config.deadline_seconds,
            )
        log.info("upstream {name} is {url}", name=name, url=config.url)
        return RegistryClient(
            name,
            config,
            agent,
            auth,
            self._clock,
            fallbacks=lambda: [
                client for other in config.fallbacks if (client := self.get(other)) is not None
            ],
            metrics=self._metrics,
            https_only=name not in self._configs,
            anonymous=anonymous,
            resolve=lambda host, port: lookup(
                self._reactor, lookups, host, port, config.connect_timeout
            ),
        )


def _public_host(host: str) -> bool:
    """Whether an unlisted registry host may be proxied: no IP literals, no
    localhost, no single-label names (intranet hosts)."""
    bare = host.rsplit(":", 1)[0].lower()
    try:
        ipaddress.ip_address(bare.strip("[]"))
        return False
    except ValueError:
        pass
    return "." in bare and bare != "localhost" and not bare.endswith((".localhost", ".local"))


@implementer(IPolicyForHTTPS)
class _CustomCA:
    """Verify upstream certificates against a CA bundle of the operator's."""

    def __init__(self, certificates: list[Certificate]) -> None:
        self._trust = trustRootFromCertificates(certificates)

    def creatorForNetloc(self, hostname: bytes, port: int) -> Any:
        return optionsForClientTLS(hostname.decode("ascii"), trustRoot=self._trust)


def _tls_policy(ca_file: str) -> IPolicyForHTTPS:
    with open(ca_file, "rb") as f:
        pems = _PEM.findall(f.read())
    if not pems:
        raise ValueError(f"ca_file {ca_file!r} holds no PEM certificate")
    return _CustomCA([Certificate.loadPEM(pem) for pem in pems])
