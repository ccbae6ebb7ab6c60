# test-case-name: tests.test_service,tests.integration.test_settings_proc
"""
Wiring: builds the object graph from a Config and a reactor, and the
service that twistd runs.

This is the one module (with tap.py) that knows every component; the rest
receive what they use.  It also gives each request one structured log event,
and owns the listening port: a process that cannot listen says so in one
line and ends.
"""

import re

from OpenSSL import SSL, crypto
from treq.client import HTTPClient
from twisted.application.service import MultiService, Service
from twisted.internet import tcp
from twisted.internet.defer import CancelledError
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.internet.interfaces import ISSLTransport
from twisted.web.http import HTTPChannel
from twisted.web.server import Site

from regcache.auth import Credentials
from regcache.config import ConfigError
from regcache.expiry import Expiry
from regcache.inflight import Fills
from regcache.metrics import Metrics
from regcache.mirror import Mirror
from regcache.policy import Policy, Registry
from regcache.readiness import Readiness
from regcache.routes import RegistryRoutes
from regcache.store import Store
from regcache.tags import TagMap
from regcache.upstream import Timeouts, Upstream


#: How much one read from an upstream connection may take.  Twisted reads 64
#: KiB at a time; a cold blob then costs a trip through the HTTP client, the
#: fill, the hasher and a write per 64 KiB.  Reading up to 1 MiB cut the
#: reactor's CPU per cold byte by about a third with a plain-HTTP upstream in
#: the bench's profile (bench/README.md); over TLS the TLS layer still hands
#: the HTTP client 32 KiB at a time.  Outgoing TCP connections are only
#: upstream requests; client connections (tcp.Server) keep the default.
UPSTREAM_READ_SIZE = 1024 * 1024

#: Seconds an idle client connection is kept open.
IDLE_CLIENT_TIMEOUT = 120


class Channel(HTTPChannel):
    """
    Answers a TLS ClientHello on a plain-HTTP port at once, as Go's server
    does.  skopeo, podman and containerd try HTTPS first against an
    "insecure" registry; without an answer they wait ten seconds for the
    handshake to time out before falling back to HTTP.
    """

    _first = True

    def dataReceived(self, data: bytes) -> None:
        if self._first:
            self._first = False
            if data[:1] == b"\x16" and not ISSLTransport.providedBy(self.transport):
                self.transport.write(
                    b"HTTP/1.0 400 Bad Request\r\n\r\nClient sent an HTTP request to an HTTPS server.\n"
                )
                self.transport.loseConnection()
                return
        super().dataReceived(data)


class RegcacheSite(Site):
    """
    A Site whose access log is one structured event per request, and which
    counts requests into the one Metrics object.
    """

    protocol = Channel

    def __init__(self, resource, metrics, reactor):
        # Idle keep-alive connections are closed after two minutes rather
        # than Twisted's twelve hours.  Twisted suspends the timeout while a
        # response is being sent, so a slow blob download is not cut off.
        super().__init__(resource, reactor=reactor, timeout=IDLE_CLIENT_TIMEOUT)
        self.metrics = metrics
        self.displayTracebacks = False

    def getResourceFor(self, request):
        # Every answer passes here first: no client may sniff one into HTML.
        request.setHeader(b"X-Content-Type-Options", b"nosniff")
        return super().getResourceFor(request)

    def log(self, request):  # noqa: F811 - twisted.web calls Site.log(request)
        self.metrics.count_request(request.path, request.method, request.code)
        method = request.method.decode("latin-1")
        Logger(namespace="regcache.access").info(
            "{method} {uri} {status} {length} {cache}",
            method=method, uri=request.uri.decode("latin-1"), status=request.code, length=request.sentLength,
            cache=getattr(request, "cache_result", "-"), error=getattr(request, "error_code", None),
            client=request.getClientAddress().host if hasattr(request.getClientAddress(), "host") else None,
        )


class FillDrain(Service):
    """
    On shutdown, wait (briefly) for blob downloads under way, so a rolling
    restart does not throw away a nearly finished fill.
    """

    def __init__(self, fills, reactor, grace: float = 10.0):
        self.fills = fills
        self.reactor = reactor
        self.grace = grace

    def stopService(self):
        super().stopService()
        if not len(self.fills):
            return None
        return self.fills.drain().addTimeout(self.grace, self.reactor).addErrback(lambda _: None)


def _endpoint_problem(error: Exception) -> str:
    """
    Why serverFromString refused a description, in the operator's words
    rather than the parser's (``invalid literal for int()``).
    """
    text = str(error)
    if isinstance(error, OSError):
        return f"cannot read {error.filename}: {error.strerror}" if error.filename else error.strerror or text
    if isinstance(error, (SSL.Error, crypto.Error)):
        return "the TLS key or certificate is not valid PEM, or they do not match"
    number = re.fullmatch(r"invalid literal for int\(\) with base 10: (.*)", text)
    if number:
        return f"{number.group(1)} is not a number"
    keyword = re.search(r"unexpected keyword argument '(\w+)'", text)
    if keyword:
        return f"unknown parameter {keyword.group(1)!r}"
    return text or type(error).__name__


def listen_endpoint(reactor, description: str):
    """
    The server endpoint ``--listen`` describes.  Built before anything
    else, because building it parses the description and reads the TLS
    key and certificate: whatever goes wrong is --listen's fault.
    """
    try:
        return serverFromString(reactor, description)
    except Exception as e:  # endpoint parsers, plugins' too, raise anything
        raise ConfigError(f"--listen: cannot use {description!r}: {_endpoint_problem(e)}") from None


def _listen_problem(error: BaseException) -> str:
    if isinstance(error, CannotListenError):
        error = error.socketError
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    if isinstance(error, OverflowError):  # bind() on a port out of range
        return "the port must be 0-65535"
    return str(error) or type(error).__name__


def _address(address) -> str:
    if hasattr(address, "port"):
        return f"{address.host}:{address.port}"
    name = getattr(address, "name", address)
    return name.decode("utf-8", "replace") if isinstance(name, bytes) else str(name)


class Listener(Service):
    """
    Serves a factory on the ``--listen`` endpoint.

    Unlike StreamServerEndpointService, which logs a traceback when it
    cannot listen and leaves the process running with no port, this logs
    one line naming the endpoint and ends the process.  Every endpoint
    Twisted ships fails while twistd is still starting the application, so
    a SystemExit from privilegedStartService ends it with status 1 before
    the reactor runs; one that fails later (none of Twisted's do) stops the
    reactor.  "regcache serving" is logged once the port listens.
    """

    log = Logger()

    def __init__(self, endpoint, description: str, factory, reactor, served: str):
        self.endpoint = endpoint
        self.description = description
        self.factory = factory
        self.reactor = reactor
        self.served = served
        self._waiting = None
        self._starting = False
        self._refused = False

    def privilegedStartService(self):
        super().privilegedStartService()
        self._starting = True
        self._waiting = self.endpoint.listen(self.factory)
        self._waiting.addCallbacks(self._listening, self._cannot_listen)
        self._starting = False
        if self._refused:
            raise SystemExit(1)

    def startService(self):
        super().startService()
        if self._waiting is None:
            self.privilegedStartService()

    def stopService(self):
        super().stopService()
        self._waiting.cancel()
        return self._waiting.addCallback(lambda port: port and port.stopListening())

    def _listening(self, port):
        self.log.info("regcache serving {listen} on {address}, {served}", listen=self.description,
                      address=_address(port.getHost()), served=self.served)
        return port

    def _cannot_listen(self, failure):
        if failure.check(CancelledError):
            return None
        # Logged rather than printed: twistd has already sent stderr to the
        # log, which is where the operator (or the JSON log pipeline) looks.
        self.log.critical("regcache: --listen: cannot listen on {listen!r}: {problem}",
                          listen=self.description, problem=_listen_problem(failure.value))
        if self._starting:
            self._refused = True
        else:
            self.reactor.stop()
        return None


def _registry(config, reactor, pool, metrics) -> Registry:
    """
    The upstream ``config`` describes, with a client of its own timeouts
    on the shared connection pool.
    """
    if len(config.urls) > 1:
        raise ConfigError(f"upstream {config.name!r}: {len(config.urls)} URLs: chains are not supported yet")
    url = config.urls[0]
    http = HTTPClient(Agent(reactor, connectTimeout=config.connect_timeout, pool=pool))
    credentials = Credentials(url.username, url.password) if url.username else None
    timeouts = Timeouts(header=config.header_timeout, idle=config.idle_timeout)
    upstream = Upstream(url.url, http, reactor, metrics, credentials, timeouts, docker_hub=config.docker_hub)
    return Registry(config.name, frozenset(config.hosts), upstream, config.tag_ttl, config.max_stale, config.alias)


def _served(config) -> str:
    return ", ".join(f"{u.name} ({' '.join(url.url for url in u.urls)})" for u in config.upstreams)


def build(config, reactor) -> MultiService:
    """
    The whole regcache service for one Config.  Raises ConfigError, naming
    the option at fault, when the config cannot be served.
    """
    endpoint = listen_endpoint(reactor, config.listen)
    top = MultiService()
    metrics = Metrics()

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

    tcp.Client.bufferSize = UPSTREAM_READ_SIZE
    http_pool = HTTPConnectionPool(reactor, persistent=True)
    http_pool.maxPersistentPerHost = 8
    registries = [_registry(u, reactor, http_pool, metrics) for u in config.upstreams]
    policy = Policy(registries, reactor, config.default)
    fills = Fills(store, reactor, metrics)
    tags = TagMap(config.storage, run, store.index)
    tags.count()
    mirror = Mirror(store, tags, fills, policy, metrics, reactor)
    readiness = Readiness(store, run, reactor)
    routes = RegistryRoutes(mirror, policy, metrics, reactor, readiness.problem)
    site = RegcacheSite(routes.app.resource(), metrics, reactor)

    # Before the port: the start-up scan is under way when the first
    # request arrives, and eviction waits for it.
    Expiry(store, config.max_size, reactor, metrics).setServiceParent(top)
    readiness.setServiceParent(top)
    Listener(endpoint, config.listen, site, reactor,
             served=f"caching {_served(config)} in {config.storage}").setServiceParent(top)
    FillDrain(fills, reactor).setServiceParent(top)
    return top
