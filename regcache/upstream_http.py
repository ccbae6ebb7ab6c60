# test-case-name: tests.test_upstream_http
"""
The HTTP client every upstream exchange goes through: persistent pooled
connections, the ``--connect-timeout``, and large reads.

Twisted reads 64 KiB at a time; a cold blob then costs a trip through the
HTTP client, the fill, the hasher and a write per 64 KiB.  Reading up to
1 MiB cut the reactor's CPU per cold byte by about a third with a plain-HTTP
upstream in the bench's profile (bench/README.md); over TLS the TLS layer
still hands the HTTP client 32 KiB at a time.  The size is set on each TCP
connection this client makes, under TLS too, and on no class: client
connections and any other outgoing connection keep Twisted's default.
"""

from treq.client import HTTPClient
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.python.compat import nativeString
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool
from twisted.web.error import SchemeNotSupported
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

#: How much one read from an upstream connection may take.
UPSTREAM_READ_SIZE = 1024 * 1024

#: Idle connections kept open to one upstream host, for the next request.
PERSISTENT_PER_HOST = 8


@implementer(IStreamClientEndpoint)
class _LargeReads:
    """
    A TCP endpoint whose connections read up to UPSTREAM_READ_SIZE at a
    time.  The size is set when the connection is made, before the HTTP
    client has written its request, so no response byte is read smaller.
    """

    def __init__(self, endpoint):
        self._endpoint = endpoint

    def connect(self, factory):
        return self._endpoint.connect(factory).addCallback(self._sized)

    @staticmethod
    def _sized(protocol):
        protocol.transport.bufferSize = UPSTREAM_READ_SIZE
        return protocol


@implementer(IAgentEndpointFactory)
class _Endpoints:
    """
    Agent's own choice of endpoint (TCP for http, TLS over TCP for https,
    verified as a browser would), with large reads on the TCP connection:
    under TLS too, where it is the TLS layer that reads the socket.
    """

    def __init__(self, reactor, connect_timeout: float):
        self._reactor = reactor
        self._connect_timeout = connect_timeout
        self._tls = BrowserLikePolicyForHTTPS()

    def endpointForURI(self, uri):
        tcp = _LargeReads(
            HostnameEndpoint(self._reactor, nativeString(uri.host), uri.port, timeout=self._connect_timeout)
        )
        if uri.scheme == b"http":
            return tcp
        if uri.scheme == b"https":
            return wrapClientTLS(self._tls.creatorForNetloc(uri.host, uri.port), tcp)
        raise SchemeNotSupported(f"Unsupported scheme: {uri.scheme!r}")


def client(reactor, connect_timeout: float) -> HTTPClient:
    """
    The HTTP client for every upstream: registries, token servers, CDNs.
    """
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = PERSISTENT_PER_HOST
    return HTTPClient(Agent.usingEndpointFactory(reactor, _Endpoints(reactor, connect_timeout), pool=pool))
