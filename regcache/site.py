# test-case-name: tests.test_site,tests.test_routes,tests.integration.test_serving
"""
The HTTP side facing clients: the channel each client connection gets, and
the Site that serves the routes with an access log and request metrics.
"""

import re
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

from twisted.internet.interfaces import ISSLTransport
from twisted.logger import Logger
from twisted.web.http import NO_BODY_CODES, HTTPChannel
from twisted.web.server import Request, Site

from regcache.clientauth import client_ip, within
from regcache.errors import RegistryError
from regcache.logs import printable

#: Seconds an idle client connection is kept open.
IDLE_CLIENT_TIMEOUT = 120

#: Paths that answer even past the connection caps: the kubelet's probes
#: must tell a busy regcache from a dead one.
HEALTH_PATHS = (b"/healthz", b"/readyz")


@dataclass(frozen=True)
class ClientLimits:
    """
    What one client may hold of the server, none of which a well-behaved
    client comes near.  ``head_timeout`` bounds the time from the first byte
    of a request to the end of its headers, so a client sending a byte a
    second (slowloris) cannot keep a connection for ever: Twisted's idle
    timer restarts at every byte.  ``progress_timeout`` is how long a blob
    response may wait on a client that takes no bytes before the connection
    is dropped and its descriptors and pins given back: Twisted suspends the
    idle timer while a response is under way.  ``max_connections`` and
    ``max_per_client`` cap open connections in all and per client address
    (None for no cap); past them a request is refused, health checks
    excepted.  ``exempt`` networks (the trusted proxies: an ingress carries
    every client's connections) have no per-address cap.
    """

    head_timeout: float = 10.0
    progress_timeout: float = 60.0
    max_connections: Optional[int] = None
    max_per_client: Optional[int] = None
    exempt: Tuple[Any, ...] = ()


#: The refusal of a request body: what any body gets, route or none.
_NO_BODY = RegistryError("UNSUPPORTED", "regcache is a read-only mirror and takes no request body", status=413)

#: A Host field value as RFC 9112 §3.2 allows it: a reg-name or an IP
#: literal, then perhaps a port.  Anything else is a 400 there.
_HOST = re.compile(rb"(?:[A-Za-z0-9._~!$&'()*+,;=%-]{0,255}|\[[0-9A-Fa-f:.]{2,63}\])(?::[0-9]{0,5})?")

_BAD_HOST = RegistryError("UNSUPPORTED", "the Host header is not a host name", status=400)

_TIMED_OUT = RegistryError("UNSUPPORTED", "the request headers did not arrive in time", status=408)
_FULL = RegistryError("UNAVAILABLE", "regcache has as many connections as it takes; try again shortly",
                      status=503, headers={"Retry-After": "1"})
_CLIENT_FULL = RegistryError("TOOMANYREQUESTS", "this address has as many connections open as it may",
                             headers={"Retry-After": "1"})

_REASONS = {400: b"Bad Request", 408: b"Request Timeout", 413: b"Content Too Large",
            429: b"Too Many Requests", 503: b"Service Unavailable"}


class Channel(HTTPChannel):
    """
    Answers a TLS ClientHello on a plain-HTTP port at once, as Go's server
    does.  skopeo, podman and containerd try HTTPS first against an
    "insecure" registry; without an answer they wait ten seconds for the
    handshake to time out before falling back to HTTP.

    Refuses a request whose Host field is not a host (RFC 9112 §3.2: one
    Host, a reg-name or IP literal), or several of them, with a 400.

    Refuses any request that announces a body (a Content-Length above zero,
    or any Transfer-Encoding) as soon as its headers are in.  Twisted would
    otherwise read the body before any route runs, spooling all past 100 KB
    of it to a temp file, however large it claims to be; a read-only mirror
    has no use for a byte of it.  The answer is 413 whatever the method:
    it is given before routing, so one answer fits every path (the routes'
    405 for a push would need the route), and the limit really is zero
    bytes.  The connection is closed, since the body it announced is never
    read, and what arrives of it meanwhile is dropped unread.
    """

    _first = True
    _refused = False
    _head_timer = None
    _host = None
    #: The cap this connection is past, if any (set by the site).
    over: Optional[str] = None

    def connectionMade(self) -> None:
        super().connectionMade()
        self.site.opened(self)
        if ISSLTransport.providedBy(self.transport):
            # The TLS handshake's bytes never reach dataReceived, nor restart
            # the idle timer: the head's deadline runs from the connection,
            # so a handshake sent a byte at a time is cut like a slow head.
            self._head_timer = self.callLater(self.site.limits.head_timeout, self._head_too_slow)

    def getHost(self):
        """
        This end's address, asked of the socket once: Twisted's Request asks
        for it in its constructor, a getsockname(2) per request otherwise,
        and a connection's own address never changes.
        """
        if self._host is None:
            self._host = super().getHost()
        return self._host

    def checkPersistence(self, request, version) -> bool:
        """
        An HTTP/1.0 client that asks to keep its connection (``Connection:
        keep-alive``: ab -k, some probes and proxies) keeps it, as nginx and
        distribution let it: Twisted closes every HTTP/1.0 connection after
        one answer, a TCP handshake per request.  Whether the answer can end
        without a close is known only once its headers are set:
        RegcacheRequest decides then.
        """
        if version == b"HTTP/1.0":
            tokens = {t.strip().lower() for v in request.requestHeaders.getRawHeaders(b"connection", [])
                      for t in v.split(b",")}
            return b"keep-alive" in tokens and b"close" not in tokens
        return super().checkPersistence(request, version)

    def connectionLost(self, reason) -> None:
        self._stop_head_timer()
        self.site.closed(self)
        super().connectionLost(reason)

    def dataReceived(self, data: bytes) -> None:
        if self._refused:
            return
        if self._head_timer is None and not self._handlingRequest:
            # The first byte of a request head: all of it must follow in time.
            self._head_timer = self.callLater(self.site.limits.head_timeout, self._head_too_slow)
        if self._first:
            self._first = False
            if data[:1] == b"\x16" and not ISSLTransport.providedBy(self.transport):
                self.transport.write(
                    b"HTTP/1.0 400 Bad Request\r\n\r\nClient sent an HTTP request to an HTTPS server.\n"
                )
                self.transport.loseConnection()
                return
        super().dataReceived(data)

    def requestDone(self, request) -> None:
        super().requestDone(request)
        if self.over and self.transport is not None:
            # A health check past the cap is answered, then the connection
            # goes: it must not stay as one more held past the cap.
            self.loseConnection()

    def _stop_head_timer(self) -> None:
        if self._head_timer is not None:
            if self._head_timer.active():
                self._head_timer.cancel()
            self._head_timer = None

    def _head_too_slow(self) -> None:
        self._head_timer = None
        self.site.tripped("head_timeout", self)
        request = self.requests[-1] if self.requests else None
        if request is None or not hasattr(self, "_command"):
            # Not even a request line yet: nothing to answer.
            self._refused = True
            self.transport.abortConnection()
            return
        self._refuse(request, _TIMED_OUT)

    def allHeadersReceived(self) -> None:
        self._stop_head_timer()
        request = self.requests[-1]
        if self.over and self._path.split(b"?")[0] not in HEALTH_PATHS:
            self._refuse(request, _FULL if self.over == "max_connections" else _CLIENT_FULL)
            return
        hosts = request.requestHeaders.getRawHeaders(b"host", [])
        if len(hosts) > 1 or (hosts and not _HOST.fullmatch(hosts[0])):
            self._refuse(request, _BAD_HOST)
            return
        if self.length != 0 or request.requestHeaders.hasHeader(b"transfer-encoding"):
            self._refuse(request, _NO_BODY)
            return
        super().allHeadersReceived()

    def rawDataReceived(self, data: bytes) -> None:
        # LineReceiver hands on what it already buffered after the headers.
        if not self._refused:
            super().rawDataReceived(data)

    def _refuse(self, request, error: RegistryError) -> None:
        """
        Answer ``error`` before any route runs, and close: what follows on
        the connection (a body, pipelined requests) is never read.
        """
        self._refused = True
        # Not 0, so Twisted does not go on to process the request.
        self.length = None
        body = error.body()
        extra = b"".join(b"%s: %s\r\n" % (k.encode("ascii"), v.encode("ascii")) for k, v in error.headers.items())
        self.transport.write(
            b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%s"
            b"Connection: close\r\nX-Content-Type-Options: nosniff\r\n\r\n%s"
            # A HEAD's answer has no body (RFC 9110 §9.3.2), only its length.
            % (error.status, _REASONS[error.status], len(body), extra, b"" if self._command == b"HEAD" else body)
        )
        self.loseConnection()
        # The access log and metrics see it as any answered request.
        request.method, request.uri = self._command, self._path
        request.path = self._path.split(b"?")[0]
        request.code, request.sentLength, request.error_code = error.status, len(body), error.code
        self.site.log(request)


class RegcacheRequest(Request):
    """
    A request that notes when it arrived (its request line) and when the
    first byte of its answer (the status line) went out, for the access log
    and the latency histograms: a blob sent with sendfile passes through
    ``write`` only for its headers.

    Its host, as the router sees it, is always the same: routes answer
    alike whatever name regcache is reached by, and werkzeug would otherwise
    fail (a 500) on a valid Host it cannot IDNA-encode, such as a label of
    more than 63 characters.
    """

    first_byte = None

    def __init__(self, channel, *args, **kwargs):
        super().__init__(channel, *args, **kwargs)
        self._clock = channel.site.reactor
        self.arrived = self._clock.seconds()

    def getRequestHostname(self) -> bytes:
        return b"regcache"

    def write(self, data: bytes) -> None:
        if self.first_byte is None:
            self.first_byte = self._clock.seconds()
            if self.clientproto == b"HTTP/1.0" and self.channel.persistent:
                self._keep_alive_1_0()
        super().write(data)

    def _keep_alive_1_0(self) -> None:
        """
        An HTTP/1.0 answer on a connection kept alive (Channel.checkPersistence)
        says so, as RFC 9112 §9.3 has it; one whose end only a close can mark
        (no Content-Length, and a body) closes the connection after all.
        """
        sized = (self.responseHeaders.hasHeader(b"content-length") or self.method == b"HEAD"
                 or self.code in NO_BODY_CODES)
        if sized:
            self.responseHeaders.setRawHeaders(b"Connection", [b"Keep-Alive"])
        else:
            self.channel.persistent = False


#: The most of a path the access log keeps: a client may send kilobytes.
MAX_LOGGED_PATH = 1024

#: Not a class attribute: a Logger read through an instance takes the class's namespace.
_access = Logger(namespace="regcache.access")


class RegcacheSite(Site):
    """
    A Site whose access log is one structured event per request, and which
    counts requests into the one Metrics object.
    """

    protocol = Channel
    requestFactory = RegcacheRequest

    def __init__(self, resource, metrics, reactor, limits: ClientLimits = ClientLimits()):
        # Idle keep-alive connections are closed after two minutes rather
        # than Twisted's twelve hours.  Twisted suspends the timeout while a
        # response is being sent, so a slow blob download is not cut off.
        super().__init__(resource, reactor=reactor, timeout=IDLE_CLIENT_TIMEOUT)
        self.metrics = metrics
        self.limits = limits
        self.displayTracebacks = False
        self.connections = 0
        #: Open connections per client address.  Its size is bounded by the
        #: open connections: an address leaves with its last one.
        self.by_address: Dict[str, int] = {}

    # Connection caps

    def opened(self, channel: Channel) -> None:
        address = _address(channel)
        self.connections += 1
        self.by_address[address] = self.by_address.get(address, 0) + 1
        self.metrics.client_connections.set(self.connections)
        limits = self.limits
        if limits.max_connections is not None and self.connections > limits.max_connections:
            channel.over = "max_connections"
        elif (limits.max_per_client is not None and self.by_address[address] > limits.max_per_client
              and not _exempt(address, limits.exempt)):
            channel.over = "max_per_client"
        if channel.over:
            self.tripped(channel.over, channel)

    def closed(self, channel: Channel) -> None:
        address = _address(channel)
        self.connections -= 1
        left = self.by_address.get(address, 1) - 1
        if left:
            self.by_address[address] = left
        else:
            self.by_address.pop(address, None)
        self.metrics.client_connections.set(self.connections)

    def tripped(self, limit: str, channel) -> None:
        """A client limit turned a client away: counted and logged, with the address it came from."""
        self.metrics.client_limits.labels(limit).inc()
        Logger(namespace="regcache.limits").info(
            "Client limit {limit} tripped by {client}", limit=limit, client=_address(channel)
        )

    def getResourceFor(self, request):
        # Every answer passes here first: no client may sniff one into HTML.
        request.setHeader(b"X-Content-Type-Options", b"nosniff")
        return super().getResourceFor(request)

    def log(self, request):  # noqa: F811 - twisted.web calls Site.log(request)
        """
        One event per answered request, its fields those docs/logs.md
        lists.  Of the query only containerd's ``ns`` is kept (the rest is
        where a client might put a secret), and the path is cut to
        MAX_LOGGED_PATH.  Who asked is client authentication's Identity
        when it set one.
        """
        first = request.first_byte
        took = self.reactor.seconds() - request.arrived
        self.metrics.count_request(
            request.path, request.method, request.code, getattr(request, "cache_result", None),
            request.sentLength, None if first is None else first - request.arrived, took,
        )
        identity = getattr(request, "identity", None)
        address = request.getClientAddress()
        ns = printable((request.args or {}).get(b"ns", [b""])[0].decode("latin-1")[:255]) or None
        _access.info(
            "{method} {path}" + ("?ns={ns}" if ns else "") + " {status} {bytes} {duration:.3f}s {cache}",
            event="request", method=printable(request.method.decode("latin-1")[:16]),
            path=printable(request.path.decode("latin-1")[:MAX_LOGGED_PATH]), ns=ns, status=request.code,
            bytes=request.sentLength,
            duration=took,
            cache=getattr(request, "cache_result", None), upstream=getattr(request, "upstream", None),
            error=getattr(request, "error_code", None),
            client=(identity.address if identity is not None and identity.address else getattr(address, "host", None)),
            user=identity.user if identity is not None else None,
        )


def _exempt(address: str, networks) -> bool:
    return within(client_ip(address), networks)


def _address(channel) -> str:
    peer = channel.transport.getPeer() if channel.transport is not None else None
    return str(getattr(peer, "host", "?"))
