# test-case-name: tests.test_service,tests.integration.test_settings_proc
"""
Wiring: builds the object graph from a Config and a reactor, and the
service that twistd runs.

This is the one module (with tap.py) that knows every component; the rest
receive what they use.
"""

from twisted.application.internet import TimerService
from twisted.application.service import MultiService
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from regcache import upstream_http
from regcache.auth import Credentials
from regcache.chain import Chain
from regcache.clientauth import WATCH_SECONDS, Gate
from regcache.config import ConfigError
from regcache.expiry import Expiry
from regcache.inflight import FillDrain, Fills
from regcache.listener import Listener, listen_endpoint
from regcache.metrics import Metrics
from regcache.mirror import Mirror
from regcache.policy import Policy, Registry
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


def build(config, reactor) -> MultiService:
    """
    The whole regcache service for one Config.  Raises ConfigError, naming
    the option at fault, when the config cannot be served.
    """
    endpoint = listen_endpoint(reactor, config.listen)
    top = MultiService()
    metrics = Metrics()

    run = _pool(reactor, "regcache-io", 4)

    store = Store(config.storage, run, reactor.seconds)
    try:
        removed = store.prepare()
    except OSError as e:
        raise ConfigError(f"--storage: cannot use {e.filename or config.storage}: {e.strerror}") from None
    if removed:
        Logger().info("Removed {n} unfinished downloads left by an earlier run", n=removed)

    registries = [_registry(u, reactor, metrics) for u in config.upstreams]
    policy = Policy(registries, reactor, config.default)
    fills = Fills(store, reactor, metrics)
    tags = TagMap(config.storage, run, store.index)
    tags.count()
    referrers = ReferrersCache(config.storage, run, tags)
    mirror = Mirror(store, tags, fills, policy, metrics, reactor, referrers)
    readiness = Readiness(store, run, reactor)
    # Password checks have threads of their own: a flood of logins must not
    # queue the store's reads behind bcrypt, nor the other way round.
    gate = Gate(config.auth, reactor, _pool(reactor, "regcache-auth", 2) if config.auth else None, metrics)
    routes = RegistryRoutes(mirror, policy, metrics, reactor, readiness.problem, gate)
    site = RegcacheSite(routes.app.resource(), metrics, reactor)

    # Before the port: the start-up scan is under way when the first
    # request arrives, and eviction waits for it.
    Expiry(store, config.max_size, reactor, metrics).setServiceParent(top)
    readiness.setServiceParent(top)
    if config.auth and config.auth.htpasswd:
        watch = TimerService(WATCH_SECONDS, gate.check_file)
        watch.clock = reactor
        watch.setServiceParent(top)
    Listener(endpoint, config.listen, site, reactor,
             served=f"caching {_served(config)} in {config.storage}").setServiceParent(top)
    FillDrain(fills, reactor).setServiceParent(top)
    return top
