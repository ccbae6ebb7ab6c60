# test-case-name: tests.test_site,tests.test_routes,tests.integration.test_serving
"""
The HTTP side facing clients: the channel each client connection gets, and
the Site that serves the routes with an access log and request metrics.
"""

from twisted.internet.interfaces import ISSLTransport
from twisted.logger import Logger
from twisted.web.http import HTTPChannel
from twisted.web.server import Site

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
