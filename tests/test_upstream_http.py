# test-case-name: tests.test_upstream_http
"""
The upstream HTTP client's connections read up to UPSTREAM_READ_SIZE at a
time, over plain HTTP and under TLS; every other connection, a client's
(tcp.Server) or another outgoing one (tcp.Client), keeps Twisted's default.

The connections are real sockets on loopback, driven by hand on a
MemoryReactorClock: the reactor records what the client asked to connect,
and the test makes that connection with Twisted's own tcp.Connector.
"""

import select

from twisted.internet import tcp
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IHostnameResolver
from twisted.internet.protocol import ClientFactory, Factory, Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase
from twisted.python.failure import Failure
from twisted.web.client import ResponseNeverReceived

from zope.interface import implementer

from regcache import upstream_http
from regcache.config import parse_networks
from regcache.upstream_http import UPSTREAM_READ_SIZE

DEFAULT = tcp.Connection.bufferSize


class Received(Protocol):
    """Keeps what the peer sent."""

    def __init__(self):
        self.data = b""

    def dataReceived(self, data):
        self.data += data


class Accepted(Factory):
    """Keeps the protocol of every connection a listening port accepted."""

    def __init__(self):
        self.accepted = []

    def buildProtocol(self, addr):
        p = Received()
        self.accepted.append(p)
        return p


class LoopbackTests(SynchronousTestCase):
    def setUp(self):
        self.reactor = MemoryReactorClock()
        self.server = Accepted()
        self.port = tcp.Port(0, self.server, interface="127.0.0.1", reactor=self.reactor)
        self.port.startListening()
        self.addCleanup(self.port.socket.close)

    def connect(self, host, port, factory, timeout=30, bindAddress=None):
        """
        Make the connection a connectTCP call asked for on a real socket,
        and accept it on the listening port; (client, server) transports.
        """
        connector = tcp.Connector(host, port, factory, timeout, bindAddress, self.reactor)
        connector.connect()
        self.reactor.advance(0)  # tcp.Client starts connecting on the next turn
        client = connector.transport
        self.addCleanup(client.socket.close)
        while not client.connected:
            select.select([], [client.socket], [])
            client.doConnect()
        select.select([self.port.socket], [], [])
        self.port.doRead()
        server = self.server.accepted[-1].transport
        self.addCleanup(server.socket.close)
        return client, server

    def sent(self, client, server):
        """What the client has written so far, as the server received it."""
        client.doWrite()
        select.select([server.socket], [], [])
        server.doRead()
        return server.protocol.data

    def request(self, scheme):
        """
        The upstream client's GET to the listening port: the Deferred of
        its response and the connectTCP call it made.
        """
        http = upstream_http.client(self.reactor, connect_timeout=5)
        d = http.get(f"{scheme}://127.0.0.1:{self.port.getHost().port}/v2/")
        self.assertEqual(len(self.reactor.tcpClients), 1)
        return d, self.reactor.tcpClients[0]

    def close(self, d, client):
        """End the connection before an answer: the request fails, as it should."""
        client.abortConnection()
        self.reactor.advance(0)
        self.failureResultOf(d, ResponseNeverReceived)

    def test_upstream_connection_reads_large_chunks_over_http(self):
        """
        A plain-HTTP upstream connection reads up to UPSTREAM_READ_SIZE at
        once (the bench's profile relies on it), and its request went out
        on that connection; the client connection at the other end keeps
        the default.
        """
        d, connect = self.request("http")
        client, server = self.connect(*connect)
        self.assertEqual(client.bufferSize, UPSTREAM_READ_SIZE)
        self.assertGreater(UPSTREAM_READ_SIZE, DEFAULT)
        self.assertEqual(server.bufferSize, DEFAULT)
        self.assertTrue(self.sent(client, server).startswith(b"GET /v2/ HTTP/1.1\r\n"))
        self.close(d, client)

    def test_upstream_connection_reads_large_chunks_under_tls(self):
        """
        Under TLS the TCP connection below the TLS layer is the one that
        reads up to UPSTREAM_READ_SIZE at once; what it carries is TLS (a
        ClientHello), not the request in the clear.
        """
        d, connect = self.request("https")
        client, server = self.connect(*connect)
        self.assertEqual(client.bufferSize, UPSTREAM_READ_SIZE)
        self.assertEqual(server.bufferSize, DEFAULT)
        self.assertEqual(self.sent(client, server)[:1], b"\x16")
        self.close(d, client)

    def test_other_outgoing_connections_keep_the_default(self):
        """
        An outgoing connection that is not the upstream client's, made
        after the upstream client made one, keeps the default read size:
        nothing is set on a class.
        """
        d, connect = self.request("http")
        upstream, _ = self.connect(*connect)
        other, _ = self.connect("127.0.0.1", self.port.getHost().port, ClientFactory.forProtocol(Protocol))
        self.assertEqual(upstream.bufferSize, UPSTREAM_READ_SIZE)
        self.assertEqual(other.bufferSize, DEFAULT)
        self.close(d, upstream)


@implementer(IHostnameResolver)
class FixedNames:
    """A resolver with a fixed table, so no test ever asks real DNS."""

    def __init__(self, table):
        self.table = table
        self.asked = []

    def resolveHostName(self, receiver, hostName, portNumber=0, addressTypes=None, transportSemantics="TCP"):
        self.asked.append(hostName)
        receiver.resolutionBegan(None)
        for address in self.table.get(hostName, []):
            kind = IPv6Address if ":" in address else IPv4Address
            receiver.addressResolved(kind("TCP", address, portNumber))
        receiver.resolutionComplete()


class DestinationTests(SynchronousTestCase):
    """
    The upstream client dials only addresses no more private than its
    upstream's own, whatever host a redirect names; a refused one is never
    dialled.
    """

    def setUp(self):
        self.reactor = MemoryReactorClock()
        self.names = FixedNames({
            "registry.example": ["104.16.0.1"],
            "cdn.example": ["104.16.0.2"],
            "metadata.example": ["169.254.169.254"],
            "mixed.example": ["127.0.0.1", "104.16.0.3"],
            "inside.example": ["10.0.0.7"],
        })
        self.reactor.installNameResolver(self.names)

    def get(self, url, home="registry.example", allowed=()):
        http = upstream_http.client(self.reactor, 5, home, parse_networks("--upstream-allow", allowed))
        return http.get(url)

    def test_a_public_upstream_reaches_public_hosts(self):
        """Its own host and a public CDN are dialled at the address they resolve to."""
        self.get("https://registry.example/v2/")
        self.get("http://cdn.example/blob")
        self.assertEqual([c[:2] for c in self.reactor.tcpClients], [("104.16.0.1", 443), ("104.16.0.2", 80)])

    def test_metadata_loopback_and_private_targets_are_never_dialled(self):
        """
        A redirect to the metadata address, a loopback literal, a private
        host or 0.0.0.0 fails with a refusal that says why, and no
        connection is even attempted.
        """
        for url, words in (("http://metadata.example/x", "169.254.169.254 is a link-local address"),
                           ("http://127.0.0.1:22/", "loopback"), ("http://inside.example/", "private"),
                           ("http://0.0.0.0:5000/", "unusable")):
            with self.subTest(url=url):
                failure = self.failureResultOf(self.get(url))
                self.assertIn(words, str(failure.value))
        self.assertEqual(self.reactor.tcpClients, [])

    def test_of_several_addresses_only_an_allowed_one_is_dialled(self):
        """A name that resolves to loopback and a public address is dialled at the public one."""
        self.get("http://mixed.example/")
        self.assertEqual(self.reactor.tcpClients[0][:2], ("104.16.0.3", 80))

    def test_the_operator_may_open_a_network(self):
        """``--upstream-allow 10.0.0.0/8`` lets a public upstream lead into it, and nowhere else."""
        self.get("http://inside.example/", allowed=["10.0.0.0/8"])
        self.assertEqual(self.reactor.tcpClients[0][:2], ("10.0.0.7", 80))
        self.failureResultOf(self.get("http://metadata.example/", allowed=["10.0.0.0/8"]))

    def test_a_loopback_upstream_may_lead_to_loopback(self):
        """As in the tests' fake Hub: loopback to loopback is allowed, loopback to link-local is not."""
        self.get("http://127.0.0.2:5000/blob", home="127.0.0.1")
        self.assertEqual(self.reactor.tcpClients[0][:2], ("127.0.0.2", 5000))
        self.failureResultOf(self.get("http://metadata.example/", home="127.0.0.1"))

    def test_a_failed_address_falls_through_to_the_next(self):
        """
        A host with two usable addresses is tried at the second when the
        first cannot be reached, as HostnameEndpoint would.
        """
        from twisted.internet.error import ConnectionRefusedError

        self.names.table["two.example"] = ["104.16.0.8", "104.16.0.9"]
        self.get("http://two.example/")
        host, port, factory = self.reactor.tcpClients[0][:3]
        self.assertEqual(host, "104.16.0.8")
        factory.clientConnectionFailed(None, Failure(ConnectionRefusedError()))
        self.assertEqual(self.reactor.tcpClients[1][:2], ("104.16.0.9", 80))
