# test-case-name: tests.test_service,tests.integration.test_settings_proc
"""
Wiring: builds the object graph from a Config and a reactor, and the
service that twistd runs.

This is the one module (with tap.py) that knows every component; the rest
receive what they use.
"""

import os

from twisted.application.service import MultiService
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from regcache import upstream_http
from regcache.accounting import FILENAME as ACCOUNTING_FILE, Accounting, AccountingFlush
from regcache.auth import Credentials
from regcache.chain import Chain
from regcache.config import ConfigError
from regcache.expiry import Expiry
from regcache.inflight import FillDrain, Fills
from regcache.listener import Listener, listen_endpoint
from regcache.metrics import Metrics, metrics_resource
from regcache.mirror import Mirror
from regcache.policy import Policy, Registry
from regcache.probe import RateLimitProbe
from regcache.readiness import Readiness
from regcache.routes import RegistryRoutes
from regcache.site import RegcacheSite
from regcache.store import Store
from regcache.referrers import ReferrersCache
from regcache.tags import TagMap
from regcache.upstream import Timeouts, Upstream


def _registry(config, reactor, metrics) -> Registry:
    """
    The upstream ``config`` describes: one registry, or a chain of them
    tried in order, each member with an HTTP client (and connection pool),
    credentials and tokens of its own, under the upstream's timeouts.
    """
    timeouts = Timeouts(header=config.header_timeout, idle=config.idle_timeout)
    members = [
        Upstream(url.url, upstream_http.client(reactor, config.connect_timeout), reactor, metrics,
                 Credentials(url.username, url.password) if url.username else None, timeouts,
                 docker_hub=config.docker_hub, key=config.name, realms=config.realms)
        for url in config.urls
    ]
    upstream = members[0] if len(members) == 1 else Chain(members, reactor, key=config.name)
    return Registry(config.name, frozenset(config.hosts), upstream, config.tag_ttl, config.max_stale, config.alias)


def _served(config) -> str:
    return ", ".join(f"{u.name} ({' '.join(url.url for url in u.urls)})" for u in config.upstreams)


def build(config, reactor) -> MultiService:
    """
    The whole regcache service for one Config.  Raises ConfigError, naming
    the option at fault, when the config cannot be served.
    """
    endpoint = listen_endpoint(reactor, config.listen)
    metrics_endpoint = (listen_endpoint(reactor, config.metrics_listen, "--metrics-listen")
                        if config.metrics_listen else None)
    top = MultiService()

    pool = ThreadPool(minthreads=1, maxthreads=4, name="regcache-io")
    reactor.callWhenRunning(pool.start)
    reactor.addSystemEventTrigger("during", "shutdown", pool.stop)

    def run(f, *args):
        return deferToThreadPool(reactor, pool, f, *args)

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

    registries = [_registry(u, reactor, metrics) for u in config.upstreams]
    policy = Policy(registries, reactor, config.default)
    fills = Fills(store, reactor, metrics)
    tags = TagMap(config.storage, run, store.index)
    tags.count()
    referrers = ReferrersCache(config.storage, run, tags)
    mirror = Mirror(store, tags, fills, policy, metrics, reactor, referrers)
    readiness = Readiness(store, run, reactor)
    routes = RegistryRoutes(mirror, policy, metrics, reactor, readiness.problem,
                            serve_metrics=metrics_endpoint is None)
    site = RegcacheSite(routes.app.resource(), metrics, reactor)

    # Before the port: the start-up scan is under way when the first
    # request arrives, and eviction waits for it.
    Expiry(store, config.max_size, reactor, metrics).setServiceParent(top)
    readiness.setServiceParent(top)
    Listener(endpoint, config.listen, site, reactor,
             served=f"caching {_served(config)} in {config.storage}").setServiceParent(top)
    if metrics_endpoint is not None:
        Listener(metrics_endpoint, config.metrics_listen, RegcacheSite(metrics_resource(metrics), metrics, reactor),
                 reactor, served="/metrics only", option="--metrics-listen").setServiceParent(top)
    FillDrain(fills, reactor).setServiceParent(top)
    if config.ratelimit_probe is not None:
        RateLimitProbe(_hub_members(registries), reactor, config.ratelimit_probe).setServiceParent(top)
    AccountingFlush(accounting, reactor).setServiceParent(top)
    return top


def _hub_members(registries):
    """Every Docker Hub registry behind the upstreams: what the rate-limit probe checks."""
    members = [m for r in registries for m in (r.upstream.members if isinstance(r.upstream, Chain) else [r.upstream])]
    return [m for m in members if m.is_docker_hub]
