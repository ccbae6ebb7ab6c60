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
from twisted.internet.protocol import ClientFactory, Factory, Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import ResponseNeverReceived

from regcache import upstream_http
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
