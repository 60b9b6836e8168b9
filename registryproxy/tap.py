"""``twistd regproxy``: options, and the services that make up the proxy."""

from __future__ import annotations

import gc
import os
import signal
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, cast

import attrs
from twisted.application.internet import StreamServerEndpointService, TimerService
from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python import usage
from twisted.web.client import HTTPConnectionPool

from .admin.app import AdminAPI
from .admin.control import Control, build_control
from .admin.settings import SavedUpstreams
from .cache.access import IndexAccess, LocalIndex
from .cache.background import IndexThread
from .cache.blobs import BlobCache, PeerSource
from .cache.eviction import Evictor
from .cache.index import Index, IndexUnavailable, IndexUnusable, set_aside
from .cache.keep import Keep
from .cache.manifests import ManifestCache
from .cache.scrub import Scrubber, Verifier
from .cache.shared import LocalTier, SharedDeletion
from .cache.store import FileStore
from .cluster.peers import PeersOnly
from .config import Config, ConfigError, load_config
from .login.gate import Gate, make_gate
from .login.tokens import cluster_key, node_key
from .metrics import Metrics
from .proxy.bodies import login_bodies, no_bodies
from .proxy.connections import GuardedSite, Limits, fitting_connections, open_files_limit
from .proxy.plaintext import PlainHTTPFactory
from .proxy.resource import RegistryResource
from .proxy.tls import ServerCertificate, TLSError, TLSFactory, parse_listen
from .runtime import STOP_SECONDS, IReactor, Threads, thread_pool, within
from .upstream.registry import Connect, Upstreams
from .watchdog import MARGIN_SECONDS, Watchdog

if TYPE_CHECKING:
    from .cluster.node import Engines

log = Logger()
_FLUSH_SECONDS = 10.0
#: how often a shutdown looks whether what it waits for is done
_DRAIN_POLL_SECONDS = 0.05
#: how long a shutdown waits, after aborting the rest, for downloads whose
#: bytes are all in to be published
_PUBLISH_SECONDS = 10.0


def _logged(task: Callable[[], object]) -> Callable[[], None]:
    """A periodic task whose failure is logged, not the end of its timer."""

    def run() -> None:
        try:
            task()
        except Exception:
            log.failure("periodic {task} failed", task=getattr(task, "__qualname__", task))

    return run


_SWEEP_SECONDS = 60.0
#: how often a cluster node looks for multipart uploads a dead node left
_STALE_UPLOADS_SECONDS = 3600.0
#: the index's WAL is copied into the database (the fsync) this often, in
#: the index's worker thread, never by a commit on the reactor thread
_CHECKPOINT_SECONDS = 2.0


class _Periodic(TimerService):
    """A periodic task whose stop waits for a run under way at most
    STOP_SECONDS: a sweep or a refresh on a database that never answers
    does not hold the process's exit."""

    def __init__(
        self, clock: IReactorTime, step: float, call: Callable[[], object], what: str
    ) -> None:
        """*what* the task does, for the log."""
        super().__init__(step, call)
        self.clock = self._clock = clock
        self._what = what

    def stopService(self) -> Deferred[None]:
        """Stopped at once (a start after it starts afresh, whenever the run
        under way ends); the Deferred: once that run ends, STOP_SECONDS at most."""
        if self._loop.running:
            self._loop.stop()
        Service.stopService(self)
        return within(self._loopFinished, STOP_SECONDS, self._clock, f"stopping {self._what}")


def _logged_async(task: Callable[[], Deferred[Any]]) -> Callable[[], Deferred[None]]:
    """A periodic task returning a Deferred, whose failure is logged."""

    def run() -> Deferred[None]:
        name = getattr(task, "__qualname__", task)
        return task().addCallbacks(
            lambda _: None, lambda f: log.failure("periodic {task} failed", f, task=name)
        )

    return run


class Options(usage.Options):
    synopsis = "[--config FILE]"
    longdesc = (
        "A pull-through caching proxy for container registries. With no "
        "--config it serves tcp:5000, caches under ./regproxy-cache and "
        "mirrors Docker Hub."
    )
    optParameters = [["config", "c", None, "YAML configuration file (see etc/regproxy.yaml)"]]
    optFlags = [
        [
            "rebuild-index",
            None,
            "move a damaged index.db aside (index.db.corrupt-<time>) and rebuild it from "
            "the blobs on disk (tags and manifests are fetched again on the next pull)",
        ]
    ]

    config: Config

    def postOptions(self) -> None:
        try:
            self.config = load_config(self["config"])
        except ConfigError as e:
            # One clear line and a non-zero exit, never a traceback or usage dump.
            raise SystemExit(f"regproxy: {e}") from None


@attrs.frozen
class Proxy:
    """The /v2/ site, the admin backend, and what must be closed when they stop."""

    site: GuardedSite
    control: Control
    pool: HTTPConnectionPool
    evictor: Evictor
    #: what eviction and purges spare: the pins, the blobs in use
    keep: Keep
    upstreams: Upstreams
    #: the registry API for the other nodes of a cluster (behind their secret)
    internal: RegistryResource
    #: hashes stored blobs again when due, and scrubs the store
    verifier: Verifier
    #: the cache's way to its index
    access: IndexAccess
    blobs: BlobCache
    manifests: ManifestCache
    metrics: Metrics
    #: the blob files (a cluster node's local tier of them)
    store: FileStore
    #: the embedded index and its worker thread; None in a cluster
    local: LocalIndex | None = None
    #: a cluster node's engines and local tier; None on a single node
    cluster: Engines | None = None
    tier: LocalTier | None = None
    #: who may pull what (proxy.auth); None: anyone
    gate: Gate | None = None

    @property
    def index(self) -> Index:
        """A single node's embedded index."""
        assert self.local is not None, "a cluster node's index is in PostgreSQL"
        return self.local.index

    @property
    def background(self) -> IndexThread:
        assert self.local is not None, "a cluster node has no embedded index"
        return self.local.background

    async def drain(self, grace: float, sites: Sequence[GuardedSite]) -> None:
        """Shutting down, the ports closed: let the blob downloads, prefetches
        and responses in flight on *sites* finish for *grace* seconds, then
        abort the rest (clients get an aborted connection, never a short
        body; nothing partial is kept)."""
        for site in sites:
            for channel in list(site.connections):
                channel.persistent = False  # no request after the one it answers
                if not channel.requests and channel.transport is not None:
                    channel.transport.loseConnection()
        if self._busy(sites):
            self._say(log.info, "waiting up to {grace}s (proxy.shutdown_grace) for", grace, sites)
            await self._wait(lambda: not self._busy(sites), grace)
        if self._busy(sites):
            self._say(log.warn, "aborting what is still running after {grace}s:", grace, sites)
        self.blobs.abort_all("regproxy is shutting down")
        for site in sites:
            for channel in list(site.connections):
                if channel.transport is not None:
                    channel.transport.abortConnection()  # type: ignore[attr-defined]
        # downloads whose bytes are all in finish publishing: a moment
        await self._wait(lambda: not self.blobs.downloading, _PUBLISH_SECONDS)

    def _say(
        self, say: Callable[..., None], what: str, grace: float, sites: Sequence[GuardedSite]
    ) -> None:
        say(
            "shutting down: " + what + " {downloads} downloads and {responses} responses",
            grace=grace,
            downloads=self.blobs.downloading,
            responses=_responding(sites),
        )

    async def _wait(self, done: Callable[[], bool], seconds: float) -> None:
        clock = self.site.clock
        deadline = clock.seconds() + seconds
        while not done() and clock.seconds() < deadline:
            await deferLater(clock, _DRAIN_POLL_SECONDS, lambda: None)

    def _busy(self, sites: Sequence[GuardedSite]) -> bool:
        running = any(job.state in ("queued", "running") for job in self.control.prefetch_jobs())
        return bool(self.blobs.downloading or running or _responding(sites))

    async def close(self) -> None:
        await self.pool.closeCachedConnections()
        self.upstreams.close()
        self.verifier.close()
        self.store.threads.stop()
        if self.gate is not None:
            self.gate.close()
        if self.local is not None:
            await self.local.close()
        if self.cluster is not None:
            await self.cluster.stop()


def _responding(sites: Sequence[GuardedSite]) -> int:
    """Requests being answered on *sites*."""
    return sum(len(channel.requests) for site in sites for channel in site.connections)


class _Closing(Service):
    """Drains, then closes the proxy.  Added to the service before the
    listeners, it is stopped after them (a MultiService stops its children
    in reverse order): the ports take no new connection while it drains."""

    def __init__(self, proxy: Proxy, grace: float = 0.0, sites: Sequence[GuardedSite] = ()) -> None:
        self._proxy = proxy
        self._grace = grace
        self._sites = sites

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        try:
            await self._proxy.drain(self._grace, self._sites)
        finally:
            await self._proxy.close()


class _Rebuild(Service):
    """Indexes the blobs on disk once regproxy runs (``--rebuild-index``).

    Only the blob rows come back: which upstream repository a manifest was
    fetched for, its tags, and which repositories may read which blobs are
    not on disk, so each image's next pull asks its upstream for the
    manifests again, and finds the layers on disk."""

    def __init__(self, control: Control) -> None:
        self._control = control

    def startService(self) -> None:
        super().startService()
        Deferred.fromCoroutine(self._run())

    async def _run(self) -> None:
        try:
            result = await self._control.fsck()
        except Exception:
            log.failure("rebuilding the index failed; try POST /api/v1/fsck")
            return
        log.info(
            "index rebuilt: {indexed} blobs indexed, {quarantined} rotten ones quarantined",
            indexed=len(result.indexed),
            quarantined=len(result.quarantined),
        )


class _Listener(StreamServerEndpointService):
    """Fails start-up with one line if the port cannot be bound, rather than run deaf."""

    def __init__(self, description: str, endpoint: Any, factory: Any) -> None:
        super().__init__(endpoint, factory)
        self.description = description
        self._raiseSynchronously = True

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()
        except CannotListenError as e:
            why = getattr(e.socketError, "strerror", e.socketError)
            raise SystemExit(f"regproxy: cannot listen on {self.description}: {why}") from None


class _ReloadOnHangup(Service):
    """Reads the proxy port's TLS certificate again on ``SIGHUP``: renewed
    certificates take effect without a restart or a dropped connection."""

    def __init__(self, reload: Callable[[], object], reactor: IReactor) -> None:
        self._reload = reload
        self._reactor = reactor
        self._previous: Any = None

    def startService(self) -> None:
        super().startService()
        self._previous = signal.signal(signal.SIGHUP, self._hangup)

    def _hangup(self, signum: int, frame: Any) -> None:
        self._reactor.callFromThread(self._reload)

    def stopService(self) -> Any:
        signal.signal(signal.SIGHUP, self._previous)
        return super().stopService()


def _open_index(path: str, rebuild: bool, now: float) -> Index:
    """The index at *path*; with *rebuild*, a new one in place of a damaged one."""
    try:
        try:
            return Index(path)
        except IndexUnusable as e:
            if not rebuild:
                raise SystemExit(
                    f"regproxy: {e}: start once with 'twistd regproxy --rebuild-index' to move"
                    " it aside and rebuild it from the blobs on disk (or delete it)"
                ) from None
            aside = set_aside(path, now)
            log.warn(
                "{why}: moved to {aside}; rebuilding it from the blobs on disk", why=e, aside=aside
            )
        return Index(path)
    except IndexUnavailable as e:
        # not --rebuild-index: that would throw a sound index away
        raise SystemExit(
            f"regproxy: {e}: the index is not damaged; free disk space on its filesystem"
            " (or end what holds it locked) and start again"
        ) from None


def limits(config: Config, max_connections: int | None = None) -> tuple[Limits, Limits]:
    """What the proxy's and the admin port's clients may hold; *max_connections*
    overrides ``proxy.max_connections``."""
    proxy = Limits(
        max_connections or config.proxy.max_connections,
        config.proxy.header_timeout,
        config.proxy.idle_timeout,
        config.proxy.send_timeout,
    )
    return proxy, attrs.evolve(proxy, max_connections=config.admin.max_connections)


def _fitted_connections(config: Config) -> int:
    """``proxy.max_connections``, lowered to what the open-file limit (raised
    as far as it goes) holds."""
    open_files = open_files_limit()
    wanted = config.proxy.max_connections
    fitted = fitting_connections(wanted, config.admin.max_connections, open_files)
    if fitted < wanted:
        log.warn(
            "proxy.max_connections {wanted} lowered to {fitted}: the open-file limit is "
            "{open_files} (raise it with ulimit -n or LimitNOFILE=)",
            wanted=wanted,
            fitted=fitted,
            open_files=open_files,
        )
    return fitted


def _removed_everywhere(manifests: ManifestCache, cluster: Engines) -> Callable[[], None]:
    """What a cluster node does when it purged or evicted: forgets its own
    answers in memory, and tells the other nodes to."""

    def removed() -> None:
        manifests.forget_hot()
        cluster.settings.bump()

    return removed


def _forgetting(proxy: Proxy, cluster: Engines) -> Callable[[int | None], Deferred[None]]:
    """What a node does when another purged: lands what it is caching,
    drops its answers in memory, and knows the removals up to the
    generation the other wrote handled (its next refresh keeps the
    answers it makes from now on)."""

    def forget(generation: int | None) -> Deferred[None]:
        d = proxy.manifests.forget()
        if generation is not None:
            d.addCallback(lambda _: cluster.settings.seen(generation))
        return d

    return forget


def build_proxy(
    config: Config,
    reactor: IReactor,
    rebuild_index: bool = False,
    max_connections: int | None = None,
    peers: PeerSource | None = None,
    cluster: Engines | None = None,
    clock: IReactorTime | None = None,
    connect: Connect | None = None,
) -> Proxy:
    """The /v2/ proxy and everything behind it, wired from *config*.

    *rebuild_index* moves a damaged index aside and starts an empty one; the
    caller then runs fsck (:class:`_Rebuild`), which indexes the blobs on disk.
    *max_connections* overrides ``proxy.max_connections``.  *peers*: the
    other nodes of a cluster, which own some downloads.  *cluster*: a
    cluster node's engines (not started yet): the index in PostgreSQL, the
    blobs in the bucket, and ``cache.directory`` a local tier of them.
    *clock* times the proxy's deadlines, revalidations, sweeps and access
    times (the reactor if None; tests pass a ``Clock`` they advance, whose
    calls in no time run on the reactor, as a next turn: ``ProxyClock``);
    *connect*, how its upstreams are reached (:data:`.registry.Connect`)."""
    if clock is None:
        clock = reactor
    try:
        store = FileStore(config.cache.directory, Threads(reactor, "regproxy-files"))
        local = None
        if cluster is None:
            path = os.path.join(store.root, "index.db")
            index = _open_index(path, rebuild_index, clock.seconds())
            # eviction, purges, fsck and WAL checkpoints work on a connection
            # and a thread of their own; the reactor thread's commits never checkpoint
            threads = thread_pool("regproxy-index", 1, minthreads=1)
            reads = thread_pool("regproxy-index-reads", 1, minthreads=1)
            room = thread_pool("regproxy-index-room", 1, minthreads=1)
            local = LocalIndex(
                index,
                IndexThread(index, reactor, threads),
                IndexThread(index, reactor, reads),
                IndexThread(index, reactor, room),
            )
            index.autocheckpoint(0)
    except OSError as e:
        raise SystemExit(
            f"regproxy: cannot use cache.directory {config.cache.directory!r}: {e.strerror}"
        ) from None
    # the shared index has the embedded one's API (PgIndex for Index)
    access = cast(IndexAccess, local if local is not None else cluster.access)  # type: ignore[union-attr]
    # Upstreams changed through the admin API win over the file (a
    # cluster's are read once the node has joined)
    if cluster is None:
        config = SavedUpstreams(os.path.join(store.root, "upstreams.json")).apply(config)
    metrics = Metrics(clock)
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = 16
    upstreams = Upstreams(
        config.upstreams,
        config.default_upstream,
        reactor,
        pool,
        allow_any=config.allow_any_registry,
        metrics=metrics,
        clock=clock,
        connect=connect,
    )
    shared = cluster.bucket if cluster is not None else None
    tier = None
    if cluster is not None:
        peers = cluster.peers
        tier = LocalTier(store, config.cache.storage.local_max_bytes, cluster.tier_threads, reactor)
    manifests = ManifestCache(
        store, access, clock, config.cache.tag_ttl, config.cache.max_stale, shared, peers
    )
    # what may not be deleted now: the pins (from the config and the admin
    # API: Control's Pins sets them) and the blobs in use (sources below)
    keep = Keep()
    evictor = Evictor(
        access,
        store if shared is None else SharedDeletion(shared, store),
        clock,
        keep,
        config.cache.max_bytes,
        config.cache.low_water,
        config.cache.max_idle,
        removed=manifests.forget_hot
        if cluster is None
        else _removed_everywhere(manifests, cluster),
    )
    # stored bytes are hashed again when they are read again (scrub.py)
    verifier = Verifier(
        store,
        access,
        clock,
        Threads(reactor, "regproxy-verify"),
        config.cache.verify_after,
        local_tier=shared is not None,
    )
    blobs = BlobCache(
        store,
        access,
        clock,
        stored=evictor.soon,
        max_bytes=config.cache.max_bytes,
        make_room=evictor.make_room,
        could_fit=evictor.could_fit,
        peers=peers,
        verifier=verifier,
        shared=shared,
        tier=tier,
        redirect=config.cache.storage.redirect,
    )
    keep.busy_from(blobs.in_use)
    if cluster is not None:  # nor what the other nodes read or download
        keep.busy_from(cluster.membership.busy_elsewhere)
    gate = _gate(config, store.root, cluster, reactor, metrics)
    resource = RegistryResource(
        upstreams, manifests, blobs, metrics, clock, config.proxy.sendfile, gate=gate
    )
    # what other nodes of a cluster ask this one for: never passed on again
    internal = RegistryResource(
        upstreams, manifests, blobs, metrics, clock, config.proxy.sendfile, forward=False
    )
    control = build_control(
        config,
        store.root,
        store,
        access,
        manifests,
        blobs,
        upstreams,
        metrics,
        reactor,
        evictor,
        keep,
        cluster,
        (cluster.settings.upstreams, cluster.settings.pins) if cluster is not None else None,
    )
    site = GuardedSite(
        resource,
        limits(config, max_connections)[0],
        no_bodies if gate is None else login_bodies,
        clock,
        "proxy",
        config.proxy.access_log,
    )
    site.answers = resource.answer_again
    return Proxy(
        site,
        control,
        pool,
        evictor,
        keep,
        upstreams,
        internal,
        verifier,
        access,
        blobs,
        manifests,
        metrics,
        store,
        local=local,
        cluster=cluster,
        tier=tier,
        gate=gate,
    )


def _gate(
    config: Config, directory: str, cluster: Engines | None, reactor: IReactor, metrics: Metrics
) -> Gate | None:
    """Who may pull what (proxy.auth), signing tokens with the node's key,
    or a cluster's, so that any node takes any node's tokens; None: anyone."""
    if config.proxy.auth is None:
        return None
    if cluster is None:
        try:
            key = node_key(directory)
        except OSError as e:
            raise SystemExit(f"regproxy: cannot keep the login key in {directory!r}: {e}") from None
    else:
        key = cluster_key(lambda: cluster.membership.secret)
    logins = metrics.logins
    try:
        return make_gate(config.proxy.auth, reactor, key, lambda r: logins.labels(r).inc())
    except (OSError, ValueError) as e:  # a users' file changed since the config was read
        raise SystemExit(f"regproxy: proxy.auth: {e}") from None


def _fail(reactor: IReactor) -> None:
    """Stop, and exit non-zero once stopped (twistd itself would exit 0)."""
    reactor.addSystemEventTrigger("after", "shutdown", os._exit, 1)
    reactor.stop()


class _Joining(Service):
    """Starts a cluster node: connects its engines and joins the cluster
    (off the reactor thread), and only then starts *then*: its heartbeats,
    timers and listeners, so no client reaches a node that is not ready.
    A node that cannot start says why and stops."""

    def __init__(
        self,
        engines: Engines,
        then: Sequence[IService],
        secret: str | None,
        joined: Callable[[], None],
        reactor: IReactor,
    ) -> None:
        """*joined*: called once connected, before *then* starts; *reactor*
        is stopped if the node cannot start."""
        self._reactor = reactor
        self._engines = engines
        self._then = then
        self._secret = secret
        self._joined = joined

    def startService(self) -> None:
        super().startService()
        Deferred.fromCoroutine(self._start())

    async def _start(self) -> None:
        reactor = self._reactor
        try:
            await self._engines.start()
        except Exception as e:
            log.critical("regproxy: this cluster node cannot start: {why}", why=e)
            _fail(reactor)
            return
        if self._secret is not None:
            self._engines.membership.secret = self._secret
        self._joined()
        assert self.parent is not None
        try:
            for child in self._then:
                child.setServiceParent(self.parent)
        except SystemExit as e:  # a port that cannot be bound
            log.critical("{why}", why=str(e))
            _fail(reactor)


def makeService(options: Options, reactor: IReactor | None = None) -> IService:
    """The proxy's services, on *reactor* (twistd's, the global one, by default:
    then this process is the proxy, and its start-up heap is frozen)."""
    serving = reactor is None
    if reactor is None:
        from twisted.internet import reactor as running

        reactor = cast(IReactor, running)
    config = options.config
    service = MultiService()
    if serving:  # this process is the proxy: its stop ends by a deadline
        watchdog = Watchdog(config.proxy.shutdown_grace + MARGIN_SECONDS)
        reactor.addSystemEventTrigger("before", "shutdown", watchdog.arm)
    cluster = None
    if config.cluster is not None:
        if options["rebuild-index"]:
            raise SystemExit("regproxy: --rebuild-index is for a single node's embedded index")
        # the engines' client libraries only where they are used (engineconfig.py)
        from .cluster.node import engines

        cluster = engines(
            config,
            reactor,
            busy=lambda: proxy.blobs.in_use(),
            status=lambda: proxy.control.status(),
        )
    proxy = build_proxy(
        config,
        reactor,
        rebuild_index=bool(options["rebuild-index"]),
        max_connections=_fitted_connections(config),
        cluster=cluster,
    )
    api = AdminAPI(
        proxy.control,
        config.admin.secret(),
        config.admin.max_body,
        Threads(reactor, "regproxy-admin-json", 1),
    )
    admin = GuardedSite(api.resource(), limits(config)[1], api.body_policy, reactor, "admin API")
    sites = [proxy.site, admin]
    later: list[IService] = []
    proxy_port: tuple[str, Any] = (config.proxy.listen, PlainHTTPFactory(proxy.site))
    tls = parse_listen(config.proxy.listen)
    if tls is not None:
        try:
            certificate = ServerCertificate(tls, config.proxy.client_ca)
        except TLSError as e:  # the files changed since the config was read
            raise SystemExit(f"regproxy: proxy.{e}") from None
        proxy_port = (tls.tcp, TLSFactory(certificate, proxy.site))
        later.append(_ReloadOnHangup(certificate.reload, reactor))
    ports = [("proxy.listen", *proxy_port), ("admin.listen", config.admin.listen, admin)]
    if cluster is not None:
        assert config.cluster is not None
        membership = cluster.membership
        # the other nodes' way in: their secret, and nothing passed on again
        inside = GuardedSite(
            PeersOnly(proxy.internal, lambda: membership.secret, _forgetting(proxy, cluster)),
            limits(config)[0],
            no_bodies,
            reactor,
            "cluster port",
        )
        sites.append(inside)
        ports.append(("cluster.listen", config.cluster.listen, PlainHTTPFactory(inside)))
        later.append(membership)
        settings, control = cluster.settings, proxy.control

        manifests = proxy.manifests
        from .cluster.pg import Unavailable

        async def shared_settings() -> None:
            try:
                changed = await settings.refresh()
            except Unavailable as e:
                # the database down: a line a heartbeat, as the heartbeat's
                # own failure, not a traceback each
                log.warn("{why}", why=e)
                return
            if changed:  # settings, or a removal somewhere
                manifests.forget_hot()
                control.reload_saved()

        later.append(
            _Periodic(
                reactor,
                config.cluster.heartbeat,
                _logged_async(lambda: Deferred.fromCoroutine(shared_settings())),
                "the shared settings' refresh",
            )
        )
    # first: stopped last, once the ports below stop listening
    _Closing(proxy, config.proxy.shutdown_grace, sites).setServiceParent(service)
    if options["rebuild-index"]:
        _Rebuild(proxy.control).setServiceParent(service)
    # access times are gathered in memory and written in batches
    later.append(
        _Periodic(
            reactor, _FLUSH_SECONDS, _logged_async(proxy.access.flush), "the access times' writes"
        )
    )
    # the dashboard's chart: the counters over the last hour and day
    later.append(
        _Periodic(
            reactor,
            proxy.metrics.history.interval,
            proxy.control.sample_history,
            "the dashboard's samples",
        )
    )
    # idle images and a budget overrun are swept away in the background too
    later.append(
        _Periodic(reactor, _SWEEP_SECONDS, _logged_async(proxy.evictor.sweep), "the sweep")
    )
    if proxy.local is not None:
        later.append(
            _Periodic(
                reactor,
                _CHECKPOINT_SECONDS,
                _logged_async(proxy.background.checkpoint),
                "the index's checkpoints",
            )
        )
        if config.cache.scrub_bytes:
            later.append(Scrubber(proxy.verifier, proxy.access, reactor, config.cache.scrub_bytes))
    if cluster is not None:
        later.append(
            _Periodic(
                reactor,
                _STALE_UPLOADS_SECONDS,
                _logged_async(cluster.abort_stale_uploads),
                "the stale uploads' aborts",
            )
        )
    if proxy.tier is not None:
        tier, blobs = proxy.tier, proxy.blobs
        later.append(
            _Periodic(
                reactor,
                _SWEEP_SECONDS,
                _logged_async(lambda: tier.trim(blobs.in_use())),
                "the local tier's trims",
            )
        )
    for key, description, factory in ports:
        try:
            endpoint = serverFromString(reactor, description)
        except (ValueError, KeyError, TypeError) as e:
            raise SystemExit(f"regproxy: {key} {description!r} is not an endpoint: {e}") from None
        later.append(_Listener(f"{key} {description!r}", endpoint, factory))
    if cluster is None:
        for child in later:
            child.setServiceParent(service)
    else:
        secret = config.cluster.secret if config.cluster is not None else None
        _Joining(cluster, later, secret, proxy.control.reload_saved, reactor).setServiceParent(
            service
        )
    if serving:
        # What start-up made (modules, classes, the parts above: some 68,000
        # objects) lives as long as the process.  Out of the collector's way,
        # a full collection no longer walks it, which took the reactor about
        # 40 ms each time here (bench/gcpause.py).
        gc.freeze()
    return service
