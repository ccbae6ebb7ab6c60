# test-case-name: tests.test_service,tests.integration.test_settings_proc
"""
Wiring: builds the object graph from a Config and a reactor, and the
service that twistd runs.

This is the one module (with tap.py) that knows every component; the rest
receive what they use.
"""

import os
import resource
import signal
import socket
from urllib.parse import urlsplit

from twisted.application.internet import TimerService
from twisted.application.service import MultiService
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from regcache import upstream_http
from regcache.accounting import FILENAME as ACCOUNTING_FILE, Accounting, AccountingFlush
from regcache.auth import Credentials
from regcache.chain import Chain
from regcache.clientauth import WATCH_SECONDS, Gate
from regcache.config import ConfigError
from regcache.expiry import Expiry
from regcache.inflight import FillDrain, Fills, RateFloor
from regcache.leases import LEASE_DEADLINE, BucketTable, Leases
from regcache.listener import Listener, listen_endpoint
from regcache.metrics import Metrics, metrics_resource
from regcache.mirror import Mirror
from regcache.peers import PeerAuth, PeerBlobs, Peers, default_advertise, peer_key
from regcache.policy import Policy, Registry
from regcache.probe import RateLimitProbe
from regcache.readiness import Readiness
from regcache.redis_leases import RedisTable, connect as redis_connect
from regcache.redirect import Redirects
from regcache.reload import Reloads, credentials_reloader, policy_reloader
from regcache.routes import RegistryRoutes
from regcache.s3 import S3
from regcache.shared import SharedLevel
from regcache.sharedmeta import SharedMeta
from regcache.rules import PullRules
from regcache.site import ClientLimits, RegcacheSite
from regcache.status import Status
from regcache.store import Store
from regcache.sweeper import Sweeper, Uses
from regcache.referrers import ReferrersCache
from regcache.tags import TagMap
from regcache.tls import upstream_policy
from regcache.upstream import Timeouts, Upstream


def _registry(config, reactor, metrics, allowed=()) -> Registry:
    """
    The upstream ``config`` describes: one registry, or a chain of them
    tried in order, each member with an HTTP client (and connection pool),
    credentials and tokens of its own, under the upstream's timeouts.
    """
    timeouts = Timeouts(header=config.header_timeout, idle=config.idle_timeout)
    if config.insecure:
        Logger().warn("The TLS certificates of upstream {upstream} are not verified (insecure, as configured): "
                      "anyone on the path can answer for it", upstream=config.name)
    tls = upstream_policy(config.ca, config.insecure)
    members = [
        Upstream(url.url, upstream_http.client(reactor, config.connect_timeout, urlsplit(url.url).hostname, allowed,
                                               tls),
                 reactor, metrics,
                 Credentials(url.username, url.password) if url.username else None, timeouts,
                 docker_hub=config.docker_hub, key=config.name, realms=config.realms)
        for url in config.urls
    ]
    upstream = members[0] if len(members) == 1 else Chain(members, reactor, key=config.name)
    return Registry(config.name, frozenset(config.hosts), upstream, config.tag_ttl, config.max_stale, config.alias,
                    config.revalidate_deadline)


#: Descriptors kept back from client connections: the listening socket,
#: the store's files and thread pool, upstream connections, the logs.
DESCRIPTOR_RESERVE = 64

#: The most descriptors one client connection can hold: its socket, a blob
#: file, and the socket's duplicate the sendfile sender watches.
DESCRIPTORS_PER_CONNECTION = 3


def connection_cap(setting, open_files: int):
    """
    The total connection cap: as set, or for "auto" as many connections as
    the open-file limit can give a blob response each, after the reserve,
    so that running out of descriptors can never turn away a health check.
    """
    if setting != "auto":
        return setting
    return max(1, (open_files - DESCRIPTOR_RESERVE) // DESCRIPTORS_PER_CONNECTION)


def _served(config) -> str:
    return ", ".join(f"{u.name} ({' '.join(url.url for url in u.urls)})" for u in config.upstreams)


def _on_sighup(handler):
    """Run ``handler()`` on SIGHUP; the returned callable puts the old handler back."""
    previous = signal.signal(signal.SIGHUP, lambda signum, frame: handler())
    return lambda: signal.signal(signal.SIGHUP, previous)


def _pool(reactor, name: str, threads: int):
    """
    A thread pool that lives as long as the reactor runs, as the
    ``run(f, *args) -> Deferred`` its users are given.
    """
    pool = ThreadPool(minthreads=1, maxthreads=threads, name=name)
    reactor.callWhenRunning(pool.start)
    reactor.addSystemEventTrigger("during", "shutdown", pool.stop)

    def run(f, *args):
        return deferToThreadPool(reactor, pool, f, *args)

    return run


def build(config, reactor, reread=None) -> MultiService:
    """
    The whole regcache service for one Config.  Raises ConfigError, naming
    the option at fault, when the config cannot be served.  ``reread()``
    loads the configuration again, as a restart would: given it, SIGHUP
    reloads what can change without one.
    """
    endpoint, served_tls = listen_endpoint(reactor, config.listen)
    metrics_endpoint, metrics_tls = (listen_endpoint(reactor, config.metrics_listen, "--metrics-listen")
                                     if config.metrics_listen else (None, None))
    top = MultiService()

    run = _pool(reactor, "regcache-io", 4)

    store = Store(config.storage, run, reactor.seconds)
    try:
        removed = store.prepare()
    except OSError as e:
        raise ConfigError(f"--storage: cannot use {e.filename or config.storage}: {e.strerror}") from None
    if removed:
        Logger().info("Removed {n} unfinished downloads left by an earlier run", n=removed)
    accounting = Accounting(reactor, os.path.join(config.storage, ACCOUNTING_FILE), run)
    accounting.load()
    metrics = Metrics(accounting, config.metrics_repositories)

    registries = [_registry(u, reactor, metrics, config.upstream_allow) for u in config.upstreams]
    # The shared level's bucket, when there is one: every replica's second
    # level, under the one HTTP client and pool of its own.
    bucket = (S3(config.shared.bucket, upstream_http.client(reactor, 5.0), reactor, run)
              if config.shared is not None else None)
    pulls = PullRules(config.policy, metrics)
    policy = Policy(registries, reactor, config.default, pulls)
    limited = config.shared is not None and config.shared.max_size is not None
    uses = Uses(bucket, reactor, config.shared.sweep_interval) if limited else None
    # Replicas sign what they ask each other with a key only they have.
    peer_auth = PeerAuth(peer_key(config.shared.bucket.secret_key), reactor) if bucket is not None else None
    coordinator = _coordinator(config, bucket, reactor, metrics, peer_auth) if bucket is not None else None
    shared = SharedLevel(bucket, store, metrics, reactor, coordinator) if bucket is not None else None
    fills = Fills(store, reactor, metrics, RateFloor(config.min_download_rate), shared)
    # Manifests, tags and links go to the bucket beside the blobs.
    meta = SharedMeta(shared) if shared is not None else None
    if meta is not None:
        store.on_link = meta.link
    tags = TagMap(config.storage, run, store.index, shared=meta)
    tags.count()
    referrers = ReferrersCache(config.storage, run, tags)
    redirects = (Redirects(shared, config.shared.redirect_expiry, metrics, reactor)
                 if shared is not None and config.shared.redirect else None)
    mirror = Mirror(store, tags, fills, policy, metrics, reactor, referrers, meta, redirects, uses)
    readiness = Readiness(store, run, reactor)
    # Password checks have threads of their own: a flood of logins must not
    # queue the store's reads behind bcrypt, nor the other way round.
    gate = Gate(config.auth, reactor, _pool(reactor, "regcache-auth", 2) if config.auth else None, metrics)
    status = Status(metrics, fills, registries, reactor, config.max_size, usage=accounting,
                    docker_hub=[u.name for u in config.upstreams if u.docker_hub], shared=shared is not None)
    peers = PeerBlobs(peer_auth, store, fills, coordinator, metrics) if coordinator is not None else None
    routes = RegistryRoutes(mirror, policy, metrics, reactor, readiness.problem, status,
                            serve_metrics=metrics_endpoint is None, gate=gate, peers=peers)
    open_files = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    limits = ClientLimits(
        head_timeout=config.client_header_timeout,
        progress_timeout=config.client_progress_timeout,
        max_connections=connection_cap(config.max_connections, open_files),
        max_per_client=config.max_connections_per_client,
        exempt=config.auth.trusted_proxies if config.auth else (),
    )
    Logger().info("Client connections: at most {total} in all, {per} per address (open-file limit {files})",
                  total=limits.max_connections or "unlimited", per=limits.max_per_client or "unlimited",
                  files=open_files)
    site = RegcacheSite(routes.app.resource(), metrics, reactor, limits)

    # Before the port: the start-up scan is under way when the first
    # request arrives, and eviction waits for it.
    Expiry(store, config.max_size, reactor, metrics).setServiceParent(top)
    if limited:
        settings = config.shared
        Sweeper(bucket, settings.max_size, reactor, metrics, settings.advertise or socket.gethostname(),
                settings.sweep_interval, settings.redirect_expiry if settings.redirect else 0.0
                ).setServiceParent(top)
    readiness.setServiceParent(top)
    if config.auth and config.auth.htpasswd:
        watch = TimerService(WATCH_SECONDS, gate.check_file)
        watch.clock = reactor
        watch.setServiceParent(top)
    Listener(endpoint, config.listen, site, reactor,
             served=f"caching {_served(config)} in {config.storage}").setServiceParent(top)
    if metrics_endpoint is not None:
        Listener(metrics_endpoint, config.metrics_listen, RegcacheSite(metrics_resource(metrics), metrics, reactor),
                 reactor, served="/metrics only", option="--metrics-listen").setServiceParent(top)
    FillDrain(fills, reactor).setServiceParent(top)
    if reread is not None:
        reloads = Reloads(reactor, metrics, _on_sighup)
        if config.file:
            reloads.register("policy", policy_reloader(config, reread, run, pulls))
        if config.auth and config.auth.htpasswd:
            reloads.register("htpasswd", gate.reload)
        members = _members(config, registries)
        if any(m.credentials for m in members.values()):
            reloads.register("credentials", credentials_reloader(reread, run, members))
        for tls in (served_tls, metrics_tls):
            if tls is not None:
                reloads.register("tls", tls.reloader(run))
        reloads.setServiceParent(top)
    if config.ratelimit_probe is not None:
        RateLimitProbe(_hub_members(registries), reactor, config.ratelimit_probe).setServiceParent(top)
    AccountingFlush(accounting, reactor).setServiceParent(top)
    return top


def _coordinator(config, bucket, reactor, metrics, auth) -> Leases:
    """
    Who downloads a blob neither level holds: leases in the bucket, and a
    forward to their holder, at the URL this replica tells the others.
    """
    me = config.shared.advertise or default_advertise(config.listen)
    if me is None:
        raise ConfigError(f"--advertise: needed with --storage-backend s3 here: --listen ({config.listen}) names "
                          "no TCP port, or this host's name does not resolve to an address")
    Logger().info("Other replicas reach this one at {url} for the blobs it downloads (--advertise)", url=me)
    if urlsplit(me).hostname in ("127.0.0.1", "::1", "localhost"):
        Logger().warn("--advertise {url} is a loopback address: only replicas on this host can reach it", url=me)
    peers = Peers(upstream_http.client(reactor, 5.0), auth, reactor, metrics)
    if config.shared.redis:
        table = RedisTable(redis_connect(config.shared.redis, LEASE_DEADLINE), config.shared.lease_ttl)
    else:
        table = BucketTable(bucket, reactor)
    return Leases(table, peers, me, config.shared.lease_ttl, reactor, metrics)


def _members(config, registries):
    """Every upstream member, by (upstream name, URL): what a reload of the passwords updates."""
    return {(u.name, url.url): member for u, r in zip(config.upstreams, registries)
            for url, member in zip(u.urls, r.upstream.members if isinstance(r.upstream, Chain) else [r.upstream])}


def _hub_members(registries):
    """Every Docker Hub registry behind the upstreams: what the rate-limit probe checks."""
    members = [m for r in registries for m in (r.upstream.members if isinstance(r.upstream, Chain) else [r.upstream])]
    return [m for m in members if m.is_docker_hub]
