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

Every connection is also where regcache refuses to be an open proxy: the
client resolves each host itself and connects only to an address no more
private than the upstream's own (regcache.addresses), whatever a redirect or
a token realm named.  A refused address is never dialled.
"""

import ipaddress
from typing import List, Optional, Sequence

from treq.client import HTTPClient
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint, wrapClientTLS
from twisted.internet.error import ConnectError, DNSLookupError
from twisted.internet.interfaces import IResolutionReceiver, IStreamClientEndpoint
from twisted.python.compat import nativeString
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.error import SchemeNotSupported
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

from regcache.addresses import PUBLIC, privacy, refusal
from regcache.errors import RefusedDestination
from regcache.tls import upstream_policy

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


@implementer(IResolutionReceiver)
class _Addresses:
    """Collects what a name resolved to, as a Deferred list of address strings."""

    def __init__(self):
        self.found: List[str] = []
        self.done: Deferred = Deferred()

    def resolutionBegan(self, resolution):
        pass

    def addressResolved(self, address):
        self.found.append(address.host)

    def resolutionComplete(self):
        self.done.callback(self.found)


class Destinations:
    """
    Where this upstream's client may connect.  ``home`` is the upstream's own
    host: whatever it resolves to is the operator's choice, and sets how
    private the places it leads to may be.  ``allowed`` are networks the
    operator opened beyond that rule.
    """

    #: Seconds the upstream's own rank is remembered before it is resolved again.
    HOME_TTL = 300.0

    def __init__(self, reactor, home: Optional[str], allowed: Sequence = (), timeout: float = 5.0):
        self._reactor = reactor
        self.home = home.lower() if home else None
        self.allowed = tuple(allowed)
        self._timeout = timeout
        self._home_rank: Optional[int] = None
        self._home_seen = 0.0

    async def resolve(self, host: str, port: int) -> List[str]:
        try:
            literal = ipaddress.ip_address(host)
        except ValueError:
            pass
        else:
            return [str(literal)]
        receiver = _Addresses()
        self._reactor.nameResolver.resolveHostName(receiver, host, portNumber=port)
        found = await receiver.done.addTimeout(self._timeout, self._reactor)
        if not found:
            raise DNSLookupError(f"{host} has no address")
        return found

    async def choose(self, host: str, port: int) -> List[str]:
        """The addresses ``host`` may be reached at, in resolver order; RefusedDestination if none."""
        found = await self.resolve(host, port)
        if self.home is None or host.lower() == self.home:
            self._remember(found)
            return found
        home = await self._rank(port)
        usable = [a for a in found if refusal(a, home, self.allowed) is None]
        if not usable:
            raise RefusedDestination(host, refusal(found[0], home, self.allowed))
        return usable

    def _remember(self, found: List[str]) -> None:
        self._home_rank = max(privacy(a) for a in found)
        self._home_seen = self._reactor.seconds()

    async def _rank(self, port: int) -> int:
        if self._home_rank is None or self._reactor.seconds() - self._home_seen > self.HOME_TTL:
            try:
                self._remember(await self.resolve(self.home, port))
            except Exception:
                # Not knowing where home is, assume the strictest.
                return PUBLIC
        return self._home_rank


@implementer(IStreamClientEndpoint)
class _Guarded:
    """A TCP endpoint that connects only to an address Destinations chose."""

    def __init__(self, reactor, host: str, port: int, timeout: float, destinations: Destinations):
        self._reactor = reactor
        self._host = host
        self._port = port
        self._timeout = timeout
        self._destinations = destinations

    def connect(self, factory):
        return Deferred.fromCoroutine(self._connect(factory))

    async def _connect(self, factory):
        # One address after another, as HostnameEndpoint would: a host with
        # an IPv6 address first is still reached over IPv4 where v6 fails.
        addresses = await self._destinations.choose(self._host, self._port)
        for address in addresses[:-1]:
            try:
                return await self._dial(address, factory)
            except ConnectError:
                continue
        return await self._dial(addresses[-1], factory)

    def _dial(self, address: str, factory):
        kind = TCP6ClientEndpoint if ":" in address else TCP4ClientEndpoint
        return kind(self._reactor, address, self._port, timeout=self._timeout).connect(factory)


@implementer(IAgentEndpointFactory)
class _Endpoints:
    """
    Agent's own choice of endpoint (TCP for http, TLS over TCP for https,
    verified by ``tls``: regcache.tls.upstream_policy), with large reads on
    the TCP connection: under TLS too, where it is the TLS layer that reads
    the socket.
    """

    def __init__(self, reactor, connect_timeout: float, destinations: Destinations, tls):
        self._reactor = reactor
        self._connect_timeout = connect_timeout
        self._destinations = destinations
        self._tls = tls

    def endpointForURI(self, uri):
        tcp = _LargeReads(
            _Guarded(self._reactor, nativeString(uri.host), uri.port, self._connect_timeout, self._destinations)
        )
        if uri.scheme == b"http":
            return tcp
        if uri.scheme == b"https":
            return wrapClientTLS(self._tls.creatorForNetloc(uri.host, uri.port), tcp)
        raise SchemeNotSupported(f"Unsupported scheme: {uri.scheme!r}")


def client(reactor, connect_timeout: float, home: Optional[str] = None, allowed: Sequence = (),
           tls=None) -> HTTPClient:
    """
    The HTTP client of one upstream whose own host is ``home``: its registry,
    token server and CDNs.  Without ``home`` it may connect anywhere.  ``tls``
    checks their certificates; by default as a browser would.
    """
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = PERSISTENT_PER_HOST
    destinations = Destinations(reactor, home, allowed, connect_timeout)
    endpoints = _Endpoints(reactor, connect_timeout, destinations, tls or upstream_policy())
    return HTTPClient(Agent.usingEndpointFactory(reactor, endpoints, pool=pool))
