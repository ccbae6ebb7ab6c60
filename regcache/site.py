# test-case-name: tests.test_site,tests.test_routes,tests.integration.test_serving
"""
The HTTP side facing clients: the channel each client connection gets, and
the Site that serves the routes with an access log and request metrics.
"""

from twisted.internet.interfaces import ISSLTransport
from twisted.logger import Logger
from twisted.web.http import HTTPChannel
from twisted.web.server import Request, Site

from regcache.errors import RegistryError

#: Seconds an idle client connection is kept open.
IDLE_CLIENT_TIMEOUT = 120


#: The refusal of a request body: what any body gets, route or none.
_NO_BODY = RegistryError("UNSUPPORTED", "regcache is a read-only mirror and takes no request body", status=413)


class Channel(HTTPChannel):
    """
    Answers a TLS ClientHello on a plain-HTTP port at once, as Go's server
    does.  skopeo, podman and containerd try HTTPS first against an
    "insecure" registry; without an answer they wait ten seconds for the
    handshake to time out before falling back to HTTP.

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

    def dataReceived(self, data: bytes) -> None:
        if self._refused:
            return
        if self._first:
            self._first = False
            if data[:1] == b"\x16" and not ISSLTransport.providedBy(self.transport):
                self.transport.write(
                    b"HTTP/1.0 400 Bad Request\r\n\r\nClient sent an HTTP request to an HTTPS server.\n"
                )
                self.transport.loseConnection()
                return
        super().dataReceived(data)

    def allHeadersReceived(self) -> None:
        request = self.requests[-1]
        if self.length != 0 or request.requestHeaders.hasHeader(b"transfer-encoding"):
            self._refuse_body(request)
            return
        super().allHeadersReceived()

    def rawDataReceived(self, data: bytes) -> None:
        # LineReceiver hands on what it already buffered after the headers.
        if not self._refused:
            super().rawDataReceived(data)

    def _refuse_body(self, request) -> None:
        self._refused = True
        # Not 0, so Twisted does not go on to process the request.
        self.length = None
        body = _NO_BODY.body()
        self.transport.write(
            b"HTTP/1.1 %d Content Too Large\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
            b"Connection: close\r\nX-Content-Type-Options: nosniff\r\n\r\n%s" % (_NO_BODY.status, len(body), body)
        )
        self.loseConnection()
        # The access log and metrics see it as any answered request.
        request.method, request.uri, request.path = self._command, self._path, self._path.split(b"?")[0]
        request.code, request.sentLength, request.error_code = _NO_BODY.status, len(body), _NO_BODY.code
        self.site.log(request)


class TimedRequest(Request):
    """
    A Request that notes when it arrived and when the first byte of its
    answer (the status line) went out, for the latency histograms: a blob
    sent with sendfile passes through ``write`` only for its headers.
    """

    first_byte = None

    def __init__(self, channel, *args, **kwargs):
        super().__init__(channel, *args, **kwargs)
        self._clock = channel.site.reactor
        self.arrived = self._clock.seconds()

    def write(self, data: bytes) -> None:
        if self.first_byte is None:
            self.first_byte = self._clock.seconds()
        super().write(data)


class RegcacheSite(Site):
    """
    A Site whose access log is one structured event per request, and which
    counts requests into the one Metrics object.
    """

    protocol = Channel
    requestFactory = TimedRequest

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
        first = request.first_byte
        self.metrics.count_request(
            request.path, request.method, request.code, getattr(request, "cache_result", None),
            request.sentLength, None if first is None else first - request.arrived,
            self.reactor.seconds() - request.arrived,
        )
        method = request.method.decode("latin-1")
        Logger(namespace="regcache.access").info(
            "{method} {uri} {status} {length} {cache}",
            method=method, uri=request.uri.decode("latin-1"), status=request.code, length=request.sentLength,
            cache=getattr(request, "cache_result", "-"), error=getattr(request, "error_code", None),
            client=request.getClientAddress().host if hasattr(request.getClientAddress(), "host") else None,
        )
